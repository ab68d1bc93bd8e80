"""
Stage 2: train a class-conditional SiT (Ma et al. 2024) on the latents of a frozen autoencoder, optionally with
REPA (Yu et al. 2025): align the hidden states after block --encoder-depth with DINOv2 features of the same images.

    torchrun --nproc_per_node=8 train_sit.py --data /path/to/imagenet/train --vae zelaki/eq-vae --model SiT-XL/2
    torchrun --nproc_per_node=8 train_sit.py ... --repa --dinov2 /path/to/dinov2_vitb14_pretrain.pth
    torchrun --nproc_per_node=8 train_sit.py ... --cache-latents /path/to/cache   # encode once, train from disk
    python train_sit.py --preset tiny [--repa]                                   # CPU, minutes, synthetic data

Default args train SiT-XL/2 as the SiT paper (its train.py): Linear path, velocity prediction, t ~ U(0, 1), AdamW
lr 1e-4 without weight decay, global batch 256, EMA 0.9999, class dropout 0.1. --repa switches to REPA's recipe
(its train.py): its clock (t = 0 is data), no learned sigma, a projector after block 8, loss = denoising + 0.5 x
alignment, gradient clipping at 1.0, no horizontal flip.
"""
import argparse
from copy import deepcopy

import torch
import torch.nn.functional as F

import checkpoints
import data
import models
import train_utils as tu


#################################################################################
#                             Training Helper Functions                         #
#################################################################################

# --preset tiny: a CPU-sized run on the built-in synthetic data (every stage has one), on the latents of the tiny
# autoencoder in assets/ (or --vae: finetune_eqvae.py --preset tiny's export, say). With --repa it uses
# DINOv2_models["dinov2_tiny"], a random-weight stand-in for DINOv2 (no weights offline): it exercises the code,
# not the method.
PRESETS = {
    "tiny": dict(data="synthetic", num_images=256, image_size=64, num_classes=10, model="SiT-T/2", vae=checkpoints.TINY_BASE["kl"],
                 global_batch_size=16, max_steps=200, log_every=20, ckpt_every=100, num_workers=0,
                 # A few hundred steps: the papers' lr 1e-4 barely moves a tiny model and EMA 0.9999 would
                 # average over 10K steps, so the EMA weights would still be the initial ones.
                 lr=1e-3, ema_decay=0.99,
                 encoder_depth=2, projector_dim=256, dinov2_model="dinov2_tiny"),
}


def load_encoder(name, path, device, logger):
    """REPA's frozen target encoder: DINOv2 with its position grid resampled as REPA does."""
    if name == "dinov2_tiny":
        with torch.random.fork_rng():
            torch.manual_seed(0)  # identical random weights on every rank and in every run (resume)
            encoder = checkpoints.load_dinov2(name, pos_embed_resample="repa")
        logger.info("REPA encoder: dinov2_tiny, a RANDOM-weight stand-in for DINOv2 (tiny preset; no weights "
                    "offline). The alignment loss runs, but aligns with meaningless features.")
    else:
        encoder = checkpoints.load_dinov2(name, path, pos_embed_resample="repa")
        logger.info(f"REPA encoder: {name} ({tu.count_params(encoder):,} parameters, frozen)")
    return encoder.to(device)


def projection_loss(z_pred, z_target):
    """
    REPA's alignment loss (REPA Eq. 3): -cos(h_phi(h_t), y*) per token, averaged over tokens and batch.
    z_pred: (B, T, D) projected hidden states of the noisy input; z_target: (B, T, D) encoder tokens of the image.
    """
    cos = (F.normalize(z_pred.float(), dim=-1) * F.normalize(z_target.float(), dim=-1)).sum(dim=-1)  # (B, T)
    return -cos.mean()


#################################################################################
#                                  Training Loop                                #
#################################################################################

RESUME_KEYS = ["model", "image_size", "num_classes", "global_batch_size", "vae", "repa", "path_type", "prediction"]


