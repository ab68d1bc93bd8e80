"""
EQ-VAE fine-tuning (stage 1, the main job): make a pretrained autoencoder's latents equivariant to scaling and
rotation by decoding *transformed latents* into *transformed images* (Kouzelis et al., arXiv 2502.09509, Sec. 3).

    torchrun --nproc_per_node=8 finetune_eqvae.py --data /imagenet/train --init sd-vae-ft-ema/
    python finetune_eqvae.py --preset tiny                      # 64 px synthetic data, a few CPU minutes

Default arguments are the settings of the official code (zelaki/eqvae, configs/eqvae_config.yaml): p = 0.5 for the
equivariance branch, 0.25 low-resolution prior preservation, 24 discrete scales x 3 quarter turns, L1 + LPIPS + 1e-6 KL
+ 0.5 x adaptive hinge PatchGAN from step 0, Adam (0.5, 0.9), lr 4.5e-6 x accumulation x global batch, batch 10 per GPU
on 8 GPUs, gradient accumulation 2, 256 px.

The method on one screen: sample_tau -> apply_tau -> TauAutoencoder.forward -> eqvae_losses (the two sections below).
The regularisers that compete with it, --regularizer scale-eq / vf / none, are the section after them.
"""
import argparse
import copy
import json
import math
import os
import random
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import data
import models
import train_utils as tu


#################################################################################
#                 The EQ-VAE Transformations tau (Sec. 3.3)                     #
#################################################################################

class Tau(NamedTuple):
    """One draw of the training transformation: which branch, the scale(s) and the quarter turns."""
    branch: str                  # "eq" (equivariance), "lowres" or "plain" (both prior preservation)
    scale: tuple = (1.0, 1.0)    # (s_y, s_x): the latent is resized to (s_y h, s_x w), a whole number of latent pixels
    k: int = 0                   # quarter turns, torch.rot90(., k, dims=(-1, -2)) as the official code (clockwise)


OFFICIAL_SCALES = [m / 32 for m in range(8, 32)]  # training_step: random.choice([s / 32 for s in range(8, 32)])


def latent_scales(n):
    """The scales for a latent side n: the official 24 (8/32 ... 31/32) whenever they give whole latent pixels (n a
    multiple of 32: 256 px with f8, 512 px, ...); otherwise the same range on n's grid, {m / n : m = n/4, ..., n-1}."""
    if n % 32 == 0:
        return list(OFFICIAL_SCALES)
    return [m / n for m in range(math.ceil(n / 4), n)]


def _draw_scale(rng, n, scales):
    """One scale for a latent side n: the official discrete set, or the paper's U(0.25, 1) on the latent grid."""
    if scales == "discrete":
        return rng.choice(latent_scales(n))
    # Paper Sec. 3.3 draws s ~ U(0.25, 1). The resized latent must have a whole number m of pixels, s = m / n, so
    # every m from ceil(n / 4) to n - 1 is equally likely: s = 1 is no transformation, and rounding a continuous draw
    # would reach it and give both ends half the weight. At n = 32 (256 px) this is the official set, draw for draw.
    return rng.randrange(math.ceil(n / 4), n) / n


def tau_rng(seed, step, micro, grad_accum):
    """The random.Random that draws the tau of micro-batch `micro` of optimiser step `step`, the same on every rank.
    The official run draws one tau per training_step call (one micro-batch) and the same one on all GPUs: Lightning's
    seed_everything(23) seeds python's `random` identically in every DDP process, and training_step is its only
    consumer. A fresh generator per micro-batch, seeded from (seed, step, micro), keeps that and makes resume exact
    with no state to save."""
    return random.Random(seed * 1_000_003 + step * grad_accum + micro)


def sample_tau(rng, latent_size, eq_prob=0.5, lowres_prob=0.25, transforms="rot+scale", scales="discrete"):
    """
    Draw tau for one micro-batch, in the order the official training_step draws it (python `random` API):
    with probability eq_prob the equivariance branch (scale and rotation applied together); otherwise prior
    preservation, at low resolution with probability lowres_prob (50% / 12.5% / 37.5% with the defaults).
    rng: random.Random or the `random` module; latent_size: (h, w) of the latent of a full-size image.
    """
    h, w = latent_size
    if rng.random() < eq_prob:
        if transforms in ("aniso", "aniso+rot"):  # Table 5's anisotropic scaling: independent s_y, s_x
            scale = (_draw_scale(rng, h, scales), _draw_scale(rng, w, scales))
        elif transforms in ("scale", "rot+scale"):
            s = _draw_scale(rng, h, scales)
            scale = (s, s)
        else:
            scale = (1.0, 1.0)
        # Rotations by 1, 2 or 3 quarter turns; the official `anisotropic: True` always rotates too ("aniso+rot").
        k = rng.choice([1, 2, 3]) if transforms in ("rot", "rot+scale", "aniso+rot") else 0
        return Tau("eq", scale, k)
    if rng.random() < lowres_prob:
        s = _draw_scale(rng, h, scales)
        return Tau("lowres", (s, s), 0)
    return Tau("plain")


def apply_tau(x, tau, interp="bilinear"):
    """x: (B, C, H, W) image or latent -> tau x: resize by tau.scale (no antialias), then rotate tau.k quarter turns."""
    if tau.scale != (1.0, 1.0):
        # size= rather than scale_factor=: the same sampling grid as the official scale_factor=s (checked equal for
        # all 24 scales at 256 px), and latent and image land on exactly matching sizes at any resolution.
        size = (round(x.shape[-2] * tau.scale[0]), round(x.shape[-1] * tau.scale[1]))
        x = F.interpolate(x, size=size, mode=interp, align_corners=False)
    if tau.k:
        x = torch.rot90(x, tau.k, dims=(-1, -2))
    return x


class TauAutoencoder(nn.Module):
    """The autoencoder under tau: x -> (target, x_hat, posterior or codebook loss); one module so DDP can wrap it."""

    def __init__(self, vae, interp="bilinear"):
        super().__init__()
        self.vae, self.interp = vae, interp
        self.is_vq = isinstance(vae, models.VQGAN)

    def forward(self, x, tau, sample_noise=None, latent_pair=False):
        """
        x: (B, 3, H, W) in [-1, 1]. Returns target (B, 3, H', W'), x_hat (same shape) and, for a KL-VAE, the
        posterior of the encoded image (KL is always on the untransformed posterior); for a VQ-GAN, the codebook loss.
        sample_noise: None (posterior.sample()) or a function shape -> N(0, 1) noise (the --shared-noise test hook).
        latent_pair: also return (tau E(x), E(tau x)) with E the posterior mean (the continuous latent of a VQ-GAN),
        for the explicit latent loss of App. A.1 (the equivariance branch only; None otherwise).
        """
        if tau.branch == "lowres":
            # Prior preservation at low resolution: the image itself is downscaled, then reconstructed as is.
            x = apply_tau(x, tau, self.interp)
        if self.is_vq:
            # Sec. 3.3: for VQ-GAN, tau acts on the continuous encoder output, before quantisation.
            z = self.vae.encode(x)
            aux = None
        else:
            aux = posterior = self.vae.encode(x)
            if sample_noise is None:
                z = posterior.sample()
            else:
                z = posterior.mean + posterior.std * sample_noise(posterior.mean.shape)
        target = x
        pair = None
        if tau.branch == "eq":
            # Eq. 5: decode tau E(x) and compare with tau x -- the same resize and rotation on latent and image.
            if latent_pair:
                mean = z if self.is_vq else posterior.mean
                e_tau = self.vae.encode(apply_tau(x, tau, self.interp))
                pair = (apply_tau(mean, tau, self.interp), e_tau if self.is_vq else e_tau.mean)
            z = apply_tau(z, tau, self.interp)
            target = apply_tau(x, tau, self.interp)
        if self.is_vq:
            z, aux, _ = self.vae.quantize(z)
        out = target, self.vae.decode(z), aux
        return out + (pair,) if latent_pair else out


