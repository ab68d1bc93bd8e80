"""
The one GPU check (bench/gpu_check.sh runs it): every stage at its real size, random weights only (nothing is read
or downloaded), bf16 autocast (the fine-tune also in its default fp32, and fp16), a few warm steps each, then one
table: images/s, model FLOP utilisation (MFU) against this chip's *measured* bf16 matmul peak, and peak memory.

    python bench/gpu_check.py                          # one GPU, under 10 minutes on an H100/H200
    python bench/gpu_check.py --official /path/to/DiT  # + the official DiT-XL/2 step (its models.py, needs timm)
    python bench/gpu_check.py --cpu-smoke              # the same code at toy sizes on the CPU (CI keeps it working)

Stages (real size / --cpu-smoke):
  EQ-VAE fine-tune   SD-VAE, 256 px, batch 10, L1 + LPIPS (VGG16) + KL + adaptive PatchGAN, both optimisers: in
                     fp32 (its default: TF32), fp32 with NHWC tensors + cudnn.benchmark (--channels-last
                     --cudnn-benchmark: whether they pay), bf16 and fp16 + GradScaler (the tiny KL-VAE at 64 px,
                     batch 1; all but bf16)
  DiT-XL/2           batch 32 of 4 x 32 x 32 latents, AdamW + EMA, eager and torch.compile'd (DiT-T/2, batch 4)
  SiT-XL/2 + REPA    batch 32, DINOv2 ViT-B/14 targets of the 256 px images, clip 1.0 (SiT-T/2 + dinov2_tiny)
  MaskGIT-256        batch 32 of 16 x 16 tokens, 1024 codes (maskgit-tiny)
  sample.py DiT-XL/2 sample.py's DiT sampler: 250 DDPM steps, CFG 1.5, SD-VAE decode, 32 images (DiT-T/2, 4 steps)
  FID features       evaluate.py's Inception features of 10,000 random 256 px images (16 images)
  host syncs         tests/test_host_syncs.py on the GPU: the four trainers' real loops under
                     torch.cuda.set_sync_debug_mode("error") (real-size runs only; needs pytest)
FLOPs are counted per step with torch.utils.flop_counter (matmuls, convolutions, attention; forward and backward),
so MFU = counted FLOPs / step time / measured peak. Prints figures; a stage that fails prints its error and the
check goes on (exit status 1 at the end).
"""
import argparse
import copy
import os
import random
import statistics
import subprocess
import sys
import time
import traceback
from types import SimpleNamespace

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402
import finetune_eqvae as fe  # noqa: E402
import models  # noqa: E402
import sample  # noqa: E402
import train_maskgit  # noqa: E402
import train_sit  # noqa: E402
import train_utils as tu  # noqa: E402
from bench_dit import load_official, train_flops_per_image  # noqa: E402


#################################################################################
#                           Measuring: time, FLOPs, memory                      #
#################################################################################

def matmul_peak(device, smoke):
    """Measured dense matmul throughput (FLOP/s): bf16 8192^3 on a GPU (tensor cores), fp32 512^3 on the CPU."""
    n, dtype = (512, torch.float32) if smoke else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 5 if smoke else 50
    sec, _ = tu.timed(lambda: [a @ b for _ in range(reps)], device)
    return 2 * n ** 3 * reps / sec


def count_flops(fn):
    """FLOPs of one call of fn (forward and backward matmuls, convolutions and attention), by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(step, device, warmup, steps, flops_fn=None):
    """Median seconds of `steps` calls of step() after `warmup`, FLOPs of one (flops_fn or step, uncounted in the
    time) and peak memory (GiB, CUDA) over the whole stage."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    times = [tu.timed(step, device)[0] for _ in range(steps)]
    flops = count_flops(flops_fn or step)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return statistics.median(times), flops, peak


def on(device):
    """Build modules directly on the device: initialising DiT-XL/2's 675M parameters on the CPU takes long."""
    return torch.device(device)


#################################################################################
#                                     Stages                                    #
#################################################################################

