"""
Convergence curves, the paper's headline picture (Figure 1 right, Table 2 across iterations): a generation metric
against training steps, one curve per run, from the checkpoints each training run left behind.

    python curves.py results/000-DiT-XL-2 results/001-DiT-XL-2 --metric fid \
        --reference VIRTUAL_imagenet256_labeled.npz --num-samples 10000 --out curves/dit-xl
    python curves.py results/demo/gen/dit-* --metric probe --probe results/demo/probe/probe.pt --out curves/dit

For every run (a train_dit.py / train_sit.py / train_maskgit.py folder), every EMA export ema/<step>.pt (or, when
there are none, every checkpoint) is sampled with sample.py's code and the family's sampler (options after `--`
go to sample.py: `-- --cfg-scale 1.0 --num-sampling-steps 50`), scored, and written to OUT.json (the numbers) and
OUT.png (the curves). Runs under torchrun as sample.py and evaluate.py do. --metric fid needs pytorch-fid's
Inception weights and a reference batch; --metric probe is the demo's offline stand-in (demo.py).
"""
import argparse
import glob
import json
import os
import sys

import numpy as np

import checkpoints
import data
import evaluate
import sample
import train_utils as tu


def run_checkpoints(run):
    """(step, path) of a run's EMA exports, else of its checkpoints, oldest first."""
    found = sorted(glob.glob(os.path.join(glob.escape(run), "ema", "*.pt"))) or tu.list_checkpoints(
        os.path.join(run, "checkpoints"))
    if not found:
        raise FileNotFoundError(f"{run}: neither ema/<step>.pt exports nor checkpoints/<step>.pt: not a training run")
    return [(int(os.path.basename(p)[:-3]), p) for p in found]


def scorer(args, dist):
    """metric(npz path) -> {name: value}: FID & co. against --reference, or the demo's gFD-probe."""
    if args.metric == "probe":
        import demo  # the demo's own probe classifier: the offline stand-in for FID
        probe, state = demo.load_probe(args.probe)

        def score(path):
            with np.load(path) as f:
                images, labels = f["arr_0"], f["arr_1"] if "arr_1" in f.files else None
            return demo.probe_evaluate(probe, state, images, labels)
        return score, "gfd_probe"
    if args.reference is None:
        raise ValueError("--metric fid needs --reference (an ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz)")
    inception = evaluate.load_inception(args.inception, args.protocol).to(dist.device)
    ref = evaluate.read_reference(args.reference)

    def score(path):
        results, _ = evaluate.evaluate_samples(data.open_images(path), ref, inception, dist)
        return results or {}
    return score, "fid"


def main(args):
    dist = tu.setup_distributed()
    score, key = scorer(args, dist)
    table, curves = {}, {}
    for run in args.runs:
        name = os.path.basename(os.path.normpath(run))
        rows = []
        for step, ckpt in run_checkpoints(run):
            # The samples of one checkpoint are sample.py's own (its shards are reused by an identical rerun).
            out_dir = sample.main(sample.get_args(["--ckpt", ckpt, "--num-samples", str(args.num_samples),
                                                   "--sample-dir", os.path.join(args.out + "-samples", name),
                                                   *args.sample_args]))
            row = {"step": step, "checkpoint": ckpt, "samples": f"{out_dir}.npz"}
            if dist.is_main:
                row.update(score(f"{out_dir}.npz"))
                print(json.dumps({"run": name, **row}), file=sys.stderr)
            rows.append(row)
        table[name] = rows
        if dist.is_main:
            curves[name] = ([r["step"] for r in rows], [r[key] for r in rows])
    if dist.is_main:
        checkpoints.atomic_write(args.out + ".json", lambda tmp: open(tmp, "w").write(json.dumps(table, indent=2)))
        evaluate.plot_curves(args.out + ".png", curves, xlabel="training step", ylabel=key.replace("_", "-"),
                             log_y=False, title=f"{args.num_samples} samples per point")
        print(json.dumps({"json": args.out + ".json", "png": args.out + ".png", "runs": len(table)}))
    return table


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="training run folders (holding ema/ or checkpoints/)")
    parser.add_argument("--metric", choices=["fid", "probe"], default="fid", help="FID & co. (ADM protocol) or the "
                        "demo's gFD-probe")
    parser.add_argument("--reference", default=None, help="--metric fid: ADM reference batch (.npz) or image folder")
    parser.add_argument("--inception", default=None, help="pt_inception-2015-12-05-6726825d.pth (default: hub cache)")
    parser.add_argument("--protocol", choices=evaluate.PROTOCOLS, default="adm", help="as evaluate.py fid")
    parser.add_argument("--probe", default=None, help="--metric probe: a probe from demo.py probe-train")
    parser.add_argument("--num-samples", type=tu.positive_int, default=10_000, help="samples per checkpoint")
    parser.add_argument("--out", required=True, help="writes OUT.json, OUT.png and OUT-samples/")
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # after --: options for sample.py
    args = parser.parse_args(argv[:cut])
    args.sample_args = argv[cut + 1:]
    if args.metric == "probe" and args.probe is None:
        parser.error("--metric probe needs --probe PATH")
    return args


if __name__ == "__main__":
    tu.run_main(main, get_args())