#################################################################################
#                      The EQ-VAE Objective (one function)                      #
#################################################################################

# LDM's LPIPSWithDiscriminator learns an output log-variance `logvar` (init 0), but the official optimisers hold
# only the encoder/decoder/quant convs and the discriminator, so it never moves: nll = rec / exp(0) + 0. We keep
# the constant so the formula reads as LDM's.
LOGVAR = 0.0
MIN_DISC_SIDE = 24  # smallest input of the 3-layer PatchGAN (H / 8 - 2 >= 1 logits)


def adaptive_weight(nll, g_loss, last_layer, grad_scale=None):
    """LDM/taming: ||grad nll|| / (||grad g|| + 1e-4) at the decoder's last layer, clamped to [0, 1e4], constant;
    under fp16, differentiated at the GradScaler's scale and unscaled in fp32 (models.adaptive_weight)."""
    # torch.autograd.grad only returns these gradients: it does not fire DDP's gradient hooks (those run on the
    # .backward() of the total loss), so under DDP each rank uses its local gradients, as the official Lightning run.
    return models.adaptive_weight(nll, g_loss, last_layer, grad_scale)


def eqvae_losses(model, x, tau, lpips=None, disc=None, last_layer=None, perceptual_weight=1.0, kl_weight=1e-6,
                 disc_weight=0.5, sample_noise=None, latent_weight=0.0, grad_scale=None):
    """
    The EQ-VAE training objective for one batch, autoencoder side (Eq. 5 inside LDM's LPIPSWithDiscriminator):
        rec  = |tau x - D(tau E(x))| + perceptual_weight * LPIPS(tau x, D(tau E(x)))    (tau = identity when not "eq")
        nll  = sum(rec / exp(logvar) + logvar) / B,   kl = sum(KL(q(z|x) || N(0, I))) / B
        loss = nll + kl_weight * kl + adaptive_weight * disc_weight * (-mean D(x_hat))
    model: TauAutoencoder (maybe in DDP); x: (B, 3, H, W) in [-1, 1]; tau: from sample_tau; lpips: (x, y) -> (B,)
    or None; disc: the (unwrapped) PatchGAN, or None before --disc-start / with --disc-weight 0; last_layer: the
    decoder's conv_out.weight; grad_scale: the GradScaler's scale, a tensor (fp16: see models.adaptive_weight).
    Returns a dict: "loss" (to minimise), detached parts, and "nll_loss" (with its graph), "target", "x_hat".
    A VQ-GAN takes taming's loss instead (models.vq_generator_loss): means rather than sums, plus the codebook loss.
    latent_weight > 0 adds the explicit latent loss of App. A.1 (the paper's ablation, weight 0.1), summed as nll:
        latent = sum(||tau E(x) - E(tau x)||^2) / B     in the equivariance branch,
    with gradients into both terms: the encoder can shrink every latent, the collapse the paper reports.
    """
    pair = None
    if latent_weight > 0 and tau.branch == "eq":
        target, x_hat, aux, pair = model(x, tau, sample_noise, latent_pair=True)
    else:
        target, x_hat, aux = model(x, tau, sample_noise)
    target, x_hat = target.float(), x_hat.float()
    zero = torch.zeros((), device=x.device)
    latent = zero if pair is None else (pair[0].float() - pair[1].float()).pow(2).sum() / x.shape[0]
    if tu.unwrap(model).is_vq:
        lpips_fn = lpips if perceptual_weight > 0 else (lambda a, b: a.new_zeros(a.shape[0]))
        disc_fn = (lambda y: disc(disc_input(y))) if disc is not None else (lambda y: y.new_zeros(()))
        loss, parts = models.vq_generator_loss(target, x_hat, aux, lpips_fn, disc_fn, last_layer,
                                               disc_factor=float(disc is not None), perceptual_weight=perceptual_weight,
                                               disc_weight=disc_weight, grad_scale=grad_scale)
        parts["g"] = parts.pop("g_loss")
        return {"loss": loss + latent_weight * latent, **parts, "latent": latent.detach(), "target": target,
                "x_hat": x_hat}

    p_loss = lpips(target, x_hat).float().view(-1, 1, 1, 1) if perceptual_weight > 0 else zero
    B = x.shape[0]
    # L1 per pixel plus LPIPS (B, 1, 1, 1) broadcast over every pixel, then summed: LDM sums over C, H, W and divides
    # by B, so LPIPS effectively weighs C x H x W times one pixel's L1.
    rec = (target - x_hat).abs() + perceptual_weight * p_loss                   # (B, 3, H', W')
    nll = (rec / math.exp(LOGVAR) + LOGVAR).sum() / B
    kl = aux.kl().float().sum() / B                                            # on the posterior of the encoded x
    loss = nll + kl_weight * kl + latent_weight * latent
    g_loss, d_weight = zero, zero
    if disc is not None:
        g_loss = -disc(disc_input(x_hat)).float().mean()
        d_weight = adaptive_weight(nll, g_loss, last_layer, grad_scale) * disc_weight
        loss = loss + d_weight * g_loss                                        # disc_factor 1 from --disc-start on
    parts = {"nll": nll.detach(), "rec": (target - x_hat).abs().mean().detach(), "lpips": p_loss.mean().detach(),
             "kl": kl.detach(), "g": g_loss.detach(), "d_weight": d_weight, "latent": latent.detach()}
    return {"loss": loss, **parts, "nll_loss": nll, "target": target, "x_hat": x_hat}


#################################################################################
#          The Other Latent Regularisers, Side by Side (--regularizer)          #
#################################################################################
# Each adds one term to the plain objective (eqvae_losses with no equivariance branch; the low-resolution prior
# preservation stays, common to all). "none" adds nothing: the plain fine-tune control of Table 6.

SE_FACTORS = (2, 4)  # the downsampling factors of scale equivariance


def scale_eq_loss(model, x, rng, lpips=None, perceptual_weight=1.0, sample_noise=None):
    """
    Scale equivariance (Skorokhodov et al., "Improving the Diffusability of Autoencoders", arXiv 2502.14831):
    decoding the downsampled latent must give the downsampled image,
        L_SE = rec(down_s x, D(down_s E(x))),    s drawn from {2, 4} per micro-batch (shared by all ranks),
    with the main branch's reconstruction distance (L1 + LPIPS; no KL, no GAN on the small branch), added beside
    the plain reconstruction. It is Eq. 5 with tau a pure downscale, so TauAutoencoder computes it: bilinear
    without antialias, at 2x exactly a 2 x 2 average, the same op on latent and image.
    """
    s = rng.choice(SE_FACTORS)
    return eqvae_losses(model, x, Tau("eq", (1 / s, 1 / s)), lpips, perceptual_weight=perceptual_weight,
                        kl_weight=0.0, sample_noise=sample_noise)["loss"]


VF_COS_MARGIN, VF_DISTMAT_MARGIN = 0.5, 0.25  # VA-VAE's configs/f16d32_vfdinov2.yaml: cos_margin, distmat_margin


