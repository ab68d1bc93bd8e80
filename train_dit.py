"""
Stage 2: train a class-conditional DiT (Peebles & Xie 2023) on the latents of a frozen autoencoder (SD-VAE,
EQ-VAE, or any KL autoencoder that models.load_autoencoder reads), as in the EQ-VAE paper's DiT experiments.

    torchrun --nproc_per_node=8 train_dit.py --data /path/to/imagenet/train --vae zelaki/eq-vae --model DiT-XL/2
    torchrun --nproc_per_node=8 train_dit.py ... --cache-latents /path/to/cache   # encode once, train from disk
    python train_dit.py --preset tiny                                            # CPU, minutes, synthetic data

Default args train DiT-XL/2 with the paper's hyperparameters (REFERENCE 7): AdamW lr 1e-4, no weight decay,
global batch 256, EMA 0.9999, class dropout 0.1, 1000-step linear diffusion with learned sigma.
"""
import argparse
import os
from copy import deepcopy
from time import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import models
import train_utils as tu


#################################################################################
#                             Training Helper Functions                         #
#################################################################################

# --preset tiny: a CPU-sized run on the built-in synthetic data (DESIGN: every stage has one).
PRESETS = {
    "tiny": dict(data="synthetic", num_images=256, image_size=64, num_classes=10, model="DiT-T/2", vae="tiny",
                 global_batch_size=16, max_steps=200, log_every=20, ckpt_every=100, num_workers=0,
                 # A few hundred steps: the papers' lr 1e-4 barely moves a tiny model and EMA 0.9999 would
                 # average over 10K steps, so the EMA weights would still be the initial ones.
                 lr=1e-3, ema_decay=0.99),
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
        raise ValueError(f"--vae {spec}: DiT trains on the continuous latents of a KL autoencoder, got "
                         f"{type(vae).__name__}")
    with torch.no_grad():
        probe = vae.encode(torch.zeros(1, 3, image_size, image_size)).mean  # (1, C, h, w)
    return vae.to(device), tuple(probe.shape[1:])


#################################################################################
#                                  Training Loop                                #
#################################################################################

def main(args):
    """Trains a DiT on frozen autoencoder latents."""
    # Setup DDP and seeds (seed = global_seed * world_size + rank, as DiT):
    dist = tu.setup_distributed()
    device = dist.device
    if args.global_batch_size % dist.world_size:
        raise ValueError(f"--global-batch-size {args.global_batch_size} must be divisible by the world size "
                         f"{dist.world_size}")
    batch_size = args.global_batch_size // dist.world_size
    seed = tu.seed_everything(args.global_seed, dist.rank, dist.world_size)
    precision = tu.resolve_precision(args.precision, device)
    if args.model not in models.DiT_models:
        raise ValueError(f"unknown --model {args.model!r}; valid: {', '.join(models.DiT_models)}")

    # Setup an experiment folder (a fixed name, so that --resume auto finds it again):
    exp_name = args.exp_name or args.model.replace("/", "-")  # e.g. DiT-XL/2 -> DiT-XL-2
    exp_dir = tu.experiment_dir(args.results_dir, exp_name)
    ckpt_dir = os.path.join(exp_dir, "checkpoints")
    logger = tu.create_logger(exp_dir)
    resume_path = tu.resolve_resume(args.resume, ckpt_dir)
    if resume_path is None and tu.list_checkpoints(ckpt_dir):
        # Never overwrite a previous run's checkpoints by starting afresh in its folder.
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints: pass --resume auto to continue that run, or "
                              f"choose another --exp-name / --results-dir")
    metrics = tu.MetricsLog(os.path.join(exp_dir, "metrics.jsonl"))
    logger.info(f"Experiment directory: {exp_dir} (rank={dist.rank}, seed={seed}, world_size={dist.world_size}, "
                f"precision={precision})")

    # Autoencoder (frozen) and the latent shape it gives at this resolution:
    vae, latent_shape = load_vae(args.vae, args.image_size, device, logger)
    tu.requires_grad(vae, False)
    vae_copy = os.path.join(exp_dir, f"vae-{args.vae}.ckpt")
    if args.vae in models.vae_configs and dist.is_main and not os.path.exists(vae_copy):
        # Keep the random-weight autoencoder beside the run: sampling must decode with the very same weights.
        models.save_ldm(vae, vae_copy)
        logger.info(f"Saved that autoencoder to {vae_copy} (sample.py finds it there)")
    scaling_factor = vae.scaling_factor
    latent_channels, latent_size = latent_shape[0], latent_shape[1]
    logger.info(f"Latents: {latent_shape} at {args.image_size} px, scaled by {scaling_factor}")

    # Create model (initialisation happens in the DiT constructor):
    model = models.DiT_models[args.model](input_size=latent_size, in_channels=latent_channels,
                                          num_classes=args.num_classes, class_dropout_prob=args.class_dropout_prob)
    ema = deepcopy(model).to(device)  # EMA of the weights, used for sampling after training
    tu.requires_grad(ema, False)
    model = model.to(device)
    diffusion = models.create_diffusion(timestep_respacing="")  # 1000 steps, linear schedule, learned sigma
    logger.info(f"{args.model} parameters: {tu.count_params(model):,}")

    # Setup optimizer (DiT: default Adam betas (0.9, 0.999), constant learning rate 1e-4, no weight decay):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = tu.make_scaler(precision, device)

    # Setup data: images encoded on the fly, or latents from a cache built once.
    if args.cache_latents:
        # Every rank encodes its own shards (image and mirror); a partial cache is completed, not rebuilt.
        images = data.build_dataset(args.data, args.image_size, "center", num_images=args.num_images)
        data.build_latent_cache(vae, images, args.cache_latents, args.image_size, vae_name=args.vae,
                                data_name=args.data, rank=dist.rank, world_size=dist.world_size,
                                batch_size=args.cache_batch_size, shard_size=args.cache_shard_size, device=device,
                                log=logger.info)
        dataset = data.LatentCache(args.cache_latents)  # items: fresh flip and z = mean + std * eps per read
        vae = vae.cpu()  # not needed on the accelerator any more
    else:
        dataset = data.build_dataset(args.data, args.image_size, "center_flip", num_images=args.num_images)
    loader = tu.ResumableLoader(dataset, batch_size=batch_size, seed=args.global_seed,
                                num_workers=args.num_workers, pin_memory=device.type == "cuda")
    logger.info(f"Dataset: {len(dataset):,} {'cached latents' if args.cache_latents else 'images'} ({args.data}), "
                f"batch {batch_size} per rank")

    # Resume: weights, optimiser, data position and every RNG, so a resumed run continues exactly.
    train_steps = 0
    if resume_path:
        ckpt = tu.load_checkpoint(resume_path, required=("model", "ema", "opt", "args", "step"))
        tu.check_resume_args(ckpt["args"], args, ["model", "image_size", "num_classes", "global_batch_size", "vae"])
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
    log_steps, running = 0, torch.zeros(3, device=device)  # loss, mse, vb
    start_time = time()
    logger.info(f"Training from step {train_steps} to {args.max_steps}...")
    while train_steps < args.max_steps:
        x, y = next(loader)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad():
            if not args.cache_latents:
                x = vae.encode(x).sample()  # (B, C, h, w): a posterior sample, as DiT's train.py
            x = x * scaling_factor          # unit-ish variance for the diffusion (0.18215 for SD-VAE)
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
        with tu.autocast(precision, device):
            loss_dict = diffusion.training_losses(model, x, t, dict(y=y))  # eps MSE + VLB (learned sigma)
        loss = loss_dict["loss"].mean()
        tu.check_finite(train_steps + 1, loss=loss)  # stop before a NaN reaches the weights or a checkpoint
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        tu.update_ema(ema, tu.unwrap(model), args.ema_decay)

        # Log loss values:
        running += torch.stack([loss.detach(), loss_dict["mse"].mean().detach(), loss_dict["vb"].mean().detach()])
        log_steps += 1
        train_steps += 1
        if train_steps % args.log_every == 0 or train_steps == args.max_steps:
            # Measure training speed:
            if device.type == "cuda":
                torch.cuda.synchronize()
            steps_per_sec = log_steps / (time() - start_time)
            # Reduce loss history over all processes:
            avg = tu.all_reduce_mean(running / log_steps).tolist()
            logger.info(f"(step={train_steps:07d}) Train Loss: {avg[0]:.4f} (mse {avg[1]:.4f}, vb {avg[2]:.4f}), "
                        f"Train Steps/Sec: {steps_per_sec:.2f}, Images/Sec: {steps_per_sec * args.global_batch_size:.1f}")
            metrics.write(step=train_steps, loss=avg[0], mse=avg[1], vb=avg[2], steps_per_sec=steps_per_sec,
                          images_per_sec=steps_per_sec * args.global_batch_size, epoch=loader.epoch)
            running.zero_()
            log_steps, start_time = 0, time()

        # Save DiT checkpoint:
        if train_steps % args.ckpt_every == 0 or train_steps == args.max_steps:
            save(train_steps)

    model.eval()  # important: disables label dropout
    logger.info("Done!")
    tu.cleanup_distributed()


