"""
What REPA's alignment costs: one SiT training step (interpolant loss, backward, AdamW) beside one REPA step (the same
plus DINOv2 on the images, the projector and the cosine loss, gradient clipping), in ms per step, with the DINOv2
forward timed on its own. Random weights: speed does not depend on them. Latents are given (as from a latent
cache), so the VAE is left out of both.

    OMP_NUM_THREADS=1 python bench/bench_sit.py [--model SiT-S/2] [--dinov2 dinov2_vitb14] [--resolution 256]
                                                [--batch 2] [--iters 3]
"""
import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402
import train_utils as tu  # noqa: E402



def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    latent = args.resolution // 8
    print(f"device {device} ({where}), torch {torch.__version__}; {args.model} on {latent}x{latent}x4 latents, "
          f"{args.dinov2} at {(args.resolution // 16) * 14} px, batch {args.batch}, {args.iters} timed steps (median)")
    torch.manual_seed(0)
    encoder = models.DINOv2_models[args.dinov2](pos_embed_resample="repa").to(device).eval().requires_grad_(False)
    sit = models.SiT_models[args.model](input_size=latent).to(device).train()
    repa = models.SiT_models[args.model](input_size=latent, encoder_depth=args.encoder_depth,
                                         z_dims=[encoder.embed_dim]).to(device).train()
    opts = {"sit": torch.optim.AdamW(sit.parameters(), lr=1e-4), "repa": torch.optim.AdamW(repa.parameters(), lr=1e-4)}
    sit_transport, repa_transport = models.Transport(clock="sit"), models.Transport(clock="repa")
    x = torch.randn(args.batch, 4, latent, latent, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    images = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1

    def encode():
        with torch.no_grad():
            return encoder.forward_features(models.dinov2_preprocess(images))["x_norm_patchtokens"]

    def sit_step():
        loss = sit_transport.training_losses(sit, x, dict(y=y))["loss"].mean()
        opts["sit"].zero_grad(set_to_none=True)
        loss.backward()
        opts["sit"].step()

    def repa_step():
        z_target = encode()
        terms = repa_transport.training_losses(repa, x, dict(y=y))
        proj = -(F.normalize(terms["zs"][0], dim=-1) * F.normalize(z_target, dim=-1)).sum(-1).mean()
        loss = terms["loss"].mean() + 0.5 * proj
        opts["repa"].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(repa.parameters(), 1.0)
        opts["repa"].step()

    runs = {"SiT step": sit_step, "REPA step": repa_step, "  of which DINOv2 forward": encode}
    for precision in (["fp32", "bf16"] if device.type == "cuda" else ["fp32"]):
        times = {name: [] for name in runs}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            for fn in runs.values():
                fn()  # warm-up
            for _ in range(args.iters):  # interleaved, so load from other processes hits all alike
                for name, fn in runs.items():
                    times[name].append(tu.timed(fn, device)[0])
        ms = {name: 1000 * statistics.median(ts) for name, ts in times.items()}
        print(f"[{precision}]")
        for name, value in ms.items():
            print(f"  {name:28s} {value:9.1f} ms")
        extra = ms["REPA step"] - ms["SiT step"]
        enc = ms["  of which DINOv2 forward"]
        print(f"  REPA overhead: +{extra:.1f} ms/step (+{100 * extra / ms['SiT step']:.0f}%): DINOv2 {enc:.1f} ms, "
              f"projector + loss + clipping {extra - enc:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=str, default="SiT-S/2", choices=list(models.SiT_models))
    parser.add_argument("--dinov2", type=str, default="dinov2_vitb14", choices=list(models.DINOv2_models))
    parser.add_argument("--encoder-depth", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    main(parser.parse_args())
