"""
DiT training-step throughput (forward + backward + AdamW, DiT's loss): images/s, and MFU on CUDA.

    python bench/bench_dit.py                                  # CPU: DiT-S/2 on 32x32x4 latents
    python bench/bench_dit.py --official /path/to/DiT          # + the official models.py (needs timm) on the same run
    python bench/bench_dit.py --model DiT-XL/2 --batch-size 32 # CUDA: bf16 autocast, MFU printed
    python bench/bench_dit.py --compile                        # + the same model torch.compile'd (train_dit --compile)

Prints figures only; nothing here is a pass/fail test.
"""
import argparse
import importlib.util
import os
import sys
import time
from statistics import median

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402
import train_utils as tu  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) used for MFU; pass --peak-tflops for other devices.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def train_flops_per_image(model, input_size):
    """Matmul FLOPs of one training step per image: 3 x forward (backward ~ 2 x forward), forward = 2 x MACs."""
    D, L = model.pos_embed.shape[-1], len(model.blocks)
    T = (input_size // model.patch_size) ** 2
    p2c = model.patch_size ** 2
    per_block = T * (12 * D * D + 2 * T * D) + 6 * D * D  # qkv + proj + MLP per token, q k^T and a v, adaLN
    embed = T * p2c * model.in_channels * D + (256 * D + D * D)  # patch embedding, timestep MLP
    final = T * D * p2c * model.out_channels + 2 * D * D       # final linear and its adaLN
    macs = L * per_block + embed + final                       # DiT-XL/2: 118.6 G, the paper's "118.6 Gflops"
    return 3 * 2 * macs


def load_official(path):
    """The official DiT models.py (imports timm) as a module, or None with the reason."""
    try:
        import timm  # noqa: F401
    except ImportError:
        return None, "timm is not installed in this python (run with the reference venv)"
    spec = importlib.util.spec_from_file_location("official_dit_models", os.path.join(path, "models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, None


def train_step(model, opt, diffusion, x, y, t, device, precision):
    """One timed training step (DiT's loss, backward, AdamW); returns seconds."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with tu.autocast(precision, device):
        loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = tu.resolve_precision(args.precision, device)
    if args.model is None:
        args.model = "DiT-XL/2" if device.type == "cuda" else "DiT-S/2"
    if args.batch_size is None:
        args.batch_size = 32 if device.type == "cuda" else 4
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, precision: {precision}, model: {args.model}, latents 4x{args.input_size}x{args.input_size},"
          f" batch {args.batch_size}, torch {torch.__version__}")
    diffusion = models.create_diffusion("")

    torch.manual_seed(0)
    ours = models.DiT_models[args.model](input_size=args.input_size).to(device)
    candidates = [("ours", ours)]
    if args.compile:
        torch.manual_seed(0)
        compiled = models.DiT_models[args.model](input_size=args.input_size).to(device)
        compiled.compile()  # in place, as train_dit.py --compile
        candidates.append(("compiled", compiled))
    if args.official:
        official, why = load_official(args.official)
        if official is None or args.model not in official.DiT_models:
            print(f"official DiT: skipped ({why or args.model + ' is not an official config'})")
        else:
            torch.manual_seed(0)
            ref = official.DiT_models[args.model](input_size=args.input_size).to(device)
            candidates.append(("official", ref))
    # Alternate the candidates step by step on the same batch, so a busy machine slows both alike; report medians.
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0) for n, m in candidates}
    results = {n: [] for n, _ in candidates}
    g = torch.Generator(device).manual_seed(0)
    for i in range(args.warmup + args.steps):
        x = torch.randn(args.batch_size, 4, args.input_size, args.input_size, generator=g, device=device)
        y = torch.randint(0, 1000, (args.batch_size,), generator=g, device=device)
        t = torch.randint(0, 1000, (args.batch_size,), generator=g, device=device)
        for n, m in candidates:
            m.train()
            dt = train_step(m, opts[n], diffusion, x, y, t, device, precision)
            if i >= args.warmup:
                results[n].append(dt)
    flops = train_flops_per_image(ours, args.input_size)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    for n, ts in results.items():
        sec = median(ts)
        ips = args.batch_size / sec
        line = f"{n:>8}: {1 / sec:7.3f} steps/s, {ips:8.2f} images/s ({sec * 1000:.1f} ms/step)"
        if device.type == "cuda":
            line += f", {ips * flops / 1e12:.1f} TFLOP/s"
            if peak:
                line += f", MFU {100 * ips * flops / (peak * 1e12):.1f}% of {peak:.0f} TFLOP/s bf16 peak"
        print(line)
    if "official" in results:
        r = median(results["ours"]) / median(results["official"])
        print(f"ours / official step time: {r:.3f} (< 1 is faster)")
    if "compiled" in results:
        r = median(results["compiled"]) / median(results["ours"])
        print(f"compiled / eager step time: {r:.3f} (< 1 is faster; the first {args.warmup} step(s), which compile, "
              f"are not timed)")
    print(f"training FLOPs per image (matmuls, 3 x forward): {flops / 1e9:.1f} GFLOP")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=str, default=None, help="default: DiT-XL/2 on CUDA, DiT-S/2 on CPU")
    parser.add_argument("--input-size", type=int, default=32, help="latent side (256 px / 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CUDA, 8 on CPU")
    parser.add_argument("--precision", type=str, choices=["fp32", "bf16", "fp16"], default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--official", type=str, default=None, help="folder of facebookresearch/DiT (its models.py)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--compile", action="store_true", help="also time the model torch.compile'd")
    main(parser.parse_args())
