"""
Stage 2: train a class-conditional DiT (Peebles & Xie 2023) on the latents of a frozen autoencoder (SD-VAE,
EQ-VAE, or any KL autoencoder that checkpoints.load_autoencoder reads), as in the EQ-VAE paper's DiT experiments.

    torchrun --nproc_per_node=8 train_dit.py --data /path/to/imagenet/train --vae zelaki/eq-vae --model DiT-XL/2
    torchrun --nproc_per_node=8 train_dit.py ... --cache-latents /path/to/cache   # encode once, train from disk
    python train_dit.py --preset tiny                                            # CPU, minutes, synthetic data

Default args train DiT-XL/2 with the DiT paper's hyperparameters (its train.py): AdamW lr 1e-4, no weight decay,
global batch 256, EMA 0.9999, class dropout 0.1, 1000-step linear diffusion with learned sigma.
"""
import argparse
from copy import deepcopy

import torch

import checkpoints
import data
import models
import train_utils as tu


#################################################################################
#                                  Training Loop                                #
#################################################################################

# --preset tiny: a CPU-sized run on the built-in synthetic data (every stage has one), on the latents of the tiny
# autoencoder in assets/ (or --vae: finetune_eqvae.py --preset tiny's export, say).
PRESETS = {
    "tiny": dict(data="synthetic", num_images=256, image_size=64, num_classes=10, model="DiT-T/2", vae=checkpoints.TINY_BASE["kl"],
                 global_batch_size=16, max_steps=200, log_every=20, ckpt_every=100, num_workers=0,
                 # A few hundred steps: the papers' lr 1e-4 barely moves a tiny model and EMA 0.9999 would
                 # average over 10K steps, so the EMA weights would still be the initial ones.
                 lr=1e-3, ema_decay=0.99),
}
RESUME_KEYS = ["model", "image_size", "num_classes", "global_batch_size", "vae"]  # must match to continue a run


def main(args):
    """Trains a DiT on frozen autoencoder latents."""
    # Setup DDP:
    dist = tu.setup_distributed()
    device = dist.device
    batch_size = tu.per_rank_batch(args.global_batch_size, dist.world_size)
    precision = tu.resolve_precision(args.precision, device)
    if args.model not in models.DiT_models:
        raise ValueError(f"unknown --model {args.model!r}; valid: {', '.join(models.DiT_models)}")

    # Setup an experiment folder (results/NNN-DiT-XL-2; --resume auto finds the newest run of these settings):
    exp = tu.setup_experiment(args.results_dir, args.model.replace("/", "-"), args.resume, dist, precision, args,
                              RESUME_KEYS)
    logger = exp.logger

    # Autoencoder (frozen) and the latent shape it gives at this resolution:
    vae, vae_path = tu.load_frozen_autoencoder(args.vae, "kl", exp, device, scaling_factor=args.scaling_factor,
                                               shift_factor=args.shift_factor)
    autoencoder = dict(vae=vae_path, vae_norm=vae.latent_norm())  # recorded in checkpoints: sample.py decodes with it
    tu.check_resolution(args.image_size, vae, models.DiT_models[args.model].keywords["patch_size"])
    latent_shape = vae.latent_shape(args.image_size)
    logger.info(f"Latents: {latent_shape} at {args.image_size} px, normalised as {vae.latent_norm()}")

    # Create model (the same initial weights on every rank; initialisation happens in the DiT constructor):
    with torch.random.fork_rng():
        torch.manual_seed(args.global_seed)
        model = models.DiT_models[args.model](input_size=latent_shape[1], in_channels=latent_shape[0],
                                              num_classes=args.num_classes,
                                              class_dropout_prob=args.class_dropout_prob).to(device)
    ema = deepcopy(model).eval()  # EMA of the weights, used for sampling after training
    tu.requires_grad(ema, False)
    diffusion = models.create_diffusion(timestep_respacing="")  # 1000 steps, linear schedule, learned sigma
    logger.info(f"{args.model} parameters: {tu.count_params(model):,}")

    # Setup optimizer (DiT: default Adam betas (0.9, 0.999), constant learning rate 1e-4, no weight decay):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            **tu.adam_kwargs(device))  # fused on CUDA
    scaler = tu.make_scaler(precision, device)

    # Setup data: images encoded on the fly, or latents from a cache built once (every rank encodes its shards).
    dataset = data.latent_training_set(args, vae, vae_path, dist.rank, dist.world_size, device, logger.info)
    if args.cache_latents:
        vae = vae.cpu()  # not needed on the accelerator any more
    loader = tu.ResumableLoader(dataset, batch_size=batch_size, seed=args.global_seed,
                                num_workers=args.num_workers, pin_memory=device.type == "cuda")
    if args.epochs is not None:  # DiT's --epochs: steps follow from the dataset size
        args.max_steps = args.epochs * len(loader)
    logger.info(f"Dataset: {len(dataset):,} {'cached latents' if args.cache_latents else 'images'} ({args.data}), "
                f"batch {batch_size} per rank")

    # Resume (weights, optimiser, data position, every rank's RNG), so a resumed run continues exactly; seed ranks:
    train_steps, _ = tu.resume_training(exp, args, RESUME_KEYS, loader, lr=args.lr, model=model, ema=ema, opt=opt,
                                        scaler=scaler, same=dict(vae_norm=autoencoder["vae_norm"]))

    model = tu.distributed(model, device).train()  # important: .train() enables label dropout for CFG
    if args.compile:
        # In place, around DDP (dynamo then splits the graph at DDP's gradient buckets, so all-reduces still overlap
        # the backward): fuses the residual stream, LayerNorm and adaLN modulate that otherwise run unfused in fp32.
        model.compile()

    meter = tu.TrainingMeter(["loss", "mse", "vb"], exp, args.max_steps, train_steps, args.global_batch_size, device)
    logger.info(f"Training from step {train_steps} to {args.max_steps}...")
    while train_steps < args.max_steps:
        x, y = next(loader)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad():
            if not args.cache_latents:
                x = vae.encode(x).sample()  # (B, C, h, w): a posterior sample, as DiT's train.py
            x = vae.scale_latents(x)        # unit-ish variance for the diffusion (x 0.18215 for SD-VAE)
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
        train_steps += 1

        # Log loss values (averaged over the log interval and all processes), with the training speed:
        meter.update(loss=loss, mse=loss_dict["mse"].mean(), vb=loss_dict["vb"].mean())
        if train_steps % args.log_every == 0 or train_steps == args.max_steps:
            meter.log(train_steps, epoch=loader.epoch)

        # Save DiT checkpoint:
        if train_steps % args.ckpt_every == 0 or train_steps == args.max_steps:
            tu.save_generator(exp, train_steps, args, model, ema, opt, scaler, loader, **autoencoder)
    meter.close()
    tu.log_done(exp, args.model, train_steps)
    return exp.dir


def get_args(argv=None):
    """Command-line options; defaults train DiT-XL/2 with the DiT paper's hyperparameters (EQ-VAE reports 400K steps)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tu.add_run_args(parser, PRESETS, seed=0, log_every=100, ckpt_every=50_000, keep_last=2)  # + ema/ exports
    tu.add_latent_args(parser, "DiT", models.DiT_models, "DiT-XL/2")
    args = tu.apply_preset(parser.parse_args(argv), parser, PRESETS, argv)
    if args.data is None or args.vae is None:
        parser.error("--data and --vae are required (or use --preset tiny)")
    return args


if __name__ == "__main__":
    tu.run_main(main, get_args())