def main(args):
    """Trains a SiT (or SiT + REPA) on frozen autoencoder latents."""
    # Setup DDP:
    dist = tu.setup_distributed()
    device = dist.device
    batch_size = tu.per_rank_batch(args.global_batch_size, dist.world_size)
    precision = tu.resolve_precision(args.precision, device)
    if args.model not in models.SiT_models:
        raise ValueError(f"unknown --model {args.model!r}; valid: {', '.join(models.SiT_models)}")
    max_grad_norm = args.max_grad_norm if args.max_grad_norm is not None else (1.0 if args.repa else 0.0)

    # Setup an experiment folder (results/NNN-SiT-XL-2; --resume auto finds the newest run of these settings):
    exp = tu.setup_experiment(args.results_dir, args.model.replace("/", "-") + ("-REPA" if args.repa else ""),
                              args.resume, dist, precision, args, RESUME_KEYS)
    logger = exp.logger

    # Autoencoder (frozen) and the latent shape it gives at this resolution:
    vae, vae_path = tu.load_frozen_autoencoder(args.vae, "kl", exp, device, scaling_factor=args.scaling_factor,
                                               shift_factor=args.shift_factor)
    autoencoder = dict(vae=vae_path, vae_norm=vae.latent_norm())  # recorded in checkpoints: sample.py decodes with it
    tu.check_resolution(args.image_size, vae, models.SiT_models[args.model].keywords["patch_size"])
    latent_shape = vae.latent_shape(args.image_size)
    logger.info(f"Latents: {latent_shape} at {args.image_size} px, normalised as {vae.latent_norm()}")

    # REPA's target encoder (frozen) and the model with its projector (the same initial weights on every rank):
    encoder = load_encoder(args.dinov2_model, args.dinov2, device, logger) if args.repa else None
    repa_kwargs = dict(encoder_depth=args.encoder_depth, z_dims=[encoder.embed_dim],
                       projector_dim=args.projector_dim) if args.repa else {}
    with torch.random.fork_rng():
        torch.manual_seed(args.global_seed)
        model = models.SiT_models[args.model](input_size=latent_shape[1], in_channels=latent_shape[0],
                                              num_classes=args.num_classes, class_dropout_prob=args.class_dropout_prob,
                                              **repa_kwargs).to(device)
    ema = deepcopy(model).eval()  # EMA of the weights, used for sampling after training
    tu.requires_grad(ema, False)
    # The interpolant and what is learned. REPA's clock runs from data (t = 0) to noise (t = 1); so do the
    # checkpoints this writes with --repa, which then sample like the official REPA ones.
    transport = models.Transport(args.path_type, args.prediction, args.loss_weight, args.train_eps, args.sample_eps,
                                 time_sampling=args.time_sampling, clock="repa" if args.repa else "sit")
    logger.info(f"{args.model} parameters: {tu.count_params(model):,}"
                + (f" (projector {tu.count_params(model.projectors):,})" if args.repa else "")
                + f"; transport: {args.path_type} path, {args.prediction} prediction, {args.time_sampling} t, "
                  f"{transport.clock} clock")

    # Setup optimizer (SiT and REPA: AdamW, betas (0.9, 0.999), constant learning rate 1e-4, no weight decay):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            **tu.adam_kwargs(device))  # fused on CUDA
    scaler = tu.make_scaler(precision, device)

    # Setup data: images encoded on the fly, or latents from a cache built once. SiT flips images at random (as
    # DiT); REPA does not (its preprocessed dataset has no flip), and its encoder must see the very image the
    # latent came from, read (and center-cropped) beside its cached latent.
    dataset = data.latent_training_set(args, vae, vae_path, dist.rank, dist.world_size, device, logger.info,
                                       flip=not args.repa, with_images=args.repa)
    if args.cache_latents:
        vae = vae.cpu()  # not needed on the accelerator any more
    loader = tu.ResumableLoader(dataset, batch_size=batch_size, seed=args.global_seed,
                                num_workers=args.num_workers, pin_memory=device.type == "cuda")
    if args.epochs is not None:  # DiT's --epochs: steps follow from the dataset size
        args.max_steps = args.epochs * len(loader)
    what = "cached latents" + (" + their images for DINOv2" if args.repa else "") if args.cache_latents else "images"
    logger.info(f"Dataset: {len(dataset):,} {what} ({args.data}, {'no flip' if args.repa else 'random flip'}), "
                f"batch {batch_size} per rank")

    # Resume (weights, optimiser, data position, every rank's RNG), so a resumed run continues exactly; seed ranks:
    train_steps, _ = tu.resume_training(exp, args, RESUME_KEYS, loader, lr=args.lr, model=model, ema=ema, opt=opt,
                                        scaler=scaler, same=dict(vae_norm=autoencoder["vae_norm"]))

    model = tu.distributed(model, device).train()  # important: .train() enables label dropout for CFG
    if args.compile:
        # In place, around DDP (dynamo then splits the graph at DDP's gradient buckets, so all-reduces still overlap
        # the backward): fuses the residual stream, LayerNorm and adaLN modulate that otherwise run unfused in fp32.
        model.compile()

    meter = tu.TrainingMeter(["loss", "denoise_loss", "proj_loss", "grad_norm"], exp, args.max_steps, train_steps,
                             args.global_batch_size, device)
    logger.info(f"Training from step {train_steps} to {args.max_steps}...")
    while train_steps < args.max_steps:
        batch = next(loader)
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with torch.no_grad():
            if args.cache_latents:
                images = batch[2].to(device, non_blocking=True) if args.repa else None
            else:
                images = x
                x = vae.encode(images).sample()  # (B, C, h, w): a posterior sample, as SiT's train.py
            x = vae.scale_latents(x)  # unit-ish variance for the interpolant (x 0.18215 for SD-VAE)
            if args.repa:
                # REPA's target: DINOv2 patch tokens of the same images, (B, T, D) with T = SiT's token count.
                with tu.autocast(precision, device):
                    z_target = encoder.forward_features(models.dinov2_preprocess(images))["x_norm_patchtokens"]
        with tu.autocast(precision, device):
            terms = transport.training_losses(model, x, dict(y=y))  # ||v_theta(x_t, t) - u_t||^2 per sample
            denoise_loss = terms["loss"].mean()
            proj_loss = torch.zeros((), device=device)
            if args.repa:
                # REPA: the hidden states after block --encoder-depth, computed from the NOISY latent x_t and
                # projected by the MLP h_phi, should point where the clean image's DINOv2 tokens point.
                z_pred = terms["zs"][0]  # (B, T, D) = h_phi(h_t)
                proj_loss = projection_loss(z_pred, z_target)
            loss = denoise_loss + args.proj_coeff * proj_loss
        tu.check_finite(train_steps + 1, loss=loss, proj_loss=proj_loss)  # stop before a NaN reaches the weights
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        grad_norm = torch.zeros((), device=device)
        if max_grad_norm > 0:
            scaler.unscale_(opt)  # clip the true gradients, not the loss-scaled ones (fp16)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(opt)
        scaler.update()
        tu.update_ema(ema, tu.unwrap(model), args.ema_decay)
        train_steps += 1

        # Log loss values (averaged over the log interval and all processes), with the training speed:
        meter.update(loss=loss, denoise_loss=denoise_loss, proj_loss=proj_loss, grad_norm=grad_norm)
        if train_steps % args.log_every == 0 or train_steps == args.max_steps:
            meter.log(train_steps, epoch=loader.epoch)

        # Save SiT checkpoint:
        if train_steps % args.ckpt_every == 0 or train_steps == args.max_steps:
            tu.save_generator(exp, train_steps, args, model, ema, opt, scaler, loader, **autoencoder)
    meter.close()
    tu.log_done(exp, args.model + (" + REPA" if args.repa else ""), train_steps)
    return exp.dir


