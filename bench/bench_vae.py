"""
KL autoencoder throughput: encode (posterior mean) + decode of 256 px images, images/s, for our KLVAE and, when
diffusers is importable, diffusers' AutoencoderKL holding the same weights (written with checkpoints.save_diffusers).
On a GPU the figures are also taken in bf16 autocast. Random weights: speed does not depend on them.

    OMP_NUM_THREADS=1 python bench/bench_vae.py [--model sd-vae] [--resolution 256] [--batch 2] [--iters 3]
"""
import argparse
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
import models  # noqa: E402
import train_utils as tu  # noqa: E402



def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device {device} ({where}), torch {torch.__version__}, {args.model}, {args.resolution} px, "
          f"batch {args.batch}, {args.iters} timed iterations (median)")
    torch.manual_seed(0)
    vae = models.KLVAE_models[args.model]().eval()
    x = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
    runs = {"ours": lambda: vae.decode(vae.encode(x).mean)}
    try:
        from diffusers import AutoencoderKL
        with tempfile.TemporaryDirectory() as folder:
            checkpoints.save_diffusers(vae, folder)
            ref = AutoencoderKL.from_pretrained(folder).to(device).eval()
        runs["diffusers"] = lambda: ref.decode(ref.encode(x).latent_dist.mean).sample
    except ImportError:
        print("diffusers not importable: skipping the diffusers AutoencoderKL comparison")
    vae.to(device)
    for precision in (["fp32", "bf16"] if device.type == "cuda" else ["fp32"]):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        times, outs = {name: [] for name in runs}, {}
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
            for name, fn in runs.items():
                outs[name] = fn().float()  # warm-up: kernel selection, allocator
                assert torch.isfinite(outs[name]).all(), f"{name} {precision}: non-finite output"
            for _ in range(args.iters):  # interleaved, so load from other processes hits both alike
                for name, fn in runs.items():
                    times[name].append(tu.timed(fn, device)[0])
        ips = {name: args.batch / statistics.median(ts) for name, ts in times.items()}
        for name in runs:
            line = f"{name:9s} {precision}: {ips[name]:8.2f} images/s (encode + decode)"
            if name != "ours":
                line += (f"; ours / {name} = {ips['ours'] / ips[name]:.2f}x, "
                         f"max |ours - {name}| = {(outs['ours'] - outs[name]).abs().max().item():.2e} "
                         f"(outputs up to {outs[name].abs().max().item():.1f})")
            print(line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd-vae", choices=sorted(models.KLVAE_models))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    main(parser.parse_args())
