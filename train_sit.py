"""
Stage 2: train a class-conditional SiT (Ma et al. 2024) on the latents of a frozen autoencoder, optionally with
REPA (Yu et al. 2025): align the hidden states after block --encoder-depth with DINOv2 features of the same images.

    torchrun --nproc_per_node=8 train_sit.py --data /path/to/imagenet/train --vae zelaki/eq-vae --model SiT-XL/2
    torchrun --nproc_per_node=8 train_sit.py ... --repa --dinov2 /path/to/dinov2_vitb14_pretrain.pth
    torchrun --nproc_per_node=8 train_sit.py ... --cache-latents /path/to/cache   # encode once, train from disk
    python train_sit.py --preset tiny [--repa]                                   # CPU, minutes, synthetic data

Default args train SiT-XL/2 as the SiT paper (REFERENCE 8): Linear path, velocity prediction, t ~ U(0, 1), AdamW
lr 1e-4 without weight decay, global batch 256, EMA 0.9999, class dropout 0.1. --repa switches to REPA's recipe
(REFERENCE 9): its clock (t = 0 is data), no learned sigma, a projector after block 8, loss = denoising + 0.5 x
alignment, gradient clipping at 1.0, no horizontal flip.
"""
import argparse
import os
from copy import deepcopy
from time import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import models
import train_utils as tu


#################################################################################
#                             Training Helper Functions                         #
#################################################################################

# --preset tiny: a CPU-sized run on the built-in synthetic data (DESIGN: every stage has one). With --repa it uses
# models.dinov2_tiny, a random-weight stand-in for DINOv2 (no weights offline): it exercises the code, not the method.
PRESETS = {
    "tiny": dict(data="synthetic", num_images=256, image_size=64, num_classes=10, model="SiT-T/2", vae="tiny",
                 global_batch_size=16, max_steps=200, log_every=20, ckpt_every=100, num_workers=0,
                 # A few hundred steps: the papers' lr 1e-4 barely moves a tiny model and EMA 0.9999 would
                 # average over 10K steps, so the EMA weights would still be the initial ones.
                 lr=1e-3, ema_decay=0.99,
                 encoder_depth=2, projector_dim=256, dinov2_model="dinov2_tiny"),
}


def load_vae(spec, image_size, device, logger):
    """--vae: a name in models.vae_configs (random weights: only for tests and the tiny demo) or a checkpoint path."""
    if spec in models.vae_configs and not os.path.exists(spec):
        with torch.random.fork_rng():  # the same random autoencoder everywhere, without resetting the run's seed
            torch.manual_seed(0)
            vae = models.build_autoencoder(spec).eval()
        logger.info(f"Autoencoder: {spec!r} built with RANDOM weights (pass --vae PATH for a trained one)")
    else:
        vae = models.load_autoencoder(spec)
        logger.info(f"Autoencoder: loaded {spec}")
    if not isinstance(vae, models.KLVAE):
        raise ValueError(f"--vae {spec}: SiT trains on the continuous latents of a KL autoencoder, got "
                         f"{type(vae).__name__}")
    with torch.no_grad():
        probe = vae.encode(torch.zeros(1, 3, image_size, image_size)).mean  # (1, C, h, w)
    return vae.to(device), tuple(probe.shape[1:])


def load_encoder(name, path, device, logger):
    """REPA's frozen target encoder: DINOv2 with its position grid resampled as REPA does."""
    if name == "dinov2_tiny":
        with torch.random.fork_rng():
            torch.manual_seed(0)  # identical random weights on every rank and in every run (resume)
            encoder = models.load_dinov2(name, pos_embed_resample="repa")
        logger.info("REPA encoder: dinov2_tiny, a RANDOM-weight stand-in for DINOv2 (tiny preset; no weights "
                    "offline). The alignment loss runs, but aligns with meaningless features.")
    else:
        encoder = models.load_dinov2(name, path, pos_embed_resample="repa")
        logger.info(f"REPA encoder: {name} ({tu.count_params(encoder):,} parameters, frozen)")
    return encoder.to(device)


def projection_loss(z_pred, z_target):
    """
    REPA's alignment loss (REPA Eq. 3): -cos(h_phi(h_t), y*) per token, averaged over tokens and batch.
    z_pred: (B, T, D) projected hidden states of the noisy input; z_target: (B, T, D) encoder tokens of the image.
    """
    cos = (F.normalize(z_pred.float(), dim=-1) * F.normalize(z_target.float(), dim=-1)).sum(dim=-1)  # (B, T)
    return -cos.mean()