def get_args(argv=None):
    """Command-line options; defaults train SiT-XL/2 with the SiT paper's hyperparameters (EQ-VAE reports 400K steps);
    --repa adds REPA's alignment with its defaults."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tu.add_run_args(parser, PRESETS, seed=0, log_every=100, ckpt_every=50_000, keep_last=2)  # + ema/ exports
    tu.add_latent_args(parser, "SiT", models.SiT_models, "SiT-XL/2")
    g = parser.add_argument_group("SiT")
    g.add_argument("--max-grad-norm", type=float, default=None,
                   help="gradient clipping (default: 1.0 with --repa as REPA, off for SiT as SiT; 0 = off)")
    g = parser.add_argument_group("transport (SiT's options)")
    g.add_argument("--path-type", type=lambda s: {"linear": "Linear", "gvp": "GVP", "vp": "VP", "cosine": "GVP"}.get(
                   s.lower(), s), default="Linear", choices=["Linear", "GVP", "VP"],
                   help="the interpolant (any case, as SiT's Linear or REPA's linear; REPA's cosine is GVP)")
    g.add_argument("--prediction", type=str, default="velocity", choices=["velocity", "score", "noise"],
                   help="what the network predicts")
    g.add_argument("--loss-weight", type=str, default=None, choices=["velocity", "likelihood"],
                   help="loss weighting for score / noise prediction")
    g.add_argument("--train-eps", type=float, default=None, help="keep training times this far from the ends")
    g.add_argument("--sample-eps", type=float, default=None, help="keep sampling times this far from the ends")
    g.add_argument("--time-sampling", type=str, default="uniform", choices=["uniform", "logit_normal"],
                   help="t ~ U(0, 1) (SiT, REPA) or REPA's log-normal noise level")
    g = parser.add_argument_group("REPA")
    g.add_argument("--repa", action="store_true", help="add REPA's representation alignment")
    g.add_argument("--encoder-depth", type=int, default=8, help="align the hidden states after this block")
    g.add_argument("--proj-coeff", type=float, default=0.5, help="lambda, the alignment loss weight")
    g.add_argument("--projector-dim", type=int, default=2048, help="hidden width of the projector MLP")
    g.add_argument("--dinov2-model", "--enc-type", dest="dinov2_model", default="dinov2_vitb14",
                   type=lambda s: {"dinov2-vit-s": "dinov2_vits14", "dinov2-vit-b": "dinov2_vitb14",
                                   "dinov2-vit-l": "dinov2_vitl14", "dinov2-vit-g": "dinov2_vitg14"}.get(s, s),
                   choices=sorted(models.DINOv2_models), help="the target encoder (--enc-type: REPA's name, "
                   "dinov2-vit-b = dinov2_vitb14)")
    g.add_argument("--dinov2", type=str, default=None,
                   help="path to dinov2_vitb14_pretrain.pth (default: torch hub's cache, downloaded if online)")
    args = tu.apply_preset(parser.parse_args(argv), parser, PRESETS, argv)
    if args.data is None or args.vae is None:
        parser.error("--data and --vae are required (or use --preset tiny)")
    return args


if __name__ == "__main__":
    tu.run_main(main, get_args())