def get_args(argv=None):
    """Command-line options; defaults train DiT-XL/2 with the DiT paper's hyperparameters (EQ-VAE reports 400K steps)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=str, choices=sorted(PRESETS), default=None,
                        help="tiny: DiT-T/2 on a tiny autoencoder's latents of 64 px synthetic data (CPU minutes)")
    parser.add_argument("--data", type=str, default=None, help="an ImageFolder root, or 'synthetic'")
    parser.add_argument("--num-images", type=int, default=None, help="use only the first N images")
    parser.add_argument("--results-dir", type=str, default="results")
    parser.add_argument("--exp-name", type=str, default=None, help="experiment folder name (default: model name)")
    parser.add_argument("--model", type=str, default="DiT-XL/2", help=f"one of {', '.join(models.DiT_models)}")
    parser.add_argument("--vae", type=str, default=None,
                        help="autoencoder checkpoint (diffusers folder, LDM file, ours) or a name in models.vae_configs "
                             "for random weights")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--class-dropout-prob", type=float, default=0.1)
    parser.add_argument("--max-steps", type=int, default=400_000)
    parser.add_argument("--global-batch-size", type=int, default=256)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--ema-decay", type=float, default=0.9999)
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
    args = tu.apply_preset(parser.parse_args(argv), parser, PRESETS, argv)
    if args.data is None or args.vae is None:
        parser.error("--data and --vae are required (or use --preset tiny)")
    return args


if __name__ == "__main__":
    tu.run_main(main, get_args())