def vf_losses(proj_z, features, cos_margin=VF_COS_MARGIN, distmat_margin=VF_DISTMAT_MARGIN):
    """
    VA-VAE's vision-foundation alignment (Yao et al. 2025, arXiv 2501.01423, Sec. 3.2; hustvl/LightningDiT,
    vavae/ldm/modules/losses/contperceptual.py), between the projected latent W z and the foundation model's patch
    features f at the same N positions, cosines over channels:
        mcos = mean_{b,i} relu(1 - m1 - cos(Wz_bi, f_bi))                              (margin cosine)
        mdms = mean_{b,i,j} relu(|cos(Wz_bi, Wz_bj) - cos(f_bi, f_bj)| - m2)          (margin distance matrix)
    proj_z: (B, D, h, w); features: (B, N = h w, D). Returns (mcos, mdms); pairs inside a margin add nothing.
    """
    p = F.normalize(proj_z.flatten(2).transpose(1, 2).float(), dim=-1)       # (B, N, D)
    f = F.normalize(features.float(), dim=-1)
    mcos = F.relu(1 - cos_margin - (p * f).sum(-1)).mean()
    mdms = F.relu((p @ p.transpose(1, 2) - f @ f.transpose(1, 2)).abs() - distmat_margin).mean()
    return mcos, mdms


def vf_loss(proj, encoder, vae, x, nll, weight=0.1, sample_noise=None, grad_scale=None):
    """
    The VF term added to the loss: weight x w_adaptive x (mcos + mdms), with VA-VAE's adaptive weight at the
    encoder's last layer, w_adaptive = clamp(||grad nll|| / (||grad vf|| + 1e-4), 0, 1e8), a constant.
    proj: the trained 1x1 convolution (no bias) from the latent to the features; encoder: frozen DINOv2, fed the
    image resized to 14 px per latent position so its token grid is the latent grid (VA-VAE: 224 px for a 16 x 16
    latent); z: a posterior sample (the VQ-GAN's continuous latent), encoded again here, so eqvae_losses stays as is.
    grad_scale: fp16's loss scale (models.adaptive_weight). Returns (term, detached parts).
    """
    vae = tu.unwrap(vae)
    z = vae.encode(x)
    if not isinstance(vae, models.VQGAN):
        z = z.sample() if sample_noise is None else z.mean + z.std * sample_noise(z.mean.shape)
    with torch.no_grad():
        size = (z.shape[-2] * encoder.patch_size, z.shape[-1] * encoder.patch_size)
        features = encoder.forward_features(models.dinov2_preprocess(x, size))["x_norm_patchtokens"]
    mcos, mdms = vf_losses(proj(z), features)
    vf = mcos + mdms                                          # distmat_weight = cos_weight = 1
    w = models.adaptive_weight(nll, vf, vae.encoder.conv_out.weight, grad_scale, max_weight=1e8) * weight
    return w * vf, {"vf_mcos": mcos.detach(), "vf_mdms": mdms.detach(), "vf_weight": w}


def build_vf(args, latent_channels, device, logger):
    """--regularizer vf: (frozen DINOv2, the trained 1x1 projection from the latent to its features); not exported."""
    encoder = checkpoints.load_dinov2(args.vf_model, args.dinov2).to(device)
    proj = nn.Conv2d(latent_channels, encoder.embed_dim, 1, bias=False).to(device)
    logger.info(f"Regularizer vf: {args.vf_model}" + (" (RANDOM weights: a stand-in, its features carry no meaning)"
                if args.vf_model == "dinov2_tiny" else "") + f", weight {args.reg_weight} x adaptive")
    return encoder, proj


def add_regularizer(args, out, model, x, rng, lpips=None, noise=None, vf=None, grad_scale=None):
    """eqvae_losses' output with the --regularizer's term added to its loss (scale-eq, vf; eq and none: as is).
    model: the unwrapped TauAutoencoder; vf: (the projection, DDP-wrapped when distributed, and DINOv2). The extra
    passes run outside DDP's forward; its gradient hooks still fire once per parameter, in the one backward."""
    if args.regularizer == "scale-eq":
        se = scale_eq_loss(model, x, rng, lpips, args.perceptual_weight, noise)
        return dict(out, loss=out["loss"] + args.reg_weight * se, se=se.detach())
    if args.regularizer == "vf":
        term, parts = vf_loss(vf[0], vf[1], model.vae, x, out["nll_loss"], args.reg_weight, noise, grad_scale)
        return dict(out, loss=out["loss"] + term, **parts)
    return out


def disc_input(img):
    """The 3-layer PatchGAN needs >= 24 px. Smaller targets occur only at tiny resolutions (64 px: 16 px, never at
    256 px); they are enlarged by pixel repetition, so every rank runs the same discriminator passes under DDP."""
    side = min(img.shape[-2:])
    if side >= MIN_DISC_SIDE:
        return img
    return F.interpolate(img, scale_factor=math.ceil(MIN_DISC_SIDE / side), mode="nearest")


def discriminator_loss(disc, target, x_hat):
    """Hinge loss of the PatchGAN on the (transformed) real image and the detached reconstruction."""
    # Two forward passes, as LDM: BatchNorm normalises real and fake batches separately.
    logits_real = disc(disc_input(target.detach()))
    logits_fake = disc(disc_input(x_hat.detach()))
    return models.hinge_d_loss(logits_real, logits_fake), logits_real.detach().mean(), logits_fake.detach().mean()


#################################################################################
#                 Monitoring: Equivariance Error and Preview                    #
#################################################################################

