"""
Train MaskGIT (stage 2) on the tokens of a frozen VQ-GAN, as the EQ-VAE paper does for its VQ-GAN results (gFID 6.80
after 300 epochs on the original VQ-GAN's tokens; 6.80 after 130 and 5.91 after 300 on EQ-VAE's). The recipe is that of
the PyTorch reproduction the paper uses, valeoai/Maskgit-pytorch v1.

    torchrun --nproc_per_node=8 train_maskgit.py --data /imagenet/train --vqgan pretrained_maskgit/VQGAN/last.ckpt
    python train_maskgit.py --preset tiny                  # 64 px synthetic data, tiny VQ-GAN and transformer, CPU

Default arguments are the reference's: arccos masking, cross-entropy with label smoothing 0.1 over all tokens, AdamW
(0.9, 0.96) with weight decay 1e-5, lr 1e-4 with 2,500 warmup steps, gradient clip 1.0, label drop 0.1 for
classifier-free guidance, mixed precision, batch 256, 300 epochs. Tokens are computed once (image and mirror image)
and cached on disk, so the VQ-GAN never runs inside the training loop.
"""
import argparse
import copy
import os

import torch
import torch.nn.functional as F

import checkpoints
import data
import models
import train_utils as tu


#################################################################################
#                             Training Helper Functions                         #
#################################################################################