def stage_finetune(cfg, precision="fp32", channels_last=False):
    """One EQ-VAE optimiser step as finetune_eqvae.main takes it (one micro-batch): tau, eqvae_losses with LPIPS and
    the adaptive GAN weight, the generator backward, the PatchGAN hinge loss and backward, both Adam steps; in fp32
    (the fine-tune's default, TF32 matmuls, as the official run), bf16, or fp16 with one GradScaler for both
    optimisers and the adaptive weight at its scale. channels_last: NHWC tensors and cudnn.benchmark (the
    fine-tune's --channels-last --cudnn-benchmark), to decide whether they pay."""
    device, smoke = cfg.device, cfg.smoke
    res, batch = (64, 1) if smoke else (256, 10)
    fp16 = precision == "fp16"
    torch.manual_seed(0)
    with on(device):
        vae = models.KLVAE_models["tiny" if smoke else "sd-vae"]().train()
        disc = models.NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3).apply(models.weights_init)
        lpips = models.LPIPS().train()  # random VGG16 + lin layers (the released ones' cost)
    model = fe.TauAutoencoder(vae)
    opt_ae = torch.optim.Adam(vae.parameters(), lr=1e-5, betas=(0.5, 0.9), **tu.adam_kwargs(device))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-5, betas=(0.5, 0.9), **tu.adam_kwargs(device))
    # Started at the scale SD-VAE's gradients settle at (its last-layer nll gradient reaches 2e4), so the few timed
    # steps are not the ones GradScaler skips while it comes down from its default 65536.
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0, enabled=fp16)
    one = torch.ones((), device=device)
    latent = vae.latent_shape(res)[1:]
    x = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    if channels_last:
        for m in (vae, disc, lpips):
            m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = channels_last
    rng = random.Random(0)

    def step():
        tau = fe.sample_tau(rng, latent)
        tu.requires_grad(disc, False)
        with tu.autocast(precision, device):
            out = fe.eqvae_losses(model, x, tau, lpips, disc, vae.get_last_layer(),
                                  grad_scale=scaler.scale(one) if fp16 else None)
        scaler.scale(out["loss"]).backward()
        tu.requires_grad(disc, True)
        with tu.autocast(precision, device):
            d, _, _ = fe.discriminator_loss(disc, out["target"], out["x_hat"])
        scaler.scale(d).backward()
        scaler.step(opt_ae)
        scaler.step(opt_d)
        scaler.update()
        opt_ae.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        return out

    sec, flops, peak = measure(step, device, cfg.warmup, cfg.steps)
    out = step()
    torch.backends.cudnn.benchmark = False
    note = f"d_weight {float(out['d_weight']):.3g}, loss scale {scaler.get_scale():g}" if fp16 else ""
    if not all(torch.isfinite(out[k]).all() for k in ("loss", "d_weight")):
        raise RuntimeError(f"non-finite loss or adaptive weight ({note})")
    return dict(name=f"EQ-VAE fine-tune {precision}{' NHWC+bench' if channels_last else ''}", images=batch,
                sec=sec, flops=flops, peak=peak,
                config=f"{'tiny KL' if smoke else 'SD-VAE'} {res}px b{batch} +LPIPS +GAN", note=note)


def _dit_parts(cfg, official=None):
    smoke, device = cfg.smoke, cfg.device
    name, size, batch = ("DiT-T/2", 8, 4) if smoke else ("DiT-XL/2", 32, 32)
    torch.manual_seed(0)
    with on(device):
        table = official.DiT_models if official is not None else models.DiT_models
        model = table[name](input_size=size).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, **tu.adam_kwargs(device))
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, 4, size, size, generator=g, device=device)
    y = torch.randint(0, 1000, (batch,), generator=g, device=device)
    return name, size, batch, model, ema, opt, x, y


