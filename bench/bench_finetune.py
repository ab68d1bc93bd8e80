"""
Speed of the EQ-VAE fine-tuning step, measured through the real script (finetune_eqvae.main: data, tau, losses,
GAN, optimisers), read back from its metrics.jsonl.

    python bench/bench_finetune.py               # CPU: the tiny preset step (64 px, batch 16, ch 16)
    python bench/bench_finetune.py --sd-vae      # + SD-VAE at 256 px, batch 1 on CPU (minutes)
On CUDA it also times SD-VAE at 256 px, batch 10 per GPU, bf16 (the paper's per-GPU setting) with peak memory.
LPIPS uses random VGG weights here (same cost as the real ones, no download).
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import finetune_eqvae as fe  # noqa: E402


def run(argv, steps, warmup):
    """Run the script for warmup + steps optimizer steps; return (s/step over the last `steps`, images/s)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = fe.parse_args(argv + ["--results-dir", tmp, "--exp-name", "bench", "--max-steps", str(warmup + steps),
                                     "--log-every", str(warmup), "--preview-every", "100000",
                                     "--ckpt-every", "100000", "--keep-last", "1"])
        if warmup == 0 or steps % warmup:
            raise ValueError("steps must be a multiple of warmup (metrics are logged every `warmup` steps)")
        t0 = time.time()
        fe.main(args)
        rows = [json.loads(line) for line in open(os.path.join(tmp, "bench", "metrics.jsonl")) if '"loss"' in line]
    timed = rows[1:]  # the first interval holds the warm-up (allocator, cuDNN autotune, first epoch)
    sec_per_step = sum(1 / r["steps_per_sec"] for r in timed) / len(timed)
    img = args.global_batch_size * args.grad_accum / sec_per_step
    return sec_per_step, img, time.time() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sd-vae", action="store_true", help="also time SD-VAE at 256 px, batch 1, on CPU")
    p.add_argument("--steps", type=int, default=20)
    opts = p.parse_args()
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {torch.cuda.get_device_name() if cuda else 'cpu'}")

    # The tiny preset as the demo runs it (GAN on, no LPIPS), and with LPIPS switched on.
    for name, extra in (("tiny preset (no LPIPS)", []), ("tiny preset + LPIPS", ["--perceptual-weight", "1", "--lpips-random"])):
        s, img, wall = run(["--preset", "tiny", "--precision", "fp32", *extra], opts.steps, opts.steps // 2)
        print(f"CPU {name}: {s:.3f} s/step ({1 / s:.2f} steps/s, {img:.1f} img/s, 64 px, batch 16); run {wall:.0f} s")

    if opts.sd_vae:
        s, img, wall = run(["--data", "synthetic", "--num-images", "64", "--init", "none", "--config", "sd-vae",
                            "--global-batch-size", "1", "--grad-accum", "1", "--lpips-random", "--num-workers", "0",
                            "--precision", "fp32"], 2, 1)
        print(f"CPU SD-VAE 256 px, batch 1, fp32: {s:.1f} s/step; run {wall:.0f} s")

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        s, img, wall = run(["--data", "synthetic", "--num-images", "400", "--init", "none", "--config", "sd-vae",
                            "--global-batch-size", "10", "--grad-accum", "2", "--lpips-random", "--num-workers", "4",
                            "--precision", "bf16"], 10, 5)
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"CUDA SD-VAE 256 px, batch 10 x accumulation 2, bf16: {s:.3f} s/step ({img:.1f} img/s), "
              f"peak memory {peak:.1f} GiB; run {wall:.0f} s")


if __name__ == "__main__":
    main()