@torch.no_grad()
def equivariance_errors(vae, x, interp="bilinear", batch=16):
    """App. C.3 on a fixed batch, E = posterior mean: {"eq_err_rot": mean over T_r, "eq_err_scale": mean over T_s}."""
    # The paper's metric, the very function evaluate.py reports, so the dashboard and the evaluation agree.
    parts = [models.equivariance_error(models.encoder_fn(vae, "mean"), x[i:i + batch], image_interp=interp,
                                       latent_interp=interp) for i in range(0, len(x), batch)]
    summary = models.summarize_equivariance({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    return {"eq_err_rot": summary["rotation"], "eq_err_scale": summary["scale"]}


@torch.no_grad()
def held_out_summary(vae, x, interp="bilinear", batch=16):
    """What the method changes, on held-out images x: the equivariance errors, and PSNR (uint8) / SSIM
    (torchmetrics' default) of reconstructions from the posterior mean."""
    recon = torch.cat([models.decoder_fn(vae)(models.encoder_fn(vae, "mean")(x[i:i + batch])).float()
                       for i in range(0, len(x), batch)])
    return {**equivariance_errors(vae, x, interp), "psnr": float(models.psnr(data.to_uint8(recon),
            data.to_uint8(x)).mean()), "ssim": float(models.ssim(recon, x).mean())}


def update_summary(path, key, vae, x, interp="bilinear"):
    """summary.json: held_out_summary of vae on x under key ("base" before the fine-tune, "fine_tuned" after)."""
    summary = {}
    if key != "base" and os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
    summary[key] = held_out_summary(vae, x, interp)
    checkpoints.atomic_write(path, lambda tmp: open(tmp, "w").write(json.dumps(summary, indent=2)))
    return summary


def describe_loss(args, is_vq):
    """One log line: which terms of the official loss this run trains with (the tiny preset switches two off)."""
    return ("Loss: L1 + " + (f"LPIPS x {args.perceptual_weight:g}" if args.perceptual_weight > 0 else
                             "no LPIPS (--perceptual-weight 0)")
            + (" + codebook" if is_vq else f" + KL x {args.kl_weight:g}") + " + "
            + (f"PatchGAN x {args.disc_weight:g} x adaptive weight from step {args.disc_start}" if args.disc_weight > 0
               else "no PatchGAN (--disc-weight 0)"))


def logged_names(args, is_vq):
    """The loss terms the meter averages and logs (metrics.jsonl's keys)."""
    return ["loss", "nll", "rec", "lpips", "codebook" if is_vq else "kl", "g", "d_weight", "d", "logits_real",
            "logits_fake", "eq_share"] + (["latent"] if args.latent_loss_weight > 0 else []) + \
        {"scale-eq": ["se"], "vf": ["vf_mcos", "vf_mdms", "vf_weight"]}.get(args.regularizer, [])


def summary_line(summary, num_images, exp_dir):
    """The run's last log line: what the fine-tune changed on the held-out images, and where everything is."""
    b, a = summary["base"], summary["fine_tuned"]
    return (f"Summary on {num_images} held-out images (base -> fine-tuned): equivariance error rotation "
            f"{b['eq_err_rot']:.3f} -> {a['eq_err_rot']:.3f}, scale {b['eq_err_scale']:.3f} -> {a['eq_err_scale']:.3f}; "
            f"PSNR {b['psnr']:.2f} -> {a['psnr']:.2f} dB; SSIM {b['ssim']:.3f} -> {a['ssim']:.3f}. Previews: "
            f"{os.path.join(exp_dir, 'previews')}; exports and summary.json: {exp_dir}")


PREVIEW_TAU = Tau("eq", (0.5, 0.5), 1)  # the preview's tau: half size and a quarter turn


@torch.no_grad()
def preview_rows(vae, x, interp="bilinear"):
    """
    The paper's Figure 2 view of images x (B, 3, H, W), posterior means decoded, tau = PREVIEW_TAU:
    {"x", "D(E(x))", "tau x", "D(E(tau x))", "D(tau E(x))"}, each (B, 3, H, W) (small ones repeated to full size).
    The figure compares the last two: decoding the transformed image's latent, and decoding the transformed latent;
    EQ-VAE makes D(tau E(x)) look like tau x.
    """
    model = TauAutoencoder(vae, interp)
    mean = lambda shape: torch.zeros(shape, device=x.device)               # zero noise: decode the posterior mean
    _, recon, _ = model(x, Tau("plain"), mean)
    tau_x, tau_recon, _ = model(x, PREVIEW_TAU, mean)                      # tau x, D(tau E(x))
    _, recon_tau, _ = model(tau_x, Tau("plain"), mean)                      # D(E(tau x))
    up = lambda t: F.interpolate(t, size=x.shape[-2:], mode="nearest")    # small rows shown at full size
    return {"x": x, "D(E(x))": recon, "tau x": up(tau_x), "D(E(tau x))": up(recon_tau), "D(tau E(x))": up(tau_recon)}


def save_preview(vae, x, path, interp="bilinear"):
    """preview_rows as one labelled PNG, a row each."""
    rows = preview_rows(vae, x, interp)
    data.save_image_grid(torch.cat(list(rows.values())).clamp(-1, 1), path, nrow=x.shape[0], row_labels=list(rows))


#################################################################################
#                                  Training Loop                                #
#################################################################################

# The options a resumed run must share with its checkpoint (another value would break exact resume):
RESUME_KEYS = ["model", "init", "config", "resolution", "global_batch_size", "grad_accum", "regularizer"]


def run_name(args):
    """The run's name: eqvae-<init name> / eqvae-<config> (its folder: results/NNN-eqvae-..., or --exp-name);
    plain-, scale-eq-, vf- for the other regularisers."""
    prefix = {"eq": "eqvae", "none": "plain"}.get(args.regularizer, args.regularizer)
    if args.init.lower() != "none":
        path = os.path.normpath(args.init)
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in ("model", "last", "diffusion_pytorch_model") and os.path.dirname(path):
            stem = os.path.basename(os.path.dirname(path))  # kl-f8/model.ckpt -> eqvae-kl-f8
        return f"{prefix}-{stem.replace('/', '-')}"
    return f"{prefix}-" + (args.config if args.config and not args.config.lstrip().startswith("{")
                           else f"{args.model}-custom")


def build_autoencoder(args, log=print):
    """--init PATH (anything checkpoints.load_autoencoder reads) or --init none with --config NAME or JSON; the
    latent normalisation of --scaling-factor / --shift-factor when given (the exports carry it)."""
    if args.init.lower() == "none":
        table = models.VQGAN_models if args.model == "vq" else models.KLVAE_models
        config = args.config or ("vqgan-f16-1024" if args.model == "vq" else "sd-vae")
        try:
            if config.lstrip().startswith("{"):  # a JSON dict of constructor arguments
                vae = (models.VQGAN if args.model == "vq" else models.KLVAE)(**json.loads(config))
            else:
                vae = models.build(table, config)
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"--config {args.config}: {str(e).replace('unknown model', 'unknown autoencoder')}") \
                from None
    else:
        norm = {k: v for k, v in (("scaling_factor", args.scaling_factor), ("shift_factor", args.shift_factor))
                if v is not None}
        try:
            vae = checkpoints.load_autoencoder(args.init, log=log, **norm)
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"--init {args.init}: could not load an autoencoder: {e}") from None
        kind = "vq" if isinstance(vae, models.VQGAN) else "kl"
        if kind != args.model:
            raise ValueError(f"--init {args.init} holds a {'VQ-GAN' if kind == 'vq' else 'KL-VAE'}; pass --model {kind}.")
    if isinstance(vae, models.KLVAE):
        vae.config.update({k: float(v) for k, v in (("scaling_factor", args.scaling_factor),
                                                     ("shift_factor", args.shift_factor)) if v is not None})
    return vae.train()


def build_loss_networks(args, device):
    """The PatchGAN discriminator (taming's init) and, when the perceptual weight is on, frozen LPIPS."""
    disc = models.NLayerDiscriminator(input_nc=3, ndf=args.disc_ndf, n_layers=3).apply(models.weights_init).to(device)
    lpips = None
    if args.perceptual_weight > 0:
        lpips = models.LPIPS() if args.lpips_random else checkpoints.load_lpips(args.lpips_vgg, args.lpips_lin)
        # .train(), as in the official run: Lightning's .train() reaches the loss module and switches on the dropout
        # of LPIPS's lin layers (taming builds it with use_dropout=True). Its weights stay frozen.
        lpips = lpips.to(device).train()
    return disc, lpips


def build_optimizers(args, vae, disc, vf_proj, world, device, logger):
    """Adam (0.5, 0.9), no weight decay, for the autoencoder and the PatchGAN (and VA-VAE's projection), at
    lr = base-lr x accumulation x global batch as LDM's main.py scales it (or --lr). Returns lr and the three."""
    lr = args.lr if args.lr is not None else args.base_lr * args.grad_accum * args.global_batch_size
    logger.info(f"Learning rate {lr:.3g} = base {args.base_lr:g} x accumulation {args.grad_accum} x {world} GPU(s) x "
                f"{args.global_batch_size // world} per GPU" if args.lr is None else
                f"Learning rate {lr:.3g} (set with --lr)")
    # fused on CUDA (tu.adam_kwargs): one kernel per update; the plain optimiser on CPU.
    adam = lambda params: torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9), **tu.adam_kwargs(device))  # noqa: E731
    # VA-VAE trains its projection in the autoencoder's Adam; its own Adam with the same settings is the same update
    # (Adam is per parameter) and leaves opt_ae's state loadable from the init file.
    opt_vf = adam(vf_proj.parameters()) if vf_proj is not None else None
    return lr, adam(vae.parameters()), adam(disc.parameters()), opt_vf


def set_memory_format(args, *modules):
    """--channels-last (NHWC convolutions) and --cudnn-benchmark; returns the memory format for the batches."""
    fmt = torch.channels_last if args.channels_last else torch.preserve_format
    for m in modules if args.channels_last else ():
        if m is not None:
            m.to(memory_format=fmt)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    return fmt