def stage_dit(cfg, compiled=False, official_path=None):
    """One DiT training step as train_dit.py takes it: DiT's loss (eps MSE + VLB), backward, AdamW, EMA."""
    device = cfg.device
    official = None
    if official_path:
        official, why = load_official(official_path)
        if official is None:
            raise RuntimeError(f"official DiT not loaded: {why}")
    name, size, batch, model, ema, opt, x, y = _dit_parts(cfg, official)
    diffusion = models.create_diffusion("")
    if compiled:
        model.compile(backend=cfg.compile_backend)  # in place, as train_dit.py --compile

    def step(net=model):
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
        with tu.autocast(cfg.precision, device):
            loss = diffusion.training_losses(net, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tu.update_ema(ema, model, 0.9999)

    start = time.time()
    step()  # the first step compiles (timed here, not below)
    first = time.time() - start
    # FLOPs of the same math through the eager forward (model.forward bypasses the compiled call).
    sec, flops, peak = measure(step, device, cfg.warmup, cfg.steps, flops_fn=lambda: step(model.forward))
    label = name + (" (official)" if official else " compiled" if compiled else "")
    notes = [f"first step {first:.0f} s"] if compiled else []
    if official is None:
        notes.append(f"analytic {train_flops_per_image(model, size) * batch / 1e12:.3g} TF (matmuls)")
    return dict(name=label, config=f"b{batch} latents 4x{size}x{size}", images=batch, sec=sec, flops=flops,
                peak=peak, note="; ".join(notes))


def stage_repa(cfg):
    """One SiT + REPA training step as train_sit.py --repa takes it: DINOv2 targets of the images, REPA's transport,
    denoising + 0.5 x alignment loss, clip 1.0, AdamW, EMA."""
    device, smoke = cfg.device, cfg.smoke
    name, enc, res, batch = ("SiT-T/2", "dinov2_tiny", 64, 4) if smoke else ("SiT-XL/2", "dinov2_vitb14", 256, 32)
    size = res // 8
    torch.manual_seed(0)
    with on(device):
        encoder = models.DINOv2_models[enc]().eval().requires_grad_(False)
        model = models.SiT_models[name](input_size=size, encoder_depth=2 if smoke else 8,
                                        z_dims=[encoder.embed_dim], projector_dim=256 if smoke else 2048).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, **tu.adam_kwargs(device))
    transport = models.Transport("Linear", "velocity", clock="repa")
    images = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    x = torch.randn(batch, 4, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.no_grad(), tu.autocast(cfg.precision, device):
            z_target = encoder.forward_features(models.dinov2_preprocess(images))["x_norm_patchtokens"]
        with tu.autocast(cfg.precision, device):
            terms = transport.training_losses(model, x, dict(y=y))
            loss = terms["loss"].mean() + 0.5 * train_sit.projection_loss(terms["zs"][0], z_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tu.update_ema(ema, model, 0.9999)

    sec, flops, peak = measure(step, device, cfg.warmup, cfg.steps)
    return dict(name=f"{name} + REPA", config=f"b{batch} {res}px, {enc}", images=batch, sec=sec, flops=flops,
                peak=peak)


def stage_maskgit(cfg):
    """One MaskGIT training step as train_maskgit.py takes it: arccos masking, label drop, cross-entropy with label
    smoothing over all tokens, clip 1.0, AdamW (0.9, 0.96), EMA."""
    device, smoke = cfg.device, cfg.smoke
    name, batch = ("maskgit-tiny", 4) if smoke else ("maskgit-256", 32)
    torch.manual_seed(0)
    with on(device):
        model = models.MaskGIT_models[name]().train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=1e-5,
                            **tu.adam_kwargs(device))
    side, K = model.config["input_size"], model.config["codebook_size"]
    code = torch.randint(0, K, (batch, side, side), device=device)
    y = torch.randint(0, model.config["num_classes"], (batch,), device=device)

    def step():
        drop = torch.rand(batch, device=device) < 0.1
        masked, _ = models.maskgit_random_mask(code, model.mask_token_id)
        with tu.autocast(cfg.precision, device):
            logits = model(masked, y, drop)
        loss = train_maskgit.maskgit_loss(logits, code)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tu.update_ema(ema, model, 0.9999)

    sec, flops, peak = measure(step, device, cfg.warmup, cfg.steps)
    return dict(name=name, config=f"b{batch} {side}x{side} tokens, {K} codes", images=batch, sec=sec, flops=flops,
                peak=peak)


def stage_sample(cfg):
    """sample.py's DiT generator (setup_dit: respaced DDPM with CFG, then the VAE decode) on random weights."""
    device, smoke = cfg.device, cfg.smoke
    name, res, n, steps = ("DiT-T/2", 64, 2, 4) if smoke else ("DiT-XL/2", 256, 32, 250)
    torch.manual_seed(0)
    with on(device):
        vae = models.KLVAE_models["tiny" if smoke else "sd-vae"]().eval()
        state = models.DiT_models[name](input_size=res // 8).state_dict()

    def generator(num_steps):
        args = SimpleNamespace(model=name, image_size=res, num_classes=1000, ckpt="random weights", sampler=None,
                               num_sampling_steps=num_steps, cfg_scale=None, guidance_low=None, guidance_high=None,
                               cfg_all_channels=False, precision=cfg.precision)
        with on(device):  # setup_dit builds the model where torch puts new tensors: here, on the device
            return sample.setup_dit(args, vae, device, state, {})

    labels = torch.arange(n, device=device) % 1000
    gen = torch.Generator(device).manual_seed(0)
    if not smoke:
        generator(2)(labels, gen)  # warm-up: cuBLAS / cuDNN plans, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec, _ = tu.timed(lambda: generator(steps)(labels, gen), device)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    # FLOPs: each sampling step is one guided network call on 2n rows; the decode comes once.
    two, three = count_flops(lambda: generator(2)(labels, gen)), count_flops(lambda: generator(3)(labels, gen))
    flops = two + (three - two) * (steps - 2)
    return dict(name=f"sample.py {name}", config=f"{n} images, ddpm{steps}, cfg 1.5, {res}px decode", images=n,
                sec=sec, flops=flops, peak=peak)


class _RandomImages:
    """An in-memory image set with the interface evaluate.extract_features reads (len, read(start, end))."""

    def __init__(self, n, side):
        self.array = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)

    def __len__(self):
        return len(self.array)

    def read(self, start, end):
        return self.array[start:end]


def stage_fid(cfg):
    """evaluate.py's FID / sFID / IS features (the 2015 Inception, ADM protocol) of random 256 px images."""
    device, smoke = cfg.device, cfg.smoke
    n, batch = (2, 2) if smoke else (10_000, 500)
    torch.manual_seed(0)
    model = evaluate.FIDInceptionV3().to(device).eval().requires_grad_(False)
    images = _RandomImages(n, 256)
    dist = SimpleNamespace(device=device, is_main=True, rank=0, world_size=1)
    if not smoke:
        evaluate.extract_features(_RandomImages(batch, 256), model, dist, batch_size=batch)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec, _ = tu.timed(lambda: evaluate.extract_features(images, model, dist, batch_size=batch), device)
    with torch.no_grad():
        per_batch = count_flops(lambda: model(torch.from_numpy(images.read(0, batch)).to(device).permute(0, 3, 1, 2)))
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return dict(name="FID features", config=f"{n} images 256px, batch {batch}, fp32/TF32", images=n, sec=sec,
                flops=per_batch * n / batch, peak=peak)


def stage_syncs(cfg):
    """The trainers' real loops (tiny presets) on this GPU with every synchronising CUDA call an error."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        raise RuntimeError("pytest is not installed (pip install -r requirements-test.txt)") from None
    start = time.time()
    test = os.path.join(ROOT, "tests", "test_host_syncs.py")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", test], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0:
        raise RuntimeError("tests/test_host_syncs.py failed on the GPU:\n" + out.stdout[-3000:])
    return dict(name="host syncs", config="4 trainers' loops, sync debug 'error'", images=None, sec=None,
                flops=None, peak=None, note=f"{out.stdout.strip().splitlines()[-1]} in {time.time() - start:.0f} s")


#################################################################################
#                                     Main                                      #
#################################################################################

def row(r, peak_flops):
    if r["sec"] is None:
        return f"| {r['name']} | {r['config']} | - | - | - | - | - | {r.get('note', '')} |"
    img = f"{r['images'] / r['sec']:.1f}" if r.get("images") else "-"
    tf = f"{r['flops'] / 1e12:.3g}" if r.get("flops") else "-"
    mfu = f"{100 * r['flops'] / r['sec'] / peak_flops:.1f}" if r.get("flops") else "-"
    mem = f"{r['peak']:.1f}" if r.get("peak") is not None else "-"
    cells = [r["name"], r["config"], f"{1000 * r['sec']:.1f}", img, tf, mfu, mem, r.get("note", "")]
    return "| " + " | ".join(cells) + " |"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (what CI runs)")
    p.add_argument("--official", default=None, help="a facebookresearch/DiT checkout: time its DiT-XL/2 step too")
    p.add_argument("--only", default=None, help="comma-separated stage names to run (default: all)")
    p.add_argument("--budget-s", type=float, default=540, help="skip the stages left once this much time has passed")
    args = p.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke for the CPU version")
    device = torch.device("cpu" if smoke else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as tu.setup_distributed: the trainers' setting
        torch.backends.cudnn.allow_tf32 = True
    # CPU smoke in fp32: bf16 convolutions are emulated, far slower, on CPUs without AMX (tests/ cover bf16).
    cfg = SimpleNamespace(device=device, smoke=smoke, warmup=1 if smoke else 3, steps=1 if smoke else 5,
                          precision="fp32" if smoke else "bf16",
                          # CPU smoke: dynamo's tracing without inductor's C++ compile (tests/test_dit.py compiles
                          # with inductor); the real check compiles as train_dit.py --compile does.
                          compile_backend="aot_eager" if smoke else "inductor")
    start = time.time()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    peak = matmul_peak(device, smoke)
    print(f"# gpu_check: {name}, torch {torch.__version__}, {'toy sizes (--cpu-smoke)' if smoke else 'real sizes'}")
    print(f"measured {'bf16' if not smoke else 'fp32'} matmul peak: {peak / 1e12:.2f} TFLOP/s (MFU is against it"
          f"{'; on the CPU at toy sizes only a sign of life' if smoke else ''})\n")
    stages = [("finetune", stage_finetune)]
    if not smoke:  # bf16 convolutions on a CPU are emulated: too slow for the smoke run
        stages.append(("finetune-bf16", lambda c: stage_finetune(c, "bf16")))
    stages += [("finetune-nhwc", lambda c: stage_finetune(c, "fp32", channels_last=True)),
               ("finetune-fp16", lambda c: stage_finetune(c, "fp16")),
               ("dit", stage_dit), ("dit-compiled", lambda c: stage_dit(c, compiled=True)),
               ("repa", stage_repa), ("maskgit", stage_maskgit), ("sample", stage_sample), ("fid", stage_fid)]
    if args.official:
        at = [k for k, _ in stages].index("dit-compiled") + 1
        stages.insert(at, ("dit-official", lambda c: stage_dit(c, official_path=args.official)))
    if not smoke:
        stages.append(("syncs", stage_syncs))
    if args.only:
        wanted = args.only.split(",")
        stages = [s for s in stages if s[0] in wanted]
    rows, failed = [], []
    for key, fn in stages:
        if time.time() - start > args.budget_s:
            rows.append(f"| {key} | skipped: past the {args.budget_s:.0f} s budget | | | | | | |")
            continue
        t0 = time.time()
        try:
            r = fn(cfg)
            r["note"] = (r.get("note") or "") + f"{'; ' if r.get('note') else ''}stage {time.time() - t0:.0f} s"
            rows.append(row(r, peak))
        except Exception as e:  # a failing stage is reported; the others still run
            traceback.print_exc()
            failed.append(key)
            rows.append(f"| {key} | FAILED: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''} "
                        f"| | | | | | |")
        print(rows[-1], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n| stage | config | ms/step | img/s | TFLOP/step | MFU % | peak GiB | notes |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\ntotal {time.time() - start:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