class LatentsWithImages(torch.utils.data.Dataset):
    """Cached latents beside the images they were encoded from (same index, both unflipped): REPA's encoder needs
    the pixels. Item: (latent (C, h, w), label, image (3, R, R) in [-1, 1])."""

    def __init__(self, latents, images):
        if len(latents) != len(images):
            raise ValueError(f"latent cache holds {len(latents)} items but the dataset {len(images)} images")
        self.latents, self.images = latents, images

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, index):
        z, y = self.latents[index]
        return z, y, self.images[index][0]


#################################################################################
#                                  Training Loop                                #
#################################################################################

def main(args):
    """Trains a SiT (or SiT + REPA) on frozen autoencoder latents."""
    # Setup DDP and seeds (seed = global_seed * world_size + rank, as DiT/SiT):
    dist = tu.setup_distributed()
    device = dist.device
    if args.global_batch_size % dist.world_size:
        raise ValueError(f"--global-batch-size {args.global_batch_size} must be divisible by the world size "
                         f"{dist.world_size}")
    batch_size = args.global_batch_size // dist.world_size
    seed = tu.seed_everything(args.global_seed, dist.rank, dist.world_size)
    precision = tu.resolve_precision(args.precision, device)
    if args.model not in models.SiT_models:
        raise ValueError(f"unknown --model {args.model!r}; valid: {', '.join(models.SiT_models)}")
    max_grad_norm = args.max_grad_norm if args.max_grad_norm is not None else (1.0 if args.repa else 0.0)

    # Setup an experiment folder (a fixed name, so that --resume auto finds it again):
    exp_name = args.exp_name or args.model.replace("/", "-") + ("-REPA" if args.repa else "")
    exp_dir = tu.experiment_dir(args.results_dir, exp_name)
    ckpt_dir = os.path.join(exp_dir, "checkpoints")
    logger = tu.create_logger(exp_dir)
    resume_path = tu.resolve_resume(args.resume, ckpt_dir)
    if resume_path is None and tu.list_checkpoints(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints: pass --resume auto to continue that run, or "
                              f"choose another --exp-name / --results-dir")
    metrics = tu.MetricsLog(os.path.join(exp_dir, "metrics.jsonl"))
    logger.info(f"Experiment directory: {exp_dir} (rank={dist.rank}, seed={seed}, world_size={dist.world_size}, "
                f"precision={precision})")

    # Autoencoder (frozen) and the latent shape it gives at this resolution:
    vae, latent_shape = load_vae(args.vae, args.image_size, device, logger)
    tu.requires_grad(vae, False)
    if args.vae in models.vae_configs and dist.is_main:
        # Keep the random-weight autoencoder beside the run: sampling must decode with the very same weights.
        models.save_ldm(vae, os.path.join(exp_dir, f"vae-{args.vae}.ckpt"))
    scaling_factor = vae.scaling_factor
    latent_channels, latent_size = latent_shape[0], latent_shape[1]
    logger.info(f"Latents: {latent_shape} at {args.image_size} px, scaled by {scaling_factor}")

    # REPA's target encoder (frozen) and the model with its projector:
    encoder = load_encoder(args.dinov2_model, args.dinov2, device, logger) if args.repa else None
    repa_kwargs = dict(encoder_depth=args.encoder_depth, z_dims=[encoder.embed_dim],
                       projector_dim=args.projector_dim) if args.repa else {}
    model = models.SiT_models[args.model](input_size=latent_size, in_channels=latent_channels,
                                          num_classes=args.num_classes, class_dropout_prob=args.class_dropout_prob,
                                          **repa_kwargs)
    ema = deepcopy(model).to(device)  # EMA of the weights, used for sampling after training
    tu.requires_grad(ema, False)
    model = model.to(device)
    # The interpolant and what is learned. REPA's clock runs from data (t = 0) to noise (t = 1); so do the
    # checkpoints this writes with --repa, which then sample like the official REPA ones.
    transport = models.Transport(args.path_type, args.prediction, args.loss_weight, args.train_eps, args.sample_eps,
                                 time_sampling=args.time_sampling, clock="repa" if args.repa else "sit")
    logger.info(f"{args.model} parameters: {tu.count_params(model):,}"
                + (f" (projector {tu.count_params(model.projectors):,})" if args.repa else "")
                + f"; transport: {args.path_type} path, {args.prediction} prediction, {args.time_sampling} t, "
                  f"{transport.clock} clock")

    # Setup optimizer (SiT and REPA: AdamW, betas (0.9, 0.999), constant learning rate 1e-4, no weight decay):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = tu.make_scaler(precision, device)

    # Setup data: images encoded on the fly, or latents from a cache built once. SiT flips images at random (as
    # DiT); REPA does not (its preprocessed dataset has no flip), and its encoder must see the very image the
    # latent came from.
    transform = "center" if args.repa else "center_flip"
    if args.cache_latents:
        images = data.build_dataset(args.data, args.image_size, "center", num_images=args.num_images)
        data.build_latent_cache(vae, images, args.cache_latents, args.image_size, vae_name=args.vae,
                                data_name=args.data, rank=dist.rank, world_size=dist.world_size,
                                batch_size=args.cache_batch_size, shard_size=args.cache_shard_size, device=device,
                                log=logger.info)
        latents = data.LatentCache(args.cache_latents, flip=not args.repa)  # fresh z = mean + std * eps per read
        # With REPA the images are still read (and center-cropped) for DINOv2, alongside their cached latents.
        dataset = LatentsWithImages(latents, images) if args.repa else latents
        vae = vae.cpu()  # not needed on the accelerator any more
    else:
        dataset = data.build_dataset(args.data, args.image_size, transform, num_images=args.num_images)
    loader = tu.ResumableLoader(dataset, batch_size=batch_size, seed=args.global_seed,
                                num_workers=args.num_workers, pin_memory=device.type == "cuda")
    what = "cached latents" + (" + their images for DINOv2" if args.repa else "") if args.cache_latents else "images"
    logger.info(f"Dataset: {len(dataset):,} {what} ({args.data}, {'no flip' if args.repa else 'random flip'}), "
                f"batch {batch_size} per rank")

    # Resume: weights, optimiser, data position and every RNG, so a resumed run continues exactly.
    train_steps = 0
    if resume_path:
        ckpt = tu.load_checkpoint(resume_path, required=("model", "ema", "opt", "args", "step"))
        tu.check_resume_args(ckpt["args"], args, ["model", "image_size", "num_classes", "global_batch_size", "vae",
                                                  "repa", "path_type", "prediction"])
        train_steps = tu.restore_training_state(ckpt, loader, model=model, ema=ema, opt=opt, scaler=scaler)
        metrics.truncate_after(train_steps)
        tu.restore_rng_states(ckpt.get("rng"), logger)
        logger.info(f"Resumed from {resume_path} at step {train_steps}")
    else:
        tu.update_ema(ema, model, decay=0)  # EMA starts from the (synced) initial weights

    # Prepare models for training:
    if dist.world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()  # important: enables label dropout for classifier-free guidance
    ema.eval()

    def save(step):
        tu.save_training_checkpoint(ckpt_dir, step, args.keep_last, logger, model=tu.unwrap(model).state_dict(),
                                    ema=ema.state_dict(), opt=opt.state_dict(), scaler=scaler.state_dict(),
                                    loader=loader.state_dict(), args=vars(args))

    # Variables for monitoring/logging purposes:
    log_steps, running = 0, torch.zeros(4, device=device)  # loss, denoising loss, projection loss, grad norm
    encoder_time = 0.0  # seconds spent in DINOv2 (REPA's extra cost per step besides the projector)
    start_time = time()
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
            x = x * scaling_factor  # unit-ish variance for the interpolant (0.18215 for SD-VAE)
            if args.repa:
                # REPA's target: DINOv2 patch tokens of the same images, (B, T, D) with T = SiT's token count.
                t0 = time()
                with tu.autocast(precision, device):
                    z_target = encoder.forward_features(models.dinov2_preprocess(images))["x_norm_patchtokens"]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                encoder_time += time() - t0
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

        # Log loss values:
        running += torch.stack([loss.detach(), denoise_loss.detach(), proj_loss.detach(), grad_norm.detach()])
        log_steps += 1
        train_steps += 1
        if train_steps % args.log_every == 0 or train_steps == args.max_steps:
            # Measure training speed:
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time() - start_time
            steps_per_sec = log_steps / elapsed
            # Reduce loss history over all processes:
            avg = tu.all_reduce_mean(running / log_steps).tolist()
            enc_share = encoder_time / elapsed
            logger.info(f"(step={train_steps:07d}) Train Loss: {avg[0]:.4f} (denoise {avg[1]:.4f}"
                        + (f", proj {avg[2]:.4f}, grad norm {avg[3]:.3f}, DINOv2 {1000 * encoder_time / log_steps:.0f}"
                           f" ms/step = {100 * enc_share:.0f}% of the step" if args.repa else "")
                        + f"), Train Steps/Sec: {steps_per_sec:.2f}, "
                          f"Images/Sec: {steps_per_sec * args.global_batch_size:.1f}")
            metrics.write(step=train_steps, loss=avg[0], denoise_loss=avg[1], proj_loss=avg[2], grad_norm=avg[3],
                          steps_per_sec=steps_per_sec, images_per_sec=steps_per_sec * args.global_batch_size,
                          encoder_share=enc_share, epoch=loader.epoch)
            running.zero_()
            log_steps, encoder_time, start_time = 0, 0.0, time()

        # Save SiT checkpoint:
        if train_steps % args.ckpt_every == 0 or train_steps == args.max_steps:
            save(train_steps)

    model.eval()  # important: disables label dropout
    logger.info("Done!")
    tu.cleanup_distributed()