def compile_models(vae):
    """
    --compile, in place (state-dict keys unchanged): the autoencoder's residual blocks and resamplers one by one.
    What the adaptive GAN weight differentiates stays eager: it takes torch.autograd.grad (retaining the graph) of
    the reconstruction and GAN losses at conv_out's weight, which inside a compiled decoder would run the whole
    decoder's compiled backward (4.4 s instead of 0.32 s for --preset tiny's autoencoder on CPU); through the
    eager norm_out / conv_out, discriminator and LPIPS it reaches back only through the loss and that one
    convolution (0.32 s with the blocks compiled; a compiled discriminator's backward also refuses retain_graph).
    The attention blocks stay eager too: they run at the lowest resolution through the fused attention kernel
    already, and inductor's dynamic-shape path fails on them (torch 2.14, CPU).
    """
    # tau changes the spatial size from micro-batch to micro-batch: 25 latent sides at 256 px, and the images and
    # feature maps that go with them. Sizes are left to torch.compile's automatic dynamic shapes (static at first, a
    # dimension that changes is recompiled dynamic) where the backend keeps them symbolic; where it specialises them
    # (inductor's CPU convolutions, torch 2.14) each size compiles once. The blocks share one forward code object per
    # class, whose cache then holds an entry per channel width x size (hundreds for SD-VAE): past torch._dynamo's
    # default limits (8 per code object, 256 in all) it would silently run eager, so they are raised to hold them all.
    config = torch._dynamo.config
    for names, limit in ((("recompile_limit", "cache_size_limit"), 512),
                         (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 4096)):
        name = next(n for n in names if hasattr(config, n))  # the names of torch >= 2.7, else the older ones
        setattr(config, name, max(getattr(config, name), limit))
    for module in vae.modules():
        if isinstance(module, (models.ResnetBlock, models.Downsample, models.Upsample)):
            module.compile()


def shared_noise(seed, step, micro, grad_accum, rank, world, device):
    """--shared-noise test hook: the posterior noise of the *global* batch from a seed shared by all ranks; each rank
    takes its samples (rank r holds global positions r, r + world, ...), so any world size sees the same noise."""
    def sample(shape):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * grad_accum + micro)
        full = torch.randn((shape[0] * world,) + tuple(shape[1:]), generator=g)
        return full[rank::world].to(device)
    return sample


def export_autoencoder(vae, exp_dir, logger, discriminator=None):
    """The fine-tuned autoencoder as a taming checkpoint (VQ-GAN), or an LDM checkpoint and a diffusers folder (KL).
    The last training checkpoint already holds the weights; each export is tried even when another fails (a kl-f16
    with a custom architecture, say), and a failure is reported at the end, naming what was written."""
    # The LDM / taming files carry the discriminator too, as their upstream training checkpoints do: fine-tuning
    # one of them again starts from it (--init-state).
    with_disc = lambda save: lambda ae, path: save(ae, path, discriminator=discriminator)
    if isinstance(vae, models.VQGAN):
        exports = [("vqgan.ckpt", with_disc(checkpoints.save_taming))]
    else:
        exports = [("eqvae.ckpt", with_disc(checkpoints.save_ldm)), ("diffusers", checkpoints.save_diffusers)]
    written, failed = [], []
    for name, save in exports:
        try:
            save(vae, os.path.join(exp_dir, name))
            written.append(name)
        except Exception as e:  # whatever stops one exporter (a full disk, an unexpected layout) spares the others
            failed.append(f"{name}: {type(e).__name__}: {e}")
            logger.info(f"Could not export {name}: {type(e).__name__}: {e}")
    if failed:
        raise ValueError(f"export to {exp_dir} failed for {'; '.join(failed)} (written: {', '.join(written) or 'none'}; "
                         f"the weights are in the last checkpoint of {os.path.join(exp_dir, 'checkpoints')})")
    logger.info(f"Done: exported the fine-tuned autoencoder to {exp_dir} ({' and '.join(written)})")


def restore_init_state(args, vae, disc, opt_ae, opt_disc, lr, logger):
    """--init-state official: the init file's discriminator and Adam states, as Lightning's resume restores them;
    weights: its discriminator only. Returns the learning rate from now on (logged) and whether it is the file's
    (its Adam state was restored and no --lr given)."""
    state = checkpoints.init_training_state(args.init, vae, disc)
    logger.info(f"Init state: {state['note']}")
    if state["disc"] is not None:
        try:
            checkpoints.load_state_dict_checked(disc, state["disc"], f"{args.init} (its discriminator)")
        except (KeyError, ValueError) as e:
            raise ValueError(f"{str(e).rstrip('.')}. Match its width with --disc-ndf, or start a new PatchGAN "
                             "with --init-state fresh") from None
        logger.info("  discriminator: restored from the init file (not a random PatchGAN)")
    else:
        logger.info("  discriminator: none in the init file, a random PatchGAN")
    if args.init_state != "official" or state["opt_ae"] is None:
        return lr, False
    opt_ae.load_state_dict(state["opt_ae"])
    if state["opt_disc"] is not None:
        opt_disc.load_state_dict(state["opt_disc"])
    stored = opt_ae.param_groups[0]["lr"]
    new = args.lr if args.lr is not None else stored
    for opt in (opt_ae, opt_disc):
        for g in opt.param_groups:
            g["lr"] = new
    logger.info(f"  Adam states: restored (moments, step counts, betas {tuple(opt_ae.param_groups[0]['betas'])}); "
                f"learning rate {new:.3g} " + ("(set with --lr)" if args.lr is not None else
                f"from the file, as Lightning's resume does (the configured {lr:.3g} is replaced)"))
    return new, args.lr is None


def held_out_images(args, device):
    """The first --val-images of --val-data ('synthetic': the synthetic set of another seed, held out from
    training), Resize + CenterCrop as the official evaluation; None when there is none."""
    source = args.val_data or ("synthetic" if args.data == "synthetic" else None)
    if source is None or args.val_images == 0:
        return None
    ds = data.build_dataset(source, args.resolution, "resize_center", num_images=args.val_images, seed=1)
    return torch.stack([ds[i][0] for i in range(len(ds))]).to(device)


@torch.no_grad()
def validation_loss(vae, x, lpips, perceptual_weight, batch=16):
    """LDM's val/rec_loss (AutoencoderKL.validation_step): the plain reconstruction of a posterior sample, mean
    |x - x_hat| + perceptual_weight * mean LPIPS, without GAN and KL; LPIPS in eval mode, fixed noise (seed 0)."""
    g = torch.Generator(x.device).manual_seed(0)
    total = 0.0
    was = lpips.training if lpips is not None else None
    if lpips is not None:
        lpips.eval()
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        x_hat = vae(xb)[0] if isinstance(vae, models.VQGAN) else vae.decode(vae.encode(xb).sample(g))
        rec = (xb - x_hat).abs().mean(dim=(1, 2, 3))
        if lpips is not None and perceptual_weight > 0:
            rec = rec + perceptual_weight * lpips(xb, x_hat).view(-1)
        total += float(rec.sum())
    if lpips is not None:
        lpips.train(was)
    return total / len(x)