def maskgit_loss(logits, code, label_smoothing=0.1):
    """
    Cross-entropy over *all* tokens, masked or not, with label smoothing over the K + 1 outputs: the reference's
    criterion on pred.reshape(-1, K + 1) (visible tokens are learnt as a copy task, [MASK] is a wrong class).
    logits: (B, N, K + 1), code: (B, h, w) long with h * w = N -> scalar.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), code.reshape(-1),
                           label_smoothing=label_smoothing)


def lr_at(step, args):
    """Linear warmup from 0 to --lr over --warmup steps, then constant (the reference's adapt_learning_rate)."""
    return args.lr * min(1.0, step / args.warmup) if args.warmup > 0 else args.lr


#################################################################################
#                                 Training Loop                                 #
#################################################################################

RESUME_KEYS = ["model", "resolution", "global_batch_size", "mask_schedule", "vqgan"]


def main(args):
    """Train a MaskGIT transformer on cached VQ-GAN tokens."""
    # Setup DDP:
    dist = tu.setup_distributed()
    rank, world, device = dist.rank, dist.world_size, dist.device
    batch = tu.per_rank_batch(args.global_batch_size, world)
    precision = tu.resolve_precision(args.precision, device)

    # Setup an experiment folder:
    exp = tu.setup_experiment(args.results_dir, args.model, args.resume, dist, precision, args, RESUME_KEYS)
    logger = exp.logger

    # Tokenise the dataset once (image + mirror), or reuse the cache, with the frozen tokeniser --vqgan (a checkpoint,
    # or the name of a VQGAN_models config for random weights: a pipeline check).
    if args.vqgan is None:
        raise ValueError("--vqgan is required: a VQ-GAN checkpoint (taming / MaskGIT-pytorch last.ckpt, or one from "
                         "finetune_eqvae.py --model vq); or use --preset tiny")
    vq, vq_name = tu.load_frozen_autoencoder(args.vqgan, "vq", exp, device, seed=args.global_seed)
    tu.check_resolution(args.resolution, vq, flag="--resolution")
    dataset = data.build_dataset(args.data, args.resolution, "center", num_images=args.num_images)
    cache_dir = args.cache or os.path.join(
        args.results_dir, "token-cache", f"{os.path.basename(os.path.normpath(args.data))}-{args.resolution}px-"
                                         f"{data.vae_fingerprint(vq)[:12]}")
    # Every rank tokenises its own shards; a partial cache is completed, not rebuilt. Unlike the reference, which
    # tokenises inside its loop, the cache holds one crop per image, the ADM center crop (see data.py, Caches).
    meta = data.build_token_cache(vq, dataset, cache_dir, args.resolution, vqgan_name=vq_name, data_name=args.data,
                                  rank=rank, world_size=world, batch_size=args.cache_batch_size,
                                  shard_size=args.cache_shard_size, device=device, log=logger.info,
                                  num_workers=args.num_workers)
    del vq  # the VQ-GAN is not needed any more: training reads tokens only
    tokens_ds = data.TokenCache(cache_dir, flip=True)  # items: the image's or (random flip) the mirror's tokens
    num_classes = meta["num_classes"] or int(tokens_ds.labels.max()) + 1
    loader = tu.ResumableLoader(tokens_ds, batch_size=batch, seed=args.global_seed, num_workers=args.num_workers,
                                pin_memory=device.type == "cuda")
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * len(loader)
    h, w = meta["grid"]
    if h != w:
        raise SystemExit(f"MaskTransformer needs a square token grid, the VQ-GAN gives {h}x{w}")
    logger.info(f"Tokens: {len(tokens_ds):,} images -> {h}x{w} tokens of {meta['codebook_size']} codes, "
                f"{num_classes} classes; global batch {args.global_batch_size} ({batch} per process); "
                f"{len(loader):,} steps/epoch, {max_steps:,} steps")

    # Create model (seeded identically on every rank):
    with torch.random.fork_rng():
        torch.manual_seed(args.global_seed)
        model = models.build(models.MaskGIT_models, args.model, input_size=h, codebook_size=meta["codebook_size"],
                             num_classes=num_classes).to(device)
    ema = copy.deepcopy(model).eval()  # EMA of the weights (our addition, as DiT's; the reference keeps none)
    tu.requires_grad(ema, False)
    logger.info(f"MaskGIT parameters: {tu.count_params(model):,} ({model.config})")

    # Setup optimizer (the reference: AdamW, betas (0.9, 0.96), weight decay 1e-5 on every parameter):
    opt = torch.optim.AdamW(model.parameters(), lr=lr_at(0, args), betas=(0.9, 0.96), weight_decay=args.weight_decay,
                            **tu.adam_kwargs(device))  # fused on CUDA
    scaler = tu.make_scaler(precision, device)

    # Resume (model, EMA, optimiser, scaler, step, data position, every rank's RNG); per-rank seeds for the loop:
    step, ckpt = tu.resume_training(exp, args, RESUME_KEYS, loader, config=model.config, model=model, ema=ema,
                                    opt=opt, scaler=scaler)
    last_saved = step if ckpt is not None else None

    # Prepare models for training:
    ddp_model = tu.distributed(model, device)
    model.train()
    if args.compile:
        ddp_model.compile()  # in place, around DDP (graph split at DDP's gradient buckets); state-dict keys unchanged

    def save(step_):
        tu.save_generator(exp, step_, args, model, ema, opt, scaler, loader, config=model.config, vqgan=vq_name)

    mask_id = model.mask_token_id
    meter = tu.TrainingMeter(["loss", "acc_masked", "mask_rate", "grad_norm"], exp, max_steps, step,
                             args.global_batch_size, device)
    logger.info(f"Training for {max_steps:,} steps...")
    while step < max_steps:
        code, y = next(loader)
        code, y = code.to(device, non_blocking=True), y.to(device, non_blocking=True)  # (B, h, w), (B,)
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr

        # Drop 10% of the labels (-> null class) so one network learns both halves of classifier-free guidance:
        drop_label = torch.rand(code.shape[0], device=device) < args.drop_label
        # Mask each token with probability gamma(r), r ~ U(0, 1) per image (arccos schedule by default):
        masked_code, mask = models.maskgit_random_mask(code, mask_id, args.mask_schedule)
        with tu.autocast(precision, device):
            logits = ddp_model(masked_code, y, drop_label)  # (B, N, K + 1)
        # Predict the original tokens everywhere (not only under the mask), with label smoothing 0.1:
        loss = maskgit_loss(logits, code, args.label_smoothing)
        tu.check_finite(step + 1, loss=loss)

        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # clip the true gradients, not the fp16-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        tu.update_ema(ema, model, args.ema_decay)
        step += 1

        # Log loss values (averaged over the log interval and all processes): accuracy on the masked tokens only,
        # as a sum over a count (no boolean indexing, which would wait for the GPU to know the count).
        with torch.no_grad():
            hits = ((logits.detach().argmax(-1).view_as(code) == code) & mask).sum()
            acc = hits.float() / mask.sum().clamp(min=1)
        meter.update(loss=loss, acc_masked=acc, mask_rate=mask.float().mean(), grad_norm=grad_norm)
        if step % args.log_every == 0 or step == max_steps:
            meter.log(step, lr=lr)

        # Save checkpoint:
        if step % args.ckpt_every == 0 or step == max_steps:
            save(step)
            last_saved = step
    meter.close()
    if last_saved != step:
        save(step)
    tu.log_done(exp, args.model, step)
    return exp.dir


#################################################################################
#                                   Arguments                                   #
#################################################################################

PRESETS = {
    # CPU-sized: the tiny VQ-GAN of assets/ (8 x 8 tokens of 256 codes at 64 px) unless --vqgan is given, the tiny
    # transformer, 1,024 synthetic images; lr 1e-3 with a short warmup so a few hundred steps show learning.
    "tiny": dict(data="synthetic", resolution=64, model="maskgit-tiny", vqgan=checkpoints.TINY_BASE["vq"],
                 global_batch_size=16, lr=1e-3, warmup=20, max_steps=300, num_images=1024, log_every=20, ckpt_every=100, num_workers=0, ema_decay=0.999,
                 cache_shard_size=256, cache_batch_size=32),
}


def get_parser():
    # Default args here train MaskGIT with the hyperparameters of Maskgit-pytorch v1 (main.py / Trainer/vit.py).
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # The global seed 42 is the reference's main.py's (it trains with fp16 autocast + GradScaler).
    tu.add_run_args(p, PRESETS, seed=42, log_every=100, ckpt_every=10_000, keep_last=3,
                    data_help="image folder (ImageNet train) or 'synthetic'")
    p.add_argument("--resolution", type=int, default=256, help="image size (256: 16 x 16 tokens of the f16 VQ-GAN)")
    p.add_argument("--vqgan", type=str, default=None, help="frozen VQ-GAN (taming / MaskGIT-pytorch last.ckpt, or "
                   "finetune_eqvae.py's vqgan.ckpt)")
    p.add_argument("--cache", type=str, default=None, help="token cache folder (default: under --results-dir, "
                   "named after the data, resolution and VQ-GAN)")
    p.add_argument("--cache-batch-size", type=int, default=64, help="images per VQ-GAN forward while tokenising")
    p.add_argument("--cache-shard-size", type=int, default=1000, help="images per cache shard file")
    p.add_argument("--model", choices=list(models.MaskGIT_models), default="maskgit-256", help="the transformer")
    p.add_argument("--mask-schedule", choices=["arccos", "cosine", "linear", "square"], default="arccos",
                   help="the training mask rate gamma(r), r ~ U(0, 1)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="of the cross-entropy over all tokens")
    p.add_argument("--drop-label", type=float, default=0.1, help="label dropout for classifier-free guidance")
    p.add_argument("--global-batch-size", type=int, default=256, help="the paper's run; the README's is 512")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate after the warmup")
    p.add_argument("--warmup", type=int, default=2500, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--epochs", type=int, default=300, help="passes over the tokens (the paper: 300)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="EMA of the weights (our addition, as DiT's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (in place: checkpoints keep "
                   "the reference's keys)")
    return p


def parse_args(argv=None):
    parser = get_parser()
    args = tu.apply_preset(parser.parse_args(argv), parser, PRESETS, argv)
    if args.data is None:
        parser.error("--data is required (an image folder, or 'synthetic'); or use --preset tiny")
    if args.global_batch_size < 1 or args.warmup < 0:
        parser.error("--global-batch-size must be positive and --warmup non-negative")
    return args


if __name__ == "__main__":
    tu.run_main(main, parse_args())
