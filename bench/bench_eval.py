"""
Evaluation speed: FID Inception feature throughput (images/s) for our FIDInceptionV3 and, when pytorch_fid is
importable, pytorch-fid's InceptionV3 holding the same (random) weights, in the same run; the Frechet distance of
two 2048-d Gaussians (our eigenvalue route vs scipy's sqrtm, as ADM / pytorch-fid compute it); precision/recall
over N x N features. Random weights: speed does not depend on them.

    OMP_NUM_THREADS=1 python bench/bench_eval.py [--batch 8] [--resolution 256] [--iters 3] [--pr-n 2000] [--no-sqrtm]
"""
import argparse
import os
import statistics
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
import train_utils as tu  # noqa: E402



def pytorch_fid_model(weights):
    """pytorch-fid's InceptionV3 (pool3 block) with our weight file instead of its download, or None."""
    try:
        import pytorch_fid.inception as pfi
    except ImportError:
        return None
    pfi.load_state_dict_from_url = lambda *a, **k: torch.load(weights)
    return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.allow_tf32 = False          # evaluate.py measures in full fp32
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device {device} ({where}), torch {torch.__version__}, batch {args.batch}, {args.resolution} px uint8 "
          f"input, {args.iters} timed iterations (median)")

    # Inception throughput: ours vs pytorch-fid, same weights, same images.
    torch.manual_seed(0)
    ours = evaluate.FIDInceptionV3()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inception.pth")
        torch.save({k: v for k, v in ours.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
        theirs = pytorch_fid_model(path)
    images = torch.randint(0, 256, (args.batch, 3, args.resolution, args.resolution), dtype=torch.uint8,
                           device=device)
    runs = {"ours (pool + spatial + logits)": lambda: ours(images)}
    if theirs is not None:
        runs["pytorch-fid (pool3)"] = lambda: theirs(images.float() / 255)
    else:
        print("pytorch_fid not importable: skipping its timing (pip install pytorch-fid to compare)")
    for name, fn in runs.items():
        model = ours if name.startswith("ours") else theirs
        model.to(device)
        with torch.no_grad():
            tu.timed(fn, device)                        # warm-up
            times = [tu.timed(fn, device)[0] for _ in range(args.iters)]
        print(f"  Inception {name:<32} {args.batch / statistics.median(times):8.2f} images/s")
        model.cpu()
    if theirs is not None:
        with torch.no_grad():
            a = ours(images.cpu())[0]
            b = theirs(images.cpu().float() / 255)[0].flatten(1)
        print(f"  pool3 max |ours - pytorch-fid| = {(a - b).abs().max().item():.3g} (max |feature| "
              f"{a.abs().max().item():.3g})")

    # Frechet distance of two 2048-d Gaussians (full-rank covariances).
    rng = np.random.default_rng(0)
    d = 2048
    x = rng.standard_normal((3 * d, d))
    y = rng.standard_normal((3 * d, d)) @ (np.eye(d) + 0.05 * rng.standard_normal((d, d)))
    stats = [x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)]
    methods = ["eig"] + ([] if args.no_sqrtm else ["sqrtm"])
    values = {}
    for m in methods:
        t, values[m] = tu.timed(lambda: evaluate.frechet_distance(*stats, method=m), torch.device("cpu"))
        print(f"  Frechet distance 2048-d, method {m:<6} {t:8.2f} s   (value {values[m]:.10g})")
    if len(values) == 2:
        print(f"  relative difference eig vs sqrtm: {abs(values['eig'] - values['sqrtm']) / values['sqrtm']:.2e}")

    # Precision/recall over N x N 2048-d features (k = 3), blocked distances.
    if args.pr_n:
        f1 = rng.standard_normal((args.pr_n, d)).astype(np.float32)
        f2 = (rng.standard_normal((args.pr_n, d)) + 0.1).astype(np.float32)
        t, (p, r) = tu.timed(lambda: evaluate.precision_recall(f1, f2, device=device), device)
        print(f"  precision/recall {args.pr_n} x {args.pr_n}: {t:.2f} s (precision {p:.3f}, recall {r:.3f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--pr-n", type=int, default=2000)
    parser.add_argument("--no-sqrtm", action="store_true", help="skip scipy's sqrtm (slow on CPU)")
    main(parser.parse_args())