def main(args):
    """Fine-tune an autoencoder with the EQ-VAE objective."""
    # Setup DDP:
    dist = tu.setup_distributed()
    rank, world, device = dist.rank, dist.world_size, dist.device
    batch = tu.per_rank_batch(args.global_batch_size, world)
    # fp32 by default, as the official run (Lightning's precision 32; TF32 matmuls on Ampere and later, which
    # setup_distributed enables as DiT does); --precision bf16 is a flag (see the README).
    precision = tu.resolve_precision(args.precision, device, cuda_default="fp32")

    # Setup an experiment folder:
    exp = tu.setup_experiment(args.results_dir, run_name(args), args.resume, dist, precision, args, RESUME_KEYS)
    logger = exp.logger

    # Setup data (first: a wrong --data fails before any weights load):
    dataset = data.build_dataset(args.data, args.resolution, "eqvae", num_images=args.num_images)
    loader = tu.ResumableLoader(dataset, batch_size=batch, seed=args.global_seed, num_workers=args.num_workers,
                                pin_memory=device.type == "cuda")
    steps_per_epoch = max(1, len(loader) // args.grad_accum)
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    logger.info(f"Dataset: {len(dataset):,} images at {args.resolution} px; global batch {args.global_batch_size} "
                f"({batch} per GPU) x accumulation {args.grad_accum}; {steps_per_epoch:,} steps/epoch, {max_steps:,} steps")
    # Held-out images (--val-data; the synthetic set of another seed by default) for the validation loss and the
    # previews: the same images whatever the run's seed, so previews of different runs compare.
    val_x = held_out_images(args, device)
    preview_x = val_x[:8] if val_x is not None else torch.stack([data.build_dataset(
        args.data, args.resolution, "resize_center", num_images=8)[i][0] for i in range(min(8, len(dataset)))]).to(device)

    # Create models (seeded identically on every rank, so the initial weights do not depend on the world size):
    torch.manual_seed(args.global_seed)
    vae = build_autoencoder(args, logger.info).to(device)
    is_vq = isinstance(vae, models.VQGAN)
    tu.check_resolution(args.resolution, vae, flag="--resolution")
    if args.disc_weight is None:
        args.disc_weight = 0.8 if is_vq else 0.5  # taming's VQ-GAN config / the EQ-VAE (LDM) config
    disc, lpips = build_loss_networks(args, device)
    ema = None
    if args.ema_decay > 0:  # off by default: the official trainer keeps no EMA (the released eq-vae-ema does)
        ema = copy.deepcopy(vae).eval()
        tu.requires_grad(ema, False)
    logger.info(f"Autoencoder parameters: {tu.count_params(vae):,}; discriminator: {tu.count_params(disc):,}")
    vf_encoder, vf_proj = build_vf(args, vae.latent_shape(args.resolution)[0], device, logger) \
        if args.regularizer == "vf" else (None, None)

    # Setup optimizer (Adam betas (0.5, 0.9) for both, no weight decay, lr scaled as LDM's main.py does):
    lr, opt_ae, opt_disc, opt_vf = build_optimizers(args, vae, disc, vf_proj, world, device, logger)
    scaler = tu.make_scaler(precision, device)  # one GradScaler for both optimisers (fp16 only)

    # The official starting state: zelaki/eqvae passes kl-f8's model.ckpt to --resume, so Lightning restores its
    # trained PatchGAN and both Adams, their learning rate included (see checkpoints.init_training_state):
    lr_from_init = False
    if exp.resume is None and args.init.lower() != "none" and args.init_state != "fresh":
        lr, lr_from_init = restore_init_state(args, vae, disc, opt_ae, opt_disc, lr, logger)

    # Resume (model, discriminator, optimisers, scaler, EMA, step, data position, every rank's RNG), then seed each
    # rank for the loop (DiT's per-rank seeds; tau stays shared, see tau_rng). A run that started with the init
    # file's learning rate keeps it, unless --lr says otherwise:
    step, ckpt = tu.resume_training(exp, args, RESUME_KEYS, loader, config=vae.config, what="autoencoder",
                                    lr=lambda ckpt: None if args.lr is None and ckpt.get("lr_from_init") else lr,
                                    required=("model", "disc", "opt", "opt_disc", "step", "config", "args"),
                                    model=vae, disc=disc, opt=opt_ae, opt_disc=opt_disc, scaler=scaler,
                                    vf_proj=vf_proj, opt_vf=opt_vf)
    skipped = 0  # fp16 steps that GradScaler dropped, counted over the whole run
    if ckpt is not None:
        if ema is not None:  # EMA switched on at resume: it starts from the current weights
            ema.load_state_dict(ckpt.get("ema") or ckpt["model"])
        skipped = ckpt.get("skipped_steps", 0)
        lr_from_init = args.lr is None and bool(ckpt.get("lr_from_init"))
        if lr_from_init:
            logger.info(f"Learning rate {opt_ae.param_groups[0]['lr']:.3g}: the init file's, as the run started")
        del ckpt

    # Prepare models for training:
    if args.compile:
        compile_models(vae)
    fmt = set_memory_format(args, vae, disc, lpips)
    model = TauAutoencoder(vae, args.interp)
    ddp_model, ddp_disc = tu.distributed(model, device), tu.distributed(disc, device)
    ddp_vf = tu.distributed(vf_proj, device) if vf_proj is not None else None
    last_layer = vae.get_last_layer()  # the parameter itself (not through DDP): the adaptive weight's grads go here
    latent_hw = vae.latent_shape(args.resolution)[1:]
    smallest = round(args.resolution * latent_scales(latent_hw[0])[0])  # the smallest tau x / low-res image
    if args.perceptual_weight > 0 and smallest < 16:
        raise ValueError(f"--resolution {args.resolution} makes {smallest} px targets at the smallest scale, too "
                         f"small for LPIPS's VGG (>= 16 px): use --resolution >= 64 or --perceptual-weight 0.")

    def save(step_, folder=exp.ckpt_dir):
        """Checkpoint everything exact resume needs (collective: every rank's RNG is gathered)."""
        keep = args.keep_last if folder == exp.ckpt_dir else 0  # the best ones are pruned by keep_best
        tu.save_training_checkpoint(folder, step_, keep, logger, model=vae.state_dict(),
                                    disc=disc.state_dict(), opt=opt_ae.state_dict(), opt_disc=opt_disc.state_dict(),
                                    scaler=scaler.state_dict(), ema=ema.state_dict() if ema is not None else None,
                                    loader=loader.state_dict(), config=dict(vae.config), args=vars(args),
                                    skipped_steps=int(skipped), lr_from_init=lr_from_init,
                                    vf_proj=vf_proj.state_dict() if vf_proj else None,
                                    opt_vf=opt_vf.state_dict() if opt_vf else None)

    logger.info(describe_loss(args, is_vq))
    logger.info(f"tau: eq-prob {args.eq_prob}, lowres-prob {args.lowres_prob}, transforms {args.transforms}, "
                f"scales {args.scales}, interp {args.interp}; latent {latent_hw[0]}x{latent_hw[1]}"
                + (f"; explicit latent loss x {args.latent_loss_weight} (App. A.1)" if args.latent_loss_weight else "")
                + {"scale-eq": f"; regularizer scale-eq x {args.reg_weight}, factors {SE_FACTORS}",
                   "none": "; regularizer none: the plain fine-tune control"}.get(args.regularizer, ""))
    val_every = args.val_every or steps_per_epoch  # once an epoch by default, as the official run validates
    # The autoencoder before fine-tuning, on the held-out images: the end of the run compares with it.
    summary_path = os.path.join(exp.dir, "summary.json")
    # Its preview too (previews/0000000.png: the same images as every later preview).
    if dist.is_main and step == 0:
        vae.eval()
        with tu.autocast(precision, device):
            save_preview(vae, preview_x, os.path.join(exp.dir, "previews", f"{0:07d}.png"), args.interp)
        if val_x is not None:  # in fp32, as the fine-tuned one at the end
            update_summary(summary_path, "base", vae, val_x, args.interp)
        vae.train()
    names = logged_names(args, is_vq)
    meter = tu.TrainingMeter(names, exp, max_steps, step, args.grad_accum * args.global_batch_size, device)
    one = torch.ones((), device=device)  # scaler.scale(one): GradScaler's scale as a tensor (fp16), read without a sync
    while step < max_steps:
        gan = args.disc_weight > 0 and step >= args.disc_start  # LDM's disc_factor: 0 before --disc-start
        parts = {n: 0.0 for n in names}
        for micro in range(args.grad_accum):
            x, _ = next(loader)
            x = x.to(device, non_blocking=True, memory_format=fmt)
            # Draw tau: one per micro-batch, the same on every rank as in the official run (see tau_rng); with
            # --tau-per-rank each rank draws its own from its python `random` (seeded per rank, saved in checkpoints).
            # The posterior noise and LPIPS's dropout stay per rank (DiT's per-rank seeds); in the official run they
            # also repeat across GPUs, a side effect of that same seeding rather than a choice.
            rng = random if args.tau_per_rank else tau_rng(args.global_seed, step, micro, args.grad_accum)
            tau = sample_tau(rng, latent_hw, args.eq_prob, args.lowres_prob, args.transforms, args.scales)
            sync = micro == args.grad_accum - 1  # all-reduce gradients only on the last micro-batch
            noise = shared_noise(args.global_seed, step, micro, args.grad_accum, rank, world, device) \
                if args.shared_noise else None
            grad_scale = scaler.scale(one) / args.grad_accum if scaler.is_enabled() else None  # fp16 adaptive weights
            # Autoencoder update. One forward serves both updates: Lightning runs training_step twice per batch
            # (generator, then discriminator), each with a fresh tau and forward: the same distribution, twice the cost.
            with tu.no_sync(ddp_model, ddp_vf, sync=sync):
                tu.requires_grad(disc, False)  # the generator's GAN term must not touch the discriminator's grads
                with tu.autocast(precision, device):
                    out = eqvae_losses(ddp_model, x, tau, lpips, disc if gan else None, last_layer,
                                       args.perceptual_weight, args.kl_weight, args.disc_weight, noise,
                                       args.latent_loss_weight, grad_scale=grad_scale)
                    out = add_regularizer(args, out, model, x, rng, lpips, noise, (ddp_vf, vf_encoder), grad_scale)
                scaler.scale(out["loss"] / args.grad_accum).backward()  # the micro-batch mean, as Lightning accumulates
                tu.requires_grad(disc, True)
            # Discriminator update, on the (transformed) real image and the detached reconstruction:
            d = dict(d=0.0, logits_real=0.0, logits_fake=0.0)
            if gan:
                with tu.no_sync(ddp_disc, sync=sync):
                    with tu.autocast(precision, device):
                        d["d"], d["logits_real"], d["logits_fake"] = discriminator_loss(ddp_disc, out["target"],
                                                                                        out["x_hat"])
                    scaler.scale(d["d"] / args.grad_accum).backward()
            for n in names:
                v = {**out, **d, "eq_share": float(tau.branch == "eq")}[n]
                parts[n] = parts[n] + (v.detach().float() if torch.is_tensor(v) else v) / args.grad_accum

        # Record a non-finite loss (read at log steps and before every save, so no broken state is ever saved):
        tu.check_finite(step + 1, **{n: parts[n] for n in names if torch.is_tensor(parts[n])})
        scale_before = scaler.scale(one) if scaler.is_enabled() else None  # a tensor: no wait for the GPU
        scaler.step(opt_ae)
        if opt_vf is not None:
            scaler.step(opt_vf)
        if gan:
            scaler.step(opt_disc)  # one scaler, two optimisers: step each, then a single update (torch AMP recipe)
        scaler.update()
        if scale_before is not None:  # fp16 overflow: GradScaler skipped the step and lowered its scale (not fatal)
            skipped = skipped + (scaler.scale(one) < scale_before).long()  # counted on the device
        opt_ae.zero_grad(set_to_none=True)
        opt_disc.zero_grad(set_to_none=True)
        if opt_vf is not None:
            opt_vf.zero_grad(set_to_none=True)
        if ema is not None:
            tu.update_ema(ema, vae, args.ema_decay)
        step += 1

        # Log loss values (averaged over steps and processes):
        meter.update(**parts)
        if step % args.log_every == 0 or step == max_steps:
            meter.log(step, skipped_steps=int(skipped))

        # Preview and equivariance error on the held-out batch (rank 0; the others continue to the next collective):
        if dist.is_main and (step % args.preview_every == 0 or step == max_steps):
            vae.eval()
            with tu.autocast(precision, device):
                err = equivariance_errors(vae, val_x if val_x is not None else preview_x, args.interp)
                save_preview(vae, preview_x, os.path.join(exp.dir, "previews", f"{step:07d}.png"), args.interp)
            vae.train()
            exp.metrics.write(step, **err)
            logger.info(f"step {step}: equivariance error rot {err['eq_err_rot']:.4f}, scale {err['eq_err_scale']:.4f}")

        # Validation loss and the --keep-best checkpoints (the official ModelCheckpoint: top 3 by val/rec_loss):
        if val_x is not None and (step % val_every == 0 or step == max_steps):
            vae.eval()
            value = validation_loss(vae, val_x, lpips, args.perceptual_weight) if dist.is_main else None
            vae.train()
            value = tu.broadcast_object(value)  # rank 0's, on every rank: they all take part in keep_best's save
            exp.metrics.write(step, val_rec_loss=value)
            if args.keep_best > 0:
                tu.keep_best(os.path.join(exp.ckpt_dir, "best"), step, value, args.keep_best,
                             lambda s: save(s, os.path.join(exp.ckpt_dir, "best")))

        # Save checkpoint:
        if step % args.ckpt_every == 0 or step == max_steps:
            save(step)
    meter.close()

    # Export the autoencoder (the EMA one when enabled), and say what the fine-tune changed on held-out images:
    if dist.is_main:
        final = (ema if ema is not None else vae).eval()
        export_autoencoder(final, exp.dir, logger, disc)
        if val_x is not None and os.path.exists(summary_path):
            summary = update_summary(summary_path, "fine_tuned", final, val_x, args.interp)
            logger.info(summary_line(summary, len(val_x), exp.dir))
    tu.barrier()
    return exp.dir


#################################################################################
#                                 Arguments                                     #
#################################################################################

PRESETS = {
    # CPU-sized, about a minute on 2 cores: the EQ-VAE fine-tune of the tiny KL autoencoder this project trained
    # (assets/: 3000 steps on the built-in 64 px synthetic images), ending with the summary of what it changed on
    # held-out images. base-lr x 10 keeps the official *configured* lr (7.2e-4) at global batch 16 without
    # accumulation. Two terms of the official loss are off at this size: LPIPS (VGG16 would cost ~3x the tiny
    # autoencoder and needs downloaded weights) and the PatchGAN: without LPIPS, its adaptive weight matches half the
    # L1 gradient, and at 64 px it cost the fine-tunes 2 dB PSNR and made EQ-VAE's reconstructions 14x further from
    # the images in the demo probe's features (200 steps, seed 1: probe FD 10.8 with the GAN, 0.77 without; plain
    # 0.71 / 0.89). --perceptual-weight 1 / --disc-weight 0.5 switch them on (the files carry the PatchGAN).
    "tiny": dict(data="synthetic", resolution=64, init=checkpoints.TINY_BASE["kl"], global_batch_size=16,
                 grad_accum=1, base_lr=4.5e-5, max_steps=400, perceptual_weight=0.0, disc_weight=0.0, disc_ndf=32,
                 num_images=2048, log_every=20, ckpt_every=200, preview_every=100, val_every=100, num_workers=0,
                 vf_model="dinov2_tiny"),
}


def get_parser():
    # Default args here fine-tune SD-VAE with the settings of the official EQ-VAE code (configs/eqvae_config.yaml).
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # The global seed 23 is the official main.py's; the run folder defaults to eqvae-<init name>.
    tu.add_run_args(p, PRESETS, seed=23, log_every=50, ckpt_every=2000, keep_last=3, cuda_precision="fp32",
                    data_help="image folder (OpenImages / ImageNet train) or 'synthetic'")
    p.add_argument("--resolution", type=int, default=256, help="training crop size (the official 256)")
    p.add_argument("--model", choices=["kl", "vq"], default="kl", help="KL-VAE (SD-VAE, SDXL-VAE) or VQ-GAN")
    p.add_argument("--init", type=str, default=None, help="pretrained autoencoder (diffusers folder, LDM/taming "
                   "checkpoint, ours), or 'none' to train --config from scratch")
    p.add_argument("--config", type=str, default=None, help="architecture for --init none: a name in "
                   f"models.KLVAE_models ({', '.join(models.KLVAE_models)}) or VQGAN_models "
                   f"({', '.join(models.VQGAN_models)}), or a JSON dict of constructor arguments")
    tu.add_latent_norm_args(p)
    # EQ-VAE (Sec. 3.3; official code: p_prior 0.5, p_prior_s 0.25, 24 discrete scales, bilinear)
    p.add_argument("--eq-prob", type=float, default=None, help="probability of the equivariance branch (p_alpha; "
                   "default 0.5 with --regularizer eq, else 0); 0 is the plain fine-tune control of Table 6 (add "
                   "--lowres-prob 0 for full-resolution only)")
    p.add_argument("--lowres-prob", type=float, default=0.25, help="prior preservation: share at low resolution")
    p.add_argument("--transforms", choices=["rot", "scale", "rot+scale", "aniso", "aniso+rot"], default="rot+scale",
                   help="Table 5: rotations, scalings, both, anisotropic scaling, or anisotropic scaling + rotation "
                   "(the official anisotropic: True)")
    p.add_argument("--scales", choices=["discrete", "uniform"], default="discrete",
                   help="official 8/32..31/32 (x latent side) or the paper's U(0.25, 1) on the latent grid")
    p.add_argument("--latent-loss-weight", type=float, default=0.0, help="App. A.1's explicit latent loss "
                   "||tau E(x) - E(tau x)||^2 (the paper: 0.1, which collapses the latent space); 0 = off")
    p.add_argument("--regularizer", choices=["eq", "scale-eq", "vf", "none"], default="eq",
                   help="the latent regulariser: eq (EQ-VAE), scale-eq (Skorokhodov et al. 2025's scale "
                   "equivariance), vf (VA-VAE's DINOv2 alignment) or none (the plain fine-tune); the last three "
                   "add their term to the plain objective (--eq-prob 0)")
    p.add_argument("--reg-weight", type=float, default=None, help="weight of the scale-eq term (default 1: the "
                   "downsampled reconstruction weighs as the full one) or of vf (default 0.1 x adaptive, VA-VAE's)")
    p.add_argument("--vf-model", default="dinov2_vitl14", choices=sorted(models.DINOv2_models),
                   help="--regularizer vf: the foundation model (VA-VAE: DINOv2 ViT-L/14, no registers)")
    p.add_argument("--dinov2", type=str, default=None, help="--regularizer vf: the DINOv2 weights, e.g. "
                   "dinov2_vitl14_pretrain.pth (default: torch hub's cache)")
    p.add_argument("--init-state", choices=["official", "weights", "fresh"], default="official",
                   help="official: the --init file's discriminator and Adam states (its learning rate too, unless "
                   "--lr), as the official run's Lightning resume restores them; weights: its discriminator only; "
                   "fresh: a random PatchGAN and new Adams")
    p.add_argument("--val-data", type=str, default=None, help="held-out images for the validation loss, previews "
                   "and summary (default: for --data synthetic, another seed's synthetic images; else none)")
    p.add_argument("--val-images", type=int, default=64, help="how many held-out images (0 = no validation)")
    p.add_argument("--val-every", type=tu.positive_int, default=None, help="steps between validations (default: an "
                   "epoch, as the official run)")
    p.add_argument("--keep-best", type=int, default=3, help="also keep the checkpoints of the K lowest validation "
                   "losses, in checkpoints/best/ (the official ModelCheckpoint: top 3 by val/rec_loss; 0 = off)")
    p.add_argument("--interp", choices=["bilinear", "bicubic"], default="bilinear",
                   help="resize of latent and image (official: bilinear; the paper text: bicubic)")
    # Loss (LDM LPIPSWithDiscriminator as configured for EQ-VAE)
    p.add_argument("--kl-weight", type=float, default=1e-6, help="KL weight of LDM's loss (1e-6)")
    p.add_argument("--perceptual-weight", type=float, default=1.0, help="LPIPS weight (0 = L1 only)")
    p.add_argument("--disc-weight", type=float, default=None, help="default 0.5 (KL, EQ-VAE config), 0.8 (VQ, taming)")
    p.add_argument("--disc-start", type=int, default=0, help="step at which the GAN starts (SD-VAE's own training: 50001)")
    p.add_argument("--disc-ndf", type=int, default=64, help="PatchGAN width")
    p.add_argument("--lpips-vgg", type=str, default=None, help="vgg16-397923af.pth (default: torch hub cache)")
    p.add_argument("--lpips-lin", type=str, default=None, help="LPIPS v0.1 vgg.pth lin layers (default: hub cache)")
    p.add_argument("--lpips-random", action="store_true", help="tests/benchmarks only: random LPIPS weights")
    # Optimisation (paper: 8 GPUs x batch 10, accumulation 2, 5 epochs; lr 4.5e-6 x 2 x 80 = 7.2e-4)
    p.add_argument("--global-batch-size", type=int, default=80, help="images per forward over all GPUs")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimiser step (the official 2)")
    p.add_argument("--base-lr", type=float, default=4.5e-6, help="scaled by accumulation x global batch")
    p.add_argument("--lr", type=float, default=None, help="set the learning rate directly (no scaling)")
    p.add_argument("--epochs", type=int, default=5, help="passes over --data (the paper: 5 of OpenImages)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the autoencoder, e.g. 0.9999 (0 = off, "
                   "as the official trainer)")
    # System
    p.add_argument("--compile", action="store_true", help="torch.compile the autoencoder's residual blocks and "
                   "resamplers (what the adaptive GAN weight differentiates, attention and the PatchGAN stay eager)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for the autoencoder, PatchGAN "
                   "and LPIPS (tensor cores' layout; bench/gpu_check.sh measures whether it is faster)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its convolution algorithms for "
                   "each input size (once per tau size; bench/gpu_check.sh measures it)")
    p.add_argument("--preview-every", type=tu.positive_int, default=1000, help="steps between previews (Figure 2 "
                   "rows) and equivariance errors on the held-out images")
    p.add_argument("--tau-per-rank", action="store_true", help="each GPU draws its own tau (default: one tau per "
                   "micro-batch for all GPUs, as the official Lightning run)")
    p.add_argument("--shared-noise", action="store_true", help="test hook: posterior noise of the global batch from a "
                   "seed shared by all ranks, so N GPUs x B/N reproduce 1 GPU x B exactly")
    return p


def parse_args(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    tu.apply_preset(args, parser, PRESETS, argv)  # a preset fills in only the options not typed
    if args.data is None:
        parser.error("--data is required (an image folder, or 'synthetic'); or use --preset tiny")
    if args.preset == "tiny" and args.model == "vq" and args.init == checkpoints.TINY_BASE["kl"]:
        args.init = checkpoints.TINY_BASE["vq"]  # the tiny preset's base for --model vq: the tiny VQ-GAN
    if args.init is None:
        parser.error("--init is required: a pretrained autoencoder (diffusers folder or checkpoint, e.g. "
                     "sd-vae-ft-ema/), or 'none' with --config NAME to train from scratch")
    if args.eq_prob is None:
        args.eq_prob = 0.5 if args.regularizer == "eq" else 0.0
    elif args.regularizer != "eq" and args.eq_prob > 0:
        parser.error(f"--eq-prob applies to --regularizer eq; --regularizer {args.regularizer} adds its own term to "
                     "the plain objective (leave --eq-prob out)")
    if args.reg_weight is None:
        args.reg_weight = {"scale-eq": 1.0, "vf": 0.1}.get(args.regularizer, 0.0)
    for name in ("eq_prob", "lowres_prob"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.grad_accum < 1 or args.global_batch_size < 1:
        parser.error("--grad-accum and --global-batch-size must be positive")
    return args


if __name__ == "__main__":
    tu.run_main(main, parse_args())