if __name__ == "__main__":
    # Default args here train SiT-XL/2 with the hyperparameters of the SiT paper (the EQ-VAE paper reports 400K
    # steps); --repa adds REPA's alignment with its defaults.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=str, choices=sorted(PRESETS), default=None,
                        help="tiny: SiT-T/2 on a tiny autoencoder's latents of 64 px synthetic data (CPU minutes)")
    parser.add_argument("--data", type=str, default=None, help="an ImageFolder root, or 'synthetic'")
    parser.add_argument("--num-images", type=int, default=None, help="use only the first N images")
    parser.add_argument("--results-dir", type=str, default="results")
    parser.add_argument("--exp-name", type=str, default=None, help="experiment folder name (default: model name)")
    parser.add_argument("--model", type=str, default="SiT-XL/2", help=f"one of {', '.join(models.SiT_models)}")
    parser.add_argument("--vae", type=str, default=None,
                        help="autoencoder checkpoint (diffusers folder, LDM file, ours) or a name in "
                             "models.vae_configs for random weights")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--class-dropout-prob", type=float, default=0.1)
    group = parser.add_argument_group("transport (SiT's options)")
    group.add_argument("--path-type", type=str, default="Linear", choices=["Linear", "GVP", "VP"])
    group.add_argument("--prediction", type=str, default="velocity", choices=["velocity", "score", "noise"])
    group.add_argument("--loss-weight", type=str, default=None, choices=["velocity", "likelihood"])
    group.add_argument("--train-eps", type=float, default=None)
    group.add_argument("--sample-eps", type=float, default=None)
    group.add_argument("--time-sampling", type=str, default="uniform", choices=["uniform", "logit_normal"],
                       help="t ~ U(0, 1) (SiT, REPA) or REPA's log-normal noise level")
    group = parser.add_argument_group("REPA")
    group.add_argument("--repa", action="store_true", help="add REPA's representation alignment")
    group.add_argument("--encoder-depth", type=int, default=8, help="align the hidden states after this block")
    group.add_argument("--proj-coeff", type=float, default=0.5, help="lambda, the alignment loss weight")
    group.add_argument("--projector-dim", type=int, default=2048)
    group.add_argument("--dinov2-model", type=str, default="dinov2_vitb14", choices=sorted(models.DINOv2_models))
    group.add_argument("--dinov2", type=str, default=None,
                       help="path to dinov2_vitb14_pretrain.pth (default: torch hub's cache, downloaded if online)")
    parser.add_argument("--max-steps", type=int, default=400_000)
    parser.add_argument("--global-batch-size", type=int, default=256)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--ema-decay", type=float, default=0.9999)
    parser.add_argument("--max-grad-norm", type=float, default=None,
                        help="gradient clipping (default: 1.0 with --repa as REPA, off for SiT as SiT; 0 = off)")
    parser.add_argument("--precision", type=str, choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--cache-latents", type=str, default=None,
                        help="folder of a latent cache: built (or completed) first, then trained from")
    parser.add_argument("--cache-batch-size", type=int, default=64)
    parser.add_argument("--cache-shard-size", type=int, default=1000, help="images per cache file")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--ckpt-every", type=int, default=50_000)
    parser.add_argument("--keep-last", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    parser.add_argument("--resume", type=str, default=None, help="'auto' (newest in the experiment folder) or a path")
    args = tu.apply_preset(parser.parse_args(), parser, PRESETS)
    if args.data is None or args.vae is None:
        parser.error("--data and --vae are required (or use --preset tiny)")
    tu.run_main(main, args)
