"""
Every network of the EQ-VAE pipeline and the math that belongs to it, in one file, in this order:

  1. the KL autoencoder (SD-VAE, SDXL-VAE, SD3 / FLUX VAE, kl-f16) with its latent normalisation, LPIPS and the
     PatchGAN discriminator;
  2. the VQ-GAN (taming f16) with its quantiser and fine-tuning loss;
  3. the equivariance error of latents (paper App. C.3), shared by training and evaluation;
  4. the DiT backbone (shared by DiT, SiT and SiT + REPA) and DiT's Gaussian diffusion;
  5. SiT / REPA configs, interpolant transport with its ODE / SDE samplers, and DINOv2;
  6. MaskGIT's transformer, masking schedules and sampler.

Sections are separated by banners; read top to bottom. Every family has one table, name -> constructor
(KLVAE_models, VQGAN_models, DiT_models, SiT_models, DINOv2_models, MaskGIT_models). Checkpoint formats (LDM,
diffusers, taming, the official DiT / SiT / REPA / DINOv2 / MaskGIT files) and pretrained weights live in
checkpoints.py; this file only builds networks.
"""
import math
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data  # to_uint8: the one uint8 convention, clamp(127.5 x + 128)


_CONSTANTS = {}  # (values, device, dtype) -> tensor


def device_constant(values, device, dtype=torch.float32):
    """A small constant (per-channel means, stds) as a tensor on `device`, copied there once: a fresh torch.tensor per
    call is a blocking host-to-device copy in every training step. Made outside inference mode, so a constant first
    built while sampling can still take part in autograd later."""
    key = (tuple(values), str(device), dtype)
    if key not in _CONSTANTS:
        with torch.inference_mode(False):
            _CONSTANTS[key] = torch.tensor(key[0], dtype=dtype, device=device)
    return _CONSTANTS[key]


#################################################################################
#                  KL Autoencoder (SD-VAE): Building Blocks                     #
#################################################################################
# Parameter names follow LDM / taming (ldm/modules/diffusionmodules/model.py), so the LDM and EQ-VAE LDM
# checkpoints and the taming VQ-GAN load into these modules unchanged; checkpoints.py maps diffusers names.

def Normalize(in_channels, num_groups=32):
    """GroupNorm as in LDM: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: GroupNorm-swish-conv twice, 1x1 nin_shortcut when channels change."""
    def __init__(self, in_channels, out_channels=None, dropout=0.0, norm_num_groups=32):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels, norm_num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels, norm_num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x):
        """x: (N, C_in, H, W) -> (N, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # swish = x * sigmoid(x) = SiLU
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q/k/v/proj_out are 1x1 convs (LDM's layout)."""
    def __init__(self, in_channels, norm_num_groups=32):
        super().__init__()
        self.norm = Normalize(in_channels, norm_num_groups)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x):
        """x: (N, C, H, W) -> (N, C, H, W)."""
        N, C, H, W = x.shape
        h = self.norm(x)
        # (N, 1, H*W, C): one head whose width is all C channels, so the softmax scale is C^-0.5 as in LDM.
        q, k, v = (t.reshape(N, C, H * W).transpose(1, 2).unsqueeze(1) for t in (self.q(h), self.k(h), self.v(h)))
        # Fast path: fused attention (flash / memory-efficient kernels on GPU) computes softmax(q k^T / sqrt(C)) v
        # without materialising the (H*W)^2 matrix, which is 1 GB per image at 512 px for the mid block.
        h = F.scaled_dot_product_attention(q, k, v)  # (N, 1, H*W, C)
        h = h.squeeze(1).transpose(1, 2).reshape(N, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv after padding right and bottom by one (LDM's asymmetric padding)."""
    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        """x: (N, C, H, W) -> (N, C, H/2, W/2)."""
        # torch convs pad symmetrically; LDM pads (left 0, right 1, top 0, bottom 1) so that the released weights,
        # trained with this padding, see the same pixels.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""
    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        """x: (N, C, H, W) -> (N, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


#################################################################################
#                   KL Autoencoder: Encoder, Decoder, Posterior                 #
#################################################################################

class Encoder(nn.Module):
    """Image -> latent moments. Each of len(ch_mult) levels holds num_res_blocks ResnetBlocks (+ attention at the
    resolutions in attn_resolutions) and all but the last end in a Downsample: f = 2^(len(ch_mult) - 1)."""
    def __init__(self, *, ch, out_ch=3, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions=(), in_channels=3,
                 resolution, z_channels, double_z=True, dropout=0.0, norm_num_groups=32):
        super().__init__()
        # out_ch is unused here; it is accepted so that one LDM/taming "ddconfig" dict builds Encoder and Decoder.
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res, in_ch_mult = resolution, (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout, norm_num_groups))
                block_in = block_out
                if curr_res in attn_resolutions:  # taming VQ-GAN f16: attention at 16 px; SD-VAE: none
                    attn.append(AttnBlock(block_in, norm_num_groups))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                curr_res = curr_res // 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, norm_num_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_num_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, norm_num_groups)
        self.norm_out = Normalize(block_in, norm_num_groups)
        # KL: mean and logvar stacked on channels (double_z); VQ: the continuous latent alone.
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, padding=1)

    def forward(self, x):
        """x: (N, in_channels, H, W) -> (N, 2 * z_channels or z_channels, H / f, W / f)."""
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image. Mirrors the Encoder with num_res_blocks + 1 blocks per level; self.up[i] is the level at
    resolution H / 2^i, so it runs from up[len(ch_mult) - 1] (coarsest) to up[0] (LDM's order)."""
    def __init__(self, *, ch, out_ch=3, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions=(), in_channels=3,
                 resolution, z_channels, double_z=True, dropout=0.0, norm_num_groups=32):
        super().__init__()
        # in_channels and double_z are unused here; accepted so one ddconfig dict builds Encoder and Decoder.
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, norm_num_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_num_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, norm_num_groups)
        up_levels = []
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout, norm_num_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in, norm_num_groups))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res = curr_res * 2
            up_levels.insert(0, up)  # built coarse -> fine, stored fine -> coarse: up.{i} has LDM's index
        self.up = nn.ModuleList(up_levels)
        self.norm_out = Normalize(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        """z: (N, z_channels, h, w) -> (N, out_ch, h * f, w * f)."""
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """The KL-VAE posterior q(z|x) = N(mean, diag(exp(logvar))), built from the stacked moments."""
    def __init__(self, parameters):
        """parameters: (N, 2C, h, w) = [mean, logvar] on the channel axis."""
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)  # (N, C, h, w) each
        # LDM clamps logvar to [-30, 20] so exp() neither underflows to a zero std nor overflows.
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        """Reparameterised draw z = mean + std * eps, eps ~ N(0, I): (N, C, h, w)."""
        # eps is drawn on the generator's device, so a CPU generator gives the same z on any device.
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self):
        """The posterior mode (= mean): (N, C, h, w)."""
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) summed over C, h, w as in LDM: (N,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


#################################################################################
#                          KL Autoencoder and Configs                           #
#################################################################################

class LatentGrid:
    """What KLVAE and VQGAN share: the latent grid of an LDM Encoder/Decoder pair described by self.config."""
    @property
    def downsampling(self):
        """f: latent side = image side / f (8 for SD-VAE, 16 for kl-f16 and the f16 VQ-GAN)."""
        return 2 ** (len(self.config["ch_mult"]) - 1)

    def latent_shape(self, resolution):
        """(C, h, w) of the continuous latent of a resolution x resolution image: (4, 32, 32) for SD-VAE at 256 px
        (a VQ-GAN's token grid is (h, w))."""
        return (self.config["embed_dim"], resolution // self.downsampling, resolution // self.downsampling)


class KLVAE(LatentGrid, nn.Module):
    """
    LDM's AutoencoderKL: Encoder -> quant_conv -> posterior q(z|x); z -> post_quant_conv -> Decoder. The defaults
    are SD-VAE (LDM kl-f8, 83.65M parameters, 4 x 32 x 32 latents at 256 px); KLVAE_models names the others.
    ch, ch_mult, num_res_blocks, attn_resolutions, resolution: LDM's "ddconfig" (downsampling f = 2^(len(ch_mult)-1);
      attention at the feature-map sides in attn_resolutions, measured at `resolution`, besides the mid block);
    z_channels / embed_dim: latent channels before / after quant_conv (equal in every released model);
    use_quant_conv: SD3's and FLUX's VAEs have neither 1x1 conv around the latent;
    scaling_factor, shift_factor, latents_mean, latents_std: how scale_latents maps z to the generative model's input.
    """
    def __init__(self, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(), z_channels=4,
                 embed_dim=None, in_channels=3, out_ch=3, resolution=256, norm_num_groups=32, dropout=0.0,
                 use_quant_conv=True, scaling_factor=0.18215, shift_factor=0.0, latents_mean=None, latents_std=None):
        super().__init__()
        embed_dim = z_channels if embed_dim is None else embed_dim
        widths = [ch] + [ch * m for m in ch_mult]
        if any(w % norm_num_groups for w in widths):
            raise ValueError(f"norm_num_groups={norm_num_groups} does not divide the channel widths {widths}")
        if not use_quant_conv and embed_dim != z_channels:
            raise ValueError(f"without quant convs the latent has z_channels={z_channels} channels, not "
                             f"embed_dim={embed_dim}")
        for name, v in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if v is not None and len(v) != embed_dim:
                raise ValueError(f"{name} has {len(v)} values for {embed_dim} latent channels")
        # Plain lists and numbers, so the config can ride along in checkpoints (JSON, torch.load(weights_only)).
        self.config = dict(ch=ch, ch_mult=[int(m) for m in ch_mult], num_res_blocks=num_res_blocks,
                           attn_resolutions=[int(r) for r in attn_resolutions], z_channels=z_channels,
                           embed_dim=embed_dim, in_channels=in_channels, out_ch=out_ch, resolution=resolution,
                           norm_num_groups=norm_num_groups, dropout=dropout, use_quant_conv=bool(use_quant_conv),
                           scaling_factor=float(scaling_factor), shift_factor=float(shift_factor),
                           latents_mean=None if latents_mean is None else [float(v) for v in latents_mean],
                           latents_std=None if latents_std is None else [float(v) for v in latents_std])
        dd = dict(ch=ch, out_ch=out_ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, in_channels=in_channels,
                  attn_resolutions=attn_resolutions, resolution=resolution, z_channels=z_channels, dropout=dropout,
                  norm_num_groups=norm_num_groups)
        self.encoder = Encoder(**dd, double_z=True)
        self.decoder = Decoder(**dd)
        if use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)  # (mean, logvar): 8 -> 8
            self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)      # 4 -> 4 for SD-VAE
        else:
            self.quant_conv = self.post_quant_conv = nn.Identity()  # no parameters: SD3 / FLUX state dicts

    @property
    def scaling_factor(self):
        return self.config["scaling_factor"]

    def encode(self, x):
        """x: (N, 3, H, W) in [-1, 1] -> posterior over (N, embed_dim, H / f, W / f)."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """z: (N, embed_dim, h, w) latent (not scaled) -> (N, 3, h * f, w * f) image, roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=True):
        """x: (N, 3, H, W) -> (x_hat, posterior); z is sampled (training) or the posterior mode."""
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_last_layer(self):
        """The weight at which LDM's adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    # ---- the latent normalisation a generative model sees (every stage that encodes or decodes for one) ----
    def _norm(self, z):
        """(shift, scale) broadcastable against z (N, C, h, w): per channel when latents_mean/std are set."""
        c = self.config
        if c["latents_mean"] is None:
            return c["shift_factor"], c["scaling_factor"]
        mean = device_constant(c["latents_mean"], z.device, z.dtype).view(1, -1, 1, 1)
        std = device_constant(c["latents_std"], z.device, z.dtype).view(1, -1, 1, 1)
        return mean, c["scaling_factor"] / std

    def scale_latents(self, z):
        """Autoencoder latent -> generator input: (z - shift) * scale (SD: shift 0, scale 0.18215; SD3: 0.0609,
        1.5305), or (z - mean_c) * scale / std_c per channel when the config has latents_mean / latents_std."""
        shift, scale = self._norm(z)
        return (z - shift) * scale

    def unscale_latents(self, z):
        """Generator output -> autoencoder latent, the inverse of scale_latents: z / scale + shift."""
        shift, scale = self._norm(z)
        return z / scale + shift

    def latent_norm(self):
        """What scale_latents does, for caches and checkpoints to record (a mismatch is then caught)."""
        return {k: self.config[k] for k in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")}


# Every family of networks below has one table, name -> constructor (DiT's `DiT_models` idiom):
# build(KLVAE_models, "sd-vae") or KLVAE_models["sd-vae"](**overrides).
KLVAE_models = {
    "sd-vae": partial(KLVAE),                          # LDM kl-f8 = stabilityai/sd-vae-ft-ema's architecture
    "sdxl-vae": partial(KLVAE, scaling_factor=0.13025),  # same architecture, retrained; SDXL's latent scale
    # CPU-sized f8 autoencoder for tests and the demo (64 px -> 4 x 8 x 8). GroupNorm(32) needs >= 32 channels,
    # so 8 groups here; everything else is SD-VAE's design.
    "tiny": partial(KLVAE, ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, resolution=64, norm_num_groups=8),
    # SD3's and FLUX.1's VAE: SD-VAE's layout with 16 latent channels and no quant convs; their generators see
    # (z - shift) * scale (diffusers vae/config.json of stable-diffusion-3-medium-diffusers and FLUX.1-dev).
    "sd3-vae": partial(KLVAE, z_channels=16, use_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609),
    "flux-vae": partial(KLVAE, z_channels=16, use_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
    # SD-VAE-16 = LDM kl-f16 (configs/autoencoder/autoencoder_kl_16x16x16.yaml): f16, 16 x 16 x 16 latents at 256 px,
    # attention at 16 px. LDM publishes no latent scale for it: measure one (evaluate.py latent-stats).
    "sd-vae-16": partial(KLVAE, ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,), z_channels=16, scaling_factor=1.0),
    # The SD3-style path at CPU size (tests, demo): the tiny autoencoder with 16 channels and no quant convs.
    "tiny-16": partial(KLVAE, ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, resolution=64, norm_num_groups=8,
                       z_channels=16, use_quant_conv=False, scaling_factor=1.0),
}


class UnknownModelError(KeyError, ValueError):
    """A name that is in none of the tables (a KeyError for the lookup, a ValueError for the bad argument)."""
    def __str__(self):
        return str(self.args[0])


def build(table, name, **kwargs):
    """table[name](**kwargs), e.g. build(DiT_models, "DiT-XL/2", input_size=32); an unknown name lists the valid."""
    if name not in table:
        raise UnknownModelError(f"unknown model {name!r}; valid: {', '.join(table)}")
    return table[name](**kwargs)


#################################################################################
#                        LPIPS (VGG16, lin layers v0.1)                         #
#################################################################################

class NetLinLayer(nn.Module):
    """LPIPS's per-layer weighting: dropout then a 1x1 conv to one channel, no bias (keys lin{k}.model.1.weight)."""
    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPS(nn.Module):
    """
    Learned perceptual distance (Zhang et al. 2018), VGG16 variant v0.1; frozen, built in eval mode, with random
    weights (tests): checkpoints.load_lpips() gives the released ones (torchvision's VGG16 + the v0.1 lin layers).
    """
    # Note: the lin layers' Dropout is identity in eval mode. LDM keeps LPIPS inside its Lightning module, whose
    # .train() switches that dropout on during autoencoder training; call .train() to reproduce that, .eval() not to.
    chns = (64, 128, 256, 512, 512)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def __init__(self):
        super().__init__()
        # Scaling layer: maps [-1, 1] inputs to ImageNet-normalised ones (lpips/pretrained_networks.py ScalingLayer).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        # torchvision's vgg16().features[:30], same indices, so features.{i}.* load from vgg16-397923af.pth.
        layers, c_in = [], 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU()]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.slice_ends = (4, 9, 16, 23, 30)  # after features[3]=relu1_2, [8], [15], [22], [29]=relu5_3
        self.lins = nn.ModuleDict({f"lin{k}": NetLinLayer(c) for k, c in enumerate(self.chns)})  # the file's names
        # Random weights: torchvision's VGG init; lin weights >= 0 like the trained ones (LPIPS clamps them during
        # training), so distances stay non-negative.
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for lin, c in zip(self.lins.values(), self.chns):
            nn.init.uniform_(lin.model[1].weight, 0.0, 2.0 / c)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x, y):
        """x, y: (N, 3, H, W) in [-1, 1] -> (N,) distances."""
        h_x, h_y = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        dist, start = 0.0, 0
        for k, end in enumerate(self.slice_ends):
            h_x, h_y = self.features[start:end](h_x), self.features[start:end](h_y)
            start = end
            # Unit-normalise each position's feature vector over channels (eps 1e-10 as in LPIPS).
            n_x = h_x / (h_x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            n_y = h_y / (h_y.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            dist = dist + self.lins[f"lin{k}"]((n_x - n_y).pow(2)).mean(dim=[1, 2, 3])  # weighted, spatial mean: (N,)
        return dist


#################################################################################
#                     PatchGAN Discriminator (taming / pix2pix)                 #
#################################################################################

class NLayerDiscriminator(nn.Module):
    """PatchGAN: a grid of real/fake logits, one per overlapping 70x70 patch for n_layers=3 (taming's names)."""
    def __init__(self, input_nc=3, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        nf_mult = 1
        for n in range(1, n_layers + 1):
            nf_prev, nf_mult = nf_mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # 64->128, 128->256 stride 2; 256->512 stride 1 (taming discriminator/model.py)
            # No conv bias before BatchNorm: BN's shift makes it redundant (and taming's files have none).
            layers += [nn.Conv2d(ndf * nf_prev, ndf * nf_mult, kernel_size=4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * nf_mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * nf_mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        """x: (N, input_nc, H, W) -> logits (N, 1, H', W'); 256 px -> 30 x 30."""
        return self.main(x)


def weights_init(m):
    """taming's init (apply with module.apply): conv N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) (taming losses/vqperceptual.py hinge_d_loss)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


#################################################################################
#                VQ-GAN (taming f16, 1024 codes; the tokenizer of MaskGIT)      #
#################################################################################
# Same Encoder/Decoder as the KL autoencoder above (taming and LDM share them; here with double_z=False), a 1x1
# quant_conv into the codebook space, a nearest-neighbour codebook with a straight-through gradient, and a 1x1
# post_quant_conv back. Parameter names are taming's VQModel names, so its Lightning last.ckpt (and the copy that
# MaskGIT-pytorch distributes) loads unchanged. Sec. 3.3: EQ-VAE applies tau to the continuous output of encode(),
# before quantize(); that is why the two are separate calls.


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient (taming VectorQuantizer2)."""

    def __init__(self, n_embed, embed_dim, beta=0.25, legacy=True):
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        # taming put beta on the wrong term and kept the bug as legacy=True, the default its released weights
        # (and MaskGIT's tokenizer) were trained with; legacy=False is the VQ-VAE paper's placement.
        self.legacy = legacy
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # taming's init

    def nearest_codes(self, z):
        """z: (B, C, h, w) continuous latent -> (B, h, w) long indices of the nearest code (squared L2)."""
        B, C, h, w = z.shape
        if C != self.embed_dim:
            raise ValueError(f"latent has {C} channels but the codebook holds {self.embed_dim}-dim codes")
        # In fp32 even under autocast: distances of 256-dim vectors in bf16 (8-bit mantissa) tie and flip the
        # argmin, so the tokens would depend on the precision flag.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_flat = z.permute(0, 2, 3, 1).reshape(-1, C).float()  # (B*h*w, C)
            e = self.embedding.weight.float()  # (K, C)
            # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, as taming computes it: one matmul, no (N, K, C) tensor
            d = z_flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z_flat @ e.t()  # (B*h*w, K)
        return d.argmin(dim=1).view(B, h, w)

    def embed(self, indices):
        """indices: (B, h, w) long -> codes (B, embed_dim, h, w); out-of-range indices are an error."""
        if indices.dim() != 3 or indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"indices must be an integer tensor of shape (B, h, w); got {indices.dtype} "
                             f"of shape {tuple(indices.shape)}")
        if indices.numel() > 0:
            lo, hi = int(indices.min()), int(indices.max())
            # Checked here because an out-of-range lookup is an IndexError on CPU but an unrecoverable
            # device-side assert on CUDA (e.g. a MaskGIT sample that kept the mask token 1024).
            if lo < 0 or hi >= self.n_embed:
                raise ValueError(f"code indices must lie in [0, {self.n_embed - 1}] for a codebook of "
                                 f"{self.n_embed} codes; got values in [{lo}, {hi}]")
        return self.embedding(indices.long()).permute(0, 3, 1, 2).contiguous()

    def forward(self, z):
        """z: (B, C, h, w) -> (z_q (B, C, h, w) with a straight-through gradient, codebook_loss (), indices (B, h, w))."""
        indices = self.nearest_codes(z)
        z32 = z.float()
        z_q = self.embedding(indices).permute(0, 3, 1, 2).contiguous().float()  # (B, C, h, w); in range by argmin
        # Codebook term pulls the codes to the encoder outputs, commitment term the encoder outputs to the codes.
        codebook = torch.mean((z_q - z32.detach()) ** 2)
        commitment = torch.mean((z_q.detach() - z32) ** 2)
        if self.legacy:
            loss = commitment + self.beta * codebook  # taming legacy=True (released weights)
        else:
            loss = self.beta * commitment + codebook  # van den Oord et al. 2017, taming legacy=False
        # Straight-through estimator: the forward value is z_q, the gradient flows to z unchanged. Written as
        # z_q + (z - sg[z]) rather than taming's z + sg[z_q - z] so the value is the code itself, bit for bit
        # (decode(quantize(z)) == decode_indices(indices)); the two differ by one rounding step, gradients agree.
        z_q = z_q.detach() + (z32 - z32.detach())
        return z_q.to(z.dtype), loss, indices


def codebook_histogram(indices, n_embed):
    """How often each code occurs: indices (any shape, long) -> counts (n_embed,) long. Sum over steps (and
    all_reduce over ranks) to accumulate a window, then pass to codebook_usage_from_histogram."""
    return torch.bincount(indices.reshape(-1).long(), minlength=n_embed)


def codebook_usage_from_histogram(counts):
    """counts (K,) -> (perplexity, dead_codes): exp of the entropy of the code frequencies (K when all codes are
    used equally, 1 when one code takes everything) and the number of codes that never occur."""
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        raise ValueError("codebook usage of an empty histogram: no indices were counted")
    p = counts / total
    entropy = -torch.special.xlogy(p, p).sum()  # 0 log 0 = 0; taming adds 1e-10 inside the log instead
    return float(torch.exp(entropy)), int((counts == 0).sum())


def codebook_usage(indices, n_embed):
    """(perplexity, dead_codes) of the codes in indices (any shape, long) for a codebook of n_embed codes."""
    return codebook_usage_from_histogram(codebook_histogram(indices, n_embed))


class VQGAN(LatentGrid, nn.Module):
    """
    Taming VQModel: encoder -> quant_conv -> codebook -> post_quant_conv -> decoder. The defaults are taming's
    configs/imagenet_vqgan.yaml: the f16 / 1024-code VQ-GAN of MaskGIT-pytorch and of the paper's Table 1, 72,141,699
    parameters, 16 x 16 tokens at 256 px (beta 0.25 is hard-coded in taming's VQModel; legacy=True is
    VectorQuantizer2's default). ddconfig keys as KLVAE; n_embed codes of embed_dim channels.
    """

    def __init__(self, ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                 in_channels=3, resolution=256, z_channels=256, norm_num_groups=32, dropout=0.0, n_embed=1024,
                 embed_dim=256, beta=0.25, legacy=True):
        super().__init__()
        dd = dict(ch=ch, out_ch=out_ch, ch_mult=[int(m) for m in ch_mult], num_res_blocks=num_res_blocks,
                  attn_resolutions=[int(r) for r in attn_resolutions], in_channels=in_channels, resolution=resolution,
                  z_channels=z_channels, norm_num_groups=norm_num_groups, dropout=dropout)  # taming's "ddconfig"
        self.config = dict(dd, n_embed=n_embed, embed_dim=embed_dim, beta=beta, legacy=legacy)
        # Modules in taming's order, so state_dict() lists the keys as released checkpoints do.
        self.encoder = Encoder(**dd, double_z=False)
        self.decoder = Decoder(**dd, double_z=False)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=beta, legacy=legacy)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    def encode(self, x):
        """x: (B, 3, H, W) in [-1, 1] -> continuous latent (B, embed_dim, H/f, W/f), before quantisation
        (where EQ-VAE applies tau to a VQ-GAN, Sec. 3.3)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z_q):
        """z_q: (B, embed_dim, h, w) (quantised, or any latent) -> image (B, 3, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices):
        """indices: (B, h, w) long in [0, n_embed) -> image (B, 3, h*f, w*f)."""
        return self.decode(self.quantize.embed(indices))

    def encode_indices(self, x):
        """x: (B, 3, H, W) -> token indices (B, H/f, W/f) long, as MaskGIT tokenises images."""
        return self.quantize(self.encode(x))[2]

    def forward(self, x):
        """x: (B, 3, H, W) -> (x_hat (B, 3, H, W), codebook_loss (), indices (B, H/f, W/f))."""
        z_q, codebook_loss, indices = self.quantize(self.encode(x))
        return self.decode(z_q), codebook_loss, indices

    def get_last_layer(self):
        """The weight at which taming measures the adaptive GAN weight."""
        return self.decoder.conv_out.weight


VQGAN_models = {
    "vqgan-f16-1024": partial(VQGAN),  # taming / MaskGIT-pytorch's tokenizer (the defaults above)
    # CPU-sized for tests and the demo at 64 px (818K parameters in the encoder + decoder, ~2x faster than ch 32).
    # f8 rather than f16: 64 px / 16 would leave a 4 x 4 token grid, too small for MaskGIT's masking schedule and
    # for EQ-VAE's latent rescaling (only 2 x 2 and 3 x 3 targets); 8 x 8 keeps both meaningful. Attention at the
    # lowest resolution (8 px) as f16-1024 has it at its lowest (16); widths and GroupNorm(8) as the tiny KL-VAE;
    # a 256-code x 16-dim codebook keeps z_channels == embed_dim as in the full model. (taming itself cannot build
    # this one: it hard-codes GroupNorm(32).)
    "tiny": partial(VQGAN, ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(8,), resolution=64,
                    z_channels=16, norm_num_groups=8, n_embed=256, embed_dim=16),
}


#################################################################################
#                  VQ-GAN Fine-tuning Loss (taming VQLPIPSWithDiscriminator)    #
#################################################################################

def adaptive_weight(nll, g_loss, last_layer, grad_scale=None, max_weight=1e4):
    """
    LDM's and taming's adaptive GAN weight: ||grad nll|| / (||grad g_loss|| + 1e-4) at the decoder's last layer,
    clamped to [0, max_weight] (1e4; VA-VAE's VF weight: 1e8), treated as a constant (calculate_adaptive_weight).
    grad_scale: the GradScaler's current scale as a tensor (fp16; None or 1 otherwise). Under fp16 autocast the
    backward through the decoder's last convolution (and LPIPS, the PatchGAN) runs in fp16 like the training
    backward, so the two losses are scaled as GradScaler scales the training loss before differentiating, and the
    gradient norms unscaled in fp32: unscaled, the VQ loss's per-pixel gradient (a mean over 10 x 3 x 256 x 256
    values, ~5e-7) is fp16-subnormal, and the GAN term's can vanish. Where even the scaled gradients overflow, the
    training backward does too and GradScaler skips the step; the weight is 0 then, keeping the loss finite.
    """
    s = 1.0 if grad_scale is None else grad_scale
    nll_grad = torch.autograd.grad(nll * s, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss * s, last_layer, retain_graph=True)[0]
    ratio = (nll_grad.float().norm() / s) / (g_grad.float().norm() / s + 1e-4)
    return torch.nan_to_num(ratio, nan=0.0, posinf=0.0).clamp(0.0, max_weight).detach()


def vq_generator_loss(x, x_hat, codebook_loss, lpips, discriminator, last_layer, disc_factor=1.0,
                      perceptual_weight=1.0, codebook_weight=1.0, disc_weight=0.8, grad_scale=None):
    """Autoencoder loss of the VQ branch, taming's VQLPIPSWithDiscriminator (optimizer_idx 0) as in
    configs/imagenet_vqgan.yaml: codebook_weight 1.0, disc_weight 0.8, perceptual_weight 1.0, hinge GAN.
    x, x_hat: (B, 3, H, W) target (tau-transformed in the equivariance branch) and reconstruction in [-1, 1];
    codebook_loss: () from VQGAN.quantize; lpips: callable (x, y) -> (B,); discriminator: PatchGAN;
    last_layer: VQGAN.get_last_layer(); disc_factor: 0 before the GAN starts; grad_scale: fp16's loss scale (see
    adaptive_weight). Returns (loss, dict of parts).
    The discriminator's own update is the hinge loss shared with the KL branch."""
    # Unlike the KL loss (summed over pixels, divided by B), taming averages: mean over every element of
    # |x - x_hat| + LPIPS, with LPIPS (B,) broadcast over the pixels of its image.
    p_loss = lpips(x, x_hat).view(-1, 1, 1, 1)
    rec = (x - x_hat).abs() + perceptual_weight * p_loss
    nll = rec.mean()
    g_loss = -discriminator(x_hat).mean()
    if disc_factor > 0 and torch.is_grad_enabled() and g_loss.requires_grad:
        # Adaptive weight: balance the GAN gradient against the reconstruction gradient at the decoder's last layer.
        d_weight = adaptive_weight(nll, g_loss, last_layer, grad_scale) * disc_weight
    else:
        d_weight = torch.zeros((), device=x.device)  # taming: 0 when no gradient can be taken (eval)
    loss = nll + d_weight * disc_factor * g_loss + codebook_weight * codebook_loss.mean()
    parts = {"nll": nll.detach(), "rec": (x - x_hat).abs().mean().detach(), "lpips": p_loss.mean().detach(),
             "codebook": codebook_loss.detach().mean(), "g_loss": g_loss.detach(), "d_weight": d_weight.detach(),
             "nll_loss": nll}  # with its graph: what another adaptive weight (VA-VAE's VF loss) balances against
    return loss, parts


#################################################################################
#         Equivariance Error of Latents (App. C.3) and Latent Helpers           #
#################################################################################

def rotate(x, k):
    """Rotate (N, C, H, W) by k quarter turns (rot90 over dims (-1, -2), as the official EQ-VAE training code)."""
    return torch.rot90(x, k, dims=(-1, -2))


def scale(x, s, mode="bilinear"):
    """Resize (N, C, H, W) by factor s (output floor(s H) x floor(s W)): F.interpolate(scale_factor=s, bilinear,
    align_corners=False, no antialias) as the official EQ-VAE training code resizes both image and latent."""
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(x, scale_factor=s, mode=mode, align_corners=False)
    return F.interpolate(x, scale_factor=s, mode=mode)


@torch.no_grad()
def equivariance_error(encode_fn, images, rotations=(1, 2, 3), scales=(0.25, 0.5, 0.75), decode_fn=None,
                       image_interp="bilinear", latent_interp="bilinear"):
    """
    The paper's equivariance error per image (App. C.3): ||tau E(x) - E(tau x)||^2 / ||E(tau x)||^2 for every tau in
    T_r (quarter turns k) and T_s (scales s). The latent is resized with the same factor as the image, so a 256 px
    image (32 x 32 latent) scaled by 0.25 gives a 64 px image and an 8 x 8 latent.
    encode_fn: (N, 3, H, W) images in [-1, 1] -> (N, C, h, w) latents. decode_fn (optional): latents -> images,
    adds the PSNR between tau x and D(tau E(x)) (the paper's Fig. 3 view).
    Returns {name: (N,) tensor}: "rot90", "rot180", "rot270", "scale0.25", ... and, with decode_fn, "psnr/<name>".
    Scaling: the official training code (ldm/models/autoencoder.py) resizes image and latent bilinearly without
    antialias, the default here; the paper's text (Sec. 3.3) says bicubic for the image: image_interp="bicubic".
    """
    z = encode_fn(images).float()
    taus = [(f"rot{90 * k}", "rot", k) for k in rotations] + [(f"scale{s:g}", "scale", s) for s in scales]
    out = {}
    for name, kind, p in taus:
        if kind == "rot":
            z_tau, x_tau = rotate(z, p), rotate(images, p)                     # tau E(x), tau x
        else:
            z_tau, x_tau = scale(z, p, latent_interp), scale(images, p, image_interp)
            x_tau = x_tau.clamp(-1, 1)                                        # bicubic overshoots the image range
        e_tau = encode_fn(x_tau).float()                                      # E(tau x)
        if e_tau.shape != z_tau.shape:
            raise ValueError(f"{name}: E(tau x) has shape {tuple(e_tau.shape)} but tau E(x) {tuple(z_tau.shape)}; "
                             "the image size times the scale must be a multiple of the encoder's stride")
        out[name] = (z_tau - e_tau).pow(2).flatten(1).sum(1) / e_tau.pow(2).flatten(1).sum(1)
        if decode_fn is not None:
            out[f"psnr/{name}"] = psnr(data.to_uint8(decode_fn(z_tau).float()), data.to_uint8(x_tau))
    return out


def summarize_equivariance(errors):
    """Mean per transform and over T_r ("rotation") and T_s ("scale") of equivariance_error's per-image values."""
    means = {k: float(v.double().mean()) for k, v in errors.items()}
    for group, prefix in (("rotation", "rot"), ("scale", "scale")):
        for kind in ("", "psnr/"):
            keys = [k for k in errors if k.startswith(kind + prefix)]
            if keys:
                means[kind + group] = float(np.mean([means[k] for k in keys]))
    return means


def block_dct_spectrum(x, block=8):
    """
    The block DCT spectrum of Skorokhodov et al. 2025 (arXiv 2502.14831, Sec. 3), of images or latents (N, C, H, W):
    each channel cut into block x block tiles (H, W cropped to multiples), an orthonormal 2-D DCT-II per tile, the
    amplitudes A_uv = mean |X_uv| / mean |X_00| over tiles, channels and images (the ratio of means: a latent tile's
    DC can be ~0, which makes the per-tile ratio explode), in zigzag order. Returns (block^2,) numpy, A[0] = 1.
    """
    n = torch.arange(block, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * n[None] + 1) * n[:, None] / (2 * block)) * math.sqrt(2 / block)
    d[0] /= math.sqrt(2)                                                   # orthonormal DCT-II matrix (k, i)
    z = x.double()[..., :x.shape[-2] // block * block, :x.shape[-1] // block * block]
    tiles = z.unfold(-2, block, block).unfold(-2, block, block)           # (N, C, H/b, W/b, b, b)
    amp = (d @ tiles @ d.t()).abs().mean(dim=(0, 1, 2, 3))
    order = sorted(((u, v) for u in range(block) for v in range(block)),    # JPEG zigzag: by diagonal, alternating
                   key=lambda t: (t[0] + t[1], t[0] if (t[0] + t[1]) % 2 else t[1]))
    return np.array([float(amp[u, v] / amp[0, 0]) for u, v in order])


def high_frequency_share(spectrum):
    """The share of the non-DC amplitude in the upper half of the zigzag (u + v >= block): one number per curve."""
    block = int(math.isqrt(len(spectrum)))
    upper = len(spectrum) - block * (block + 1) // 2                      # zigzag indices with u + v >= block
    return float(spectrum[-upper:].sum() / spectrum[1:].sum())


def linear_cka(a, b):
    """Linear CKA (Kornblith et al. 2019) of paired rows a (n, p), b (n, q): ||b^T a||_F^2 / (||a^T a||_F ||b^T b||_F)
    on centred columns; 1 when one is an orthogonal map and scaling of the other, invariant to both."""
    a, b = a.double() - a.double().mean(0), b.double() - b.double().mean(0)
    return float((b.t() @ a).square().sum() / ((a.t() @ a).norm() * (b.t() @ b).norm()))


def is_vq(vae):
    """A VQGAN (encode -> continuous latent, quantize) rather than a KL-VAE (encode -> posterior)."""
    return hasattr(vae, "quantize")


def encoder_fn(vae, latent="mean"):
    """
    images -> latents. KL-VAE: posterior mean ("mean", the equivariance error's E) or a posterior sample
    ("sample", what the decoder sees in reconstruction). VQ-GAN: the continuous pre-quantisation latent ("mean")
    or the quantised one ("sample").
    """
    def encode(x):
        if is_vq(vae):
            z = vae.encode(x)
            return vae.quantize(z)[0] if latent == "sample" else z
        posterior = vae.encode(x)
        return posterior.sample() if latent == "sample" else posterior.mean
    return encode


def decoder_fn(vae):
    """latents -> images in [-1, 1]; a VQ-GAN quantises first (Sec. 3.3: tau acts before quantisation)."""
    def decode(z):
        if is_vq(vae):
            z = vae.quantize(z)[0]
        return vae.decode(z)
    return decode


def psnr(x, y, peak=255.0):
    """Per-image PSNR (dB) of (N, C, H, W) images on the uint8 scale: 10 log10(peak^2 / MSE), MSE over C, H, W."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(peak ** 2 / mse)


def ssim(x, y, data_range=None, crop=False, k1=0.01, k2=0.03):
    """
    Per-image SSIM (Wang et al. 2004) of (N, C, H, W) images: Gaussian window 11 / sigma 1.5, population statistics,
    the mean over all positions and channels. The defaults are torchmetrics' (>= 1.5) StructuralSimilarityIndexMeasure
    as the official EQ-VAE eval.py calls it, one image per call: data_range None = max(range of x, range of y) per
    image, reflect padding by 5 so the map covers every pixel. data_range (lo, hi) first clamps both to [lo, hi]
    (LightningDiT's evaluate_tokenizer.py: (-1, 1)); a number is used as is. crop=True averages only the valid
    (unpadded) positions: skimage's structural_similarity(gaussian_weights=True, use_sample_covariance=False).
    """
    x, y = x.double(), y.double()
    if isinstance(data_range, tuple):
        x, y = x.clamp(*data_range), y.clamp(*data_range)
        data_range = data_range[1] - data_range[0]
    elif data_range is None:
        span = lambda t: t.flatten(1).max(1).values - t.flatten(1).min(1).values
        data_range = torch.maximum(span(x), span(y)).view(-1, 1, 1, 1)
    if not crop:
        x, y = F.pad(x, (5, 5, 5, 5), mode="reflect"), F.pad(y, (5, 5, 5, 5), mode="reflect")
    g = torch.exp(-(torch.arange(11, dtype=torch.float64, device=x.device) - 5) ** 2 / (2 * 1.5 ** 2))
    g = (g / g.sum()).repeat(x.shape[1], 1, 1, 1)                        # (C, 1, 1, 11), separable

    def blur(t):
        return F.conv2d(F.conv2d(t, g, groups=t.shape[1]), g.transpose(2, 3), groups=t.shape[1])

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = (blur(x * x) - mu_x ** 2).clamp_min(0), (blur(y * y) - mu_y ** 2).clamp_min(0)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


#################################################################################
#               DiT: Embedding Layers for Timesteps and Class Labels            #
#################################################################################
# The DiT/SiT/REPA backbone (Peebles & Xie 2023; Ma et al. 2024; Yu et al. 2025). Parameter names and shapes are
# those of facebookresearch/DiT's models.py, so the official DiT-XL-2-256x256.pt, SiT-XL-2-256.pt and
# REPA checkpoints load with load_state_dict unchanged. The timm PatchEmbed/Attention/Mlp the official code imports
# are written out below with the same attribute names (proj, qkv, fc1, fc2).

def modulate(x, shift, scale):
    """adaLN: x (N, T, D) scaled and shifted per sample by (N, D) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vector representations: sinusoid -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """t: (N,) timesteps, possibly fractional (SiT uses t in [0, 1]) -> (N, dim) [cos | sin] features (GLIDE)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Embeds class labels; index num_classes is the "null" label that label dropout uses for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)  # one extra row for the null class
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace a random dropout_prob fraction of labels (or those flagged in force_drop_ids) by the null class."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class DiTPatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: (N, C, H, W) -> (N, H*W/p^2, D). Same names as timm's PatchEmbed."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.img_size = (input_size, input_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (input_size // patch_size, input_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"DiT built for {self.img_size[0]}x{self.img_size[1]} latents got {tuple(x.shape[-2:])}: "
                             f"set input_size = image_size / VAE downsampling factor")
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class DiTAttention(nn.Module):
    """Multi-head self-attention (timm's Attention with qkv_bias=True) through F.scaled_dot_product_attention."""

    def __init__(self, dim, num_heads):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                        # (B, nh, T, hs) each
        x = F.scaled_dot_product_attention(q, k, v)    # softmax(q k^T / sqrt(hs)) v, fused kernel when available
        x = x.transpose(1, 2).reshape(B, T, C)         # (B, T, C)
        return self.proj(x)


class DiTMlp(nn.Module):
    """Transformer MLP: Linear -> GELU (tanh approximation, as DiT) -> Linear."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning (DiT paper, Sec. 3.2)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = DiTAttention(hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = DiTMlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        """x: (N, T, D) tokens, c: (N, D) conditioning (timestep + class embedding)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class DiTFinalLayer(nn.Module):
    """The final layer of DiT: adaLN (shift, scale) then a linear map to p*p*C_out values per token."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def build_projector(hidden_size, projector_dim, z_dim):
    """REPA's projector MLP h_phi (REPA Sec. 3.3): Linear-SiLU-Linear-SiLU-Linear; keys {0, 2, 4}."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


class DiT(nn.Module):
    """
    Diffusion model with a Transformer backbone, shared by DiT, SiT and REPA.
    learn_sigma: 2C output channels (mean + variance interpolation, DiT/SiT checkpoints) or C (REPA).
    encoder_depth, z_dims, projector_dim: REPA's projectors on the tokens after block `encoder_depth`; when
    encoder_depth is set, forward returns (output, [projected tokens (N, T, z_dim) per projector]) as REPA's SiT does.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True,
                 encoder_depth=None, z_dims=(), projector_dim=2048):
        super().__init__()
        if encoder_depth is not None and not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth={encoder_depth} must be in [1, depth={depth}]")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.z_dims = list(z_dims)

        self.x_embedder = DiTPatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed 2-D sin-cos embedding; a frozen Parameter (not a buffer) because the checkpoints store it as one.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        # Empty unless REPA: adds no state-dict keys to DiT/SiT.
        self.projectors = nn.ModuleList([build_projector(hidden_size, projector_dim, z) for z in self.z_dims])
        self.final_layer = DiTFinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        """
        DiT's initialisation (its models.py), as one rule per parameter: adaLN-Zero (DiT Sec. 3.2) zeroes every
        adaLN modulation output and the final linear layer, so each block starts as the identity and the model
        predicts 0; the label table and the timestep MLP's weights are N(0, 0.02); every other weight matrix is
        Xavier-uniform (the patch convolution as the matrix it is on flattened patches), biases 0; the position
        embedding is the fixed 2-D sin-cos table (MAE). REPA's projectors follow the general rule, as in REPA.
        """
        for name, p in self.named_parameters():
            if name == "pos_embed":
                if not p.is_meta:  # built on the meta device for shape checks: nothing to fill
                    grid = int(self.x_embedder.num_patches ** 0.5)
                    p.copy_(torch.from_numpy(get_2d_sincos_pos_embed(p.shape[-1], grid)).float().unsqueeze(0))
            elif "adaLN_modulation" in name or name.startswith("final_layer.linear") or name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.startswith(("y_embedder.", "t_embedder.")):
                nn.init.normal_(p, std=0.02)
            else:
                nn.init.xavier_uniform_(p.view(p.shape[0], -1))

    def unpatchify(self, x):
        """x: (N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        """
        x: (N, C, H, W) latents, t: (N,) diffusion timesteps (indices for DiT, floats for SiT), y: (N,) class labels.
        Returns (N, out_channels, H, W), or (that, [(N, T, z_dim), ...]) when REPA's encoder_depth is set.
        """
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), where T = H * W / patch_size ** 2
        N, T, D = x.shape
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        zs = []
        for i, block in enumerate(self.blocks):
            x = block(x, c)  # (N, T, D)
            if self.encoder_depth is not None and i + 1 == self.encoder_depth:
                # REPA: align the hidden states after the first encoder_depth blocks with the vision encoder.
                zs = [projector(x.reshape(-1, D)).reshape(N, T, -1) for projector in self.projectors]  # (N, T, z)
        x = self.final_layer(x, c)  # (N, T, p * p * out_channels)
        x = self.unpatchify(x)      # (N, out_channels, H, W)
        return (x, zs) if self.encoder_depth is not None else x

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_all_channels=False, guidance_interval=(0.0, 1.0)):
        """
        Classifier-free guidance in one batched forward. x, t, y: (2N, ...) with the conditional half first and the
        null label in the second half; the first half of x is used for both. Returns (2N, out_channels, H, W) with the
        guided eps in both halves. guidance_interval (low, high): guide only where low <= t / 1000 <= high (DiT's
        1000 training steps; t = 0 is the data), the conditional output elsewhere (the interval of Kynkaanniemi
        et al. 2024 that REPA samples with, EQ-VAE Table 4's *).
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        if isinstance(model_out, tuple):
            model_out = model_out[0]
        # For exact reproducibility of the official numbers, guidance acts on only the first three channels of
        # SD-VAE's 4 by default, as in DiT and SiT (a leftover; cfg 1.5 on 3 of 4 channels ~ 1.375 on all); on other
        # latents (SD3 / FLUX: 16 channels) on all, the standard formulation, as cfg_all_channels=True does.
        n = self.in_channels if cfg_all_channels or self.in_channels != 4 else 3
        eps, rest = model_out[:, :n], model_out[:, n:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        low, high = guidance_interval
        if (low, high) != (0.0, 1.0):
            tau = (t[: len(t) // 2].float() / 1000).view(-1, 1, 1, 1)
            half_eps = torch.where((tau >= low) & (tau <= high), half_eps, cond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# MAE's fixed 2-D embedding: half of the channels encode the row, half the column, each [sin | cos] of
# position * 10000^(-2i/D). Computed in float64 numpy as the reference, then stored as float32.

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """-> (grid_size * grid_size, embed_dim) numpy array, tokens in row-major order."""
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    # The reference meshgrids (w, h) and feeds the first (the w grid) as "emb_h": keep that order exactly.
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_w)  # (H*W, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_h)  # (H*W, D/2)
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """pos: positions of any shape (M values) -> (M, embed_dim) [sin | cos]."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega                          # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)    # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                   DiT Configs                                  #
#################################################################################

# Depth, width and heads of each size (DiT Table 1); SiT and REPA use the same sizes, with patch 2, 4 or 8. "T" is
# not in the papers: a CPU-sized model for the tiny preset and
# tests (8 x 8 x 4 latents of 64 px images).
DIT_SIZES = {"XL": dict(depth=28, hidden_size=1152, num_heads=16), "L": dict(depth=24, hidden_size=1024, num_heads=16),
             "B": dict(depth=12, hidden_size=768, num_heads=12), "S": dict(depth=12, hidden_size=384, num_heads=6),
             "T": dict(depth=4, hidden_size=128, num_heads=4)}
# Patch 1 serves f16 autoencoders (SD-VAE-16: 16 x 16 x 16 latents at 256 px), where /2 leaves 64 tokens: the
# EQ-VAE code has /2, /4, /8 only and hard-codes f8 latents, and the paper's SD-VAE-16 row (gFID 64.1 vs 43.8 for
# SD-VAE with DiT-B/2) fits B/2's 4x fewer tokens; both are here.
DIT_PATCHES = {"XL": (1, 2, 4, 8), "L": (1, 2, 4, 8), "B": (1, 2, 4, 8), "S": (1, 2, 4, 8), "T": (1, 2)}
DiT_models = {f"DiT-{size}/{p}": partial(DiT, patch_size=p, **cfg) for size, cfg in DIT_SIZES.items()
              for p in DIT_PATCHES[size]}


#################################################################################
#                  Gaussian Diffusion (DiT's training and sampling)             #
#################################################################################
# DDPM (Ho et al. 2020) with the improvements of IDDPM (Nichol & Dhariwal 2021) that DiT trains with (its
# diffusion/gaussian_diffusion.py):
# 1000-step linear betas, eps prediction, learned-range variance trained by the VLB on a detached mean, and respaced
# sampling. Schedule constants are float64 numpy arrays as in the reference; they are gathered per timestep and cast
# to float32 where they meet the tensors.

def linear_beta_schedule(num_timesteps):
    """Ho et al.'s betas 1e-4 .. 0.02 over 1000 steps, scaled to keep the same shape for other step counts."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps, section_counts):
    """
    Timesteps kept when respacing (IDDPM): section_counts "250" keeps 250 evenly strided steps, "10,15,20" strides
    each third of the process separately, "ddim50" uses DDIM's integer stride. Returns a sorted list.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):  # accumulated, not multiplied: the rounding then matches the reference exactly
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF used by the reference likelihood."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """
    log-probability (nats, elementwise) of data x in [-1, 1] quantised to 256 levels (bins of width 2/255) under
    N(means, exp(log_scales)^2); the edge bins extend to -inf / +inf (Ho et al. 2020, Eq. 13).
    """
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x):
    """Mean over all but the batch dimension: (N, ...) -> (N,)."""
    return x.mean(dim=list(range(1, x.ndim)))


class GaussianDiffusion:
    """
    A diffusion process with the given betas; after respacing, `timestep_map[i]` is the original timestep that
    index i stands for, and the model always sees original timesteps (as trained).
    learn_sigma: the model outputs 2C channels, the second half v in [-1, 1] sets
    log variance = (v+1)/2 log beta_t + (1-(v+1)/2) log beta~_t (IDDPM Eq. 15); otherwise fixed variance beta_t.
    """

    def __init__(self, betas, learn_sigma=True, timestep_map=None):
        self.betas = betas = np.asarray(betas, dtype=np.float64)  # float64 for accuracy, as the reference
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)                            # alpha-bar_t
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])  # alpha-bar_{t-1}
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t) (Ho et al. Eq. 6-7):
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0: its log is clipped to beta~_1 (the reference does the same)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:])) \
            if self.num_timesteps > 1 else np.array([])
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # Fixed "large" variance when sigma is not learned: beta_t, with beta~_1 at t = 0 for a better decoder NLL.
        self.fixed_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:]))
        self.log_betas = np.log(betas)
        self._tables = {}  # (name, device, dtype) -> the table as a tensor on that device

    def _table(self, name, device, dtype=torch.float64):
        """The numpy table self.<name> as a tensor on `device`, copied there once: a copy per use would be a
        blocking host-to-device transfer (16 per DiT training step)."""
        key = (name, str(device), dtype)
        if key not in self._tables:
            self._tables[key] = torch.as_tensor(getattr(self, name), dtype=dtype).to(device)
        return self._tables[key]

    def _extract(self, name, t, x):
        """self.<name>[t] for a batch of indices t (N,), as float32 shaped (N, 1, 1, 1) to broadcast against x.
        Gathered from the float64 table, then cast, as the reference (_extract_into_tensor) does."""
        return self._table(name, t.device)[t].float().view(-1, *([1] * (x.ndim - 1)))

    def _model(self, model, x, t, model_kwargs):
        """Call the model at the original timesteps that the (possibly respaced) indices t stand for."""
        ts = self._table("timestep_map", t.device, t.dtype)[t]
        out = model(x, ts, **(model_kwargs or {}))
        return out[0] if isinstance(out, tuple) else out  # REPA returns (output, projections)

    # ---- forward process ----
    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. t = 0 is one step of noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """q(x_{t-1} | x_t, x_0): (mean, variance, clipped log variance)."""
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        return mean, self._extract("posterior_variance", t, x_t), \
            self._extract("posterior_log_variance_clipped", t, x_t)

    # ---- reverse process ----
    def _predict_xstart_from_eps(self, x_t, t, eps):
        return self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t \
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) \
            / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t)

    def p_mean_variance(self, model_output, x, t, clip_denoised=False):
        """
        p(x_{t-1} | x_t) from the model output (N, C or 2C, H, W) at x_t = x (N, C, H, W):
        dict of mean, variance, log_variance and pred_xstart (the eps-implied x_0).
        """
        C = x.shape[1]
        model_output = model_output.float()
        if self.learn_sigma:
            assert model_output.shape[1] == 2 * C, f"learn_sigma needs {2 * C} output channels"
            eps, var_values = torch.split(model_output, C, dim=1)
            min_log = self._extract("posterior_log_variance_clipped", t, x)
            max_log = self._extract("log_betas", t, x)
            frac = (var_values + 1) / 2  # [-1, 1] -> [beta~_t, beta_t] in log space (IDDPM Eq. 15)
            model_log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output[:, :C]
            model_log_variance = self._extract("fixed_log_variance", t, x).expand_as(x)
        pred_xstart = self._predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": torch.exp(model_log_variance), "log_variance": model_log_variance,
                "pred_xstart": pred_xstart}

    def p_sample(self, model, x, t, clip_denoised=False, model_kwargs=None, generator=None):
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t); no noise at t = 0."""
        out = self.p_mean_variance(self._model(model, x, t, model_kwargs), x, t, clip_denoised)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return {"sample": out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise,
                "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=False, model_kwargs=None, generator=None, eta=0.0):
        """One DDIM step (Song et al. 2021, Eq. 12); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
        out = self.p_mean_variance(self._model(model, x, t, model_kwargs), x, t, clip_denoised)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean_pred + nonzero_mask * sigma * noise, "pred_xstart": out["pred_xstart"]}

    @torch.no_grad()
    def sample_loop_progressive(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None, device=None,
                                progress=False, generator=None, ddim=False, eta=0.0):
        """Yield each step's {"sample", "pred_xstart"} from x_T ~ N(0, I) (or `noise`) down to x_0."""
        if device is None:  # the model's device; `model` may be a bound method such as forward_with_cfg
            owner = getattr(model, "__self__", model)
            device = next(owner.parameters()).device if isinstance(owner, nn.Module) else "cpu"
        img = noise if noise is not None else torch.randn(*shape, generator=generator, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm
            indices = tqdm(indices)
        for i in indices:
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)  # made on the device: no copy
            if ddim:
                out = self.ddim_sample(model, img, t, clip_denoised, model_kwargs, generator, eta)
            else:
                out = self.p_sample(model, img, t, clip_denoised, model_kwargs, generator)
            yield out
            img = out["sample"]

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None, device=None,
                      progress=False, generator=None):
        """Ancestral sampling (DiT's sampler): the final x_0 of shape `shape`."""
        for out in self.sample_loop_progressive(model, shape, noise, clip_denoised, model_kwargs, device, progress,
                                                generator):
            pass
        return out["sample"]

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None, device=None,
                         progress=False, generator=None, eta=0.0):
        """DDIM sampling: the final x_0 of shape `shape`."""
        for out in self.sample_loop_progressive(model, shape, noise, clip_denoised, model_kwargs, device, progress,
                                                generator, ddim=True, eta=eta):
            pass
        return out["sample"]

    # ---- training objective ----
    def vb_terms_bpd(self, model_output, x_start, x_t, t):
        """
        One term of the variational bound, in bits per dimension (N,): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for
        t > 0 and the decoder NLL -log p(x_0 | x_1) for t = 0 (Ho et al. Eq. 5).
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """
        DiT's loss for x_0 = x_start (N, C, H, W) at timesteps t (N,): {"loss", "mse", "vb"} each (N,).
        loss = ||eps - eps_theta||^2 (mean over dims) + VLB on the learned variance with the mean detached, so the
        VLB only trains the variance. This is IDDPM's L_hybrid (Sec. 3.1) with lambda = 1/1000: the VLB is T = 1000
        times the one-step term drawn here, so lambda * T = 1.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self._model(model, x_t, t, model_kwargs).float()
        C = x_t.shape[1]
        terms = {}
        if self.learn_sigma:
            eps, var_values = torch.split(model_output, C, dim=1)
            frozen_out = torch.cat([eps.detach(), var_values], dim=1)  # gradient of the VLB reaches only the variance
            terms["vb"] = self.vb_terms_bpd(frozen_out, x_start, x_t, t)
        else:
            eps = model_output[:, :C]
        terms["mse"] = mean_flat((noise - eps) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


def create_diffusion(timestep_respacing="", learn_sigma=True, diffusion_steps=1000):
    """
    DiT's diffusion: linear schedule over `diffusion_steps`, respaced to `timestep_respacing` ("" or None: all steps
    for training; "250" for DiT's sampler; "ddim50" ...). Respacing keeps alpha-bar at the kept steps exactly:
    beta'_i = 1 - abar_{s_i} / abar_{s_{i-1}}.
    """
    betas = linear_beta_schedule(diffusion_steps)
    if not timestep_respacing:
        return GaussianDiffusion(betas, learn_sigma=learn_sigma)
    use_timesteps = space_timesteps(diffusion_steps, str(timestep_respacing))
    alphas_cumprod = np.cumprod(1.0 - betas)
    new_betas, last = [], 1.0
    for i in use_timesteps:
        new_betas.append(1 - alphas_cumprod[i] / last)
        last = alphas_cumprod[i]
    return GaussianDiffusion(np.array(new_betas), learn_sigma=learn_sigma, timestep_map=use_timesteps)


#################################################################################
#                          SiT and SiT+REPA Configs                             #
#################################################################################
# SiT (Ma et al. 2024) is DiT's network trained as a flow: the same blocks and keys (SiT's models.py), t in [0, 1]
# fed to the same sinusoidal embedder, and the output read as a velocity. The released SiT-XL-2-256.pt still has
# DiT's learned-sigma head (8 channels); SiT's forward keeps the first half and ignores the rest. REPA (Yu et al.
# 2025) drops that head (4 channels) and adds projectors on the hidden states after block `encoder_depth`;
# forward then returns (output, [projected tokens]) as REPA's models/sit.py does.

class SiT(DiT):
    """DiT's backbone as SiT and REPA use it: velocity output, DiT's learned-sigma channels dropped."""

    def __init__(self, learn_sigma=None, **kwargs):
        # SiT's checkpoints keep DiT's learned-sigma head; REPA's model (projectors given) has none.
        if learn_sigma is None:
            learn_sigma = kwargs.get("encoder_depth") is None and not kwargs.get("z_dims")
        super().__init__(learn_sigma=learn_sigma, **kwargs)

    def forward(self, x, t, y):
        """
        x: (N, C, H, W) latents, t: (N,) float times in [0, 1], y: (N,) labels.
        Returns (N, C, H, W), or ((N, C, H, W), [(N, T, z_dim), ...]) with REPA's projectors.
        """
        out = super().forward(x, t, y)
        if not self.learn_sigma:
            return out
        # The official SiT forward: x, _ = x.chunk(2, dim=1). The second half was never trained for anything.
        if isinstance(out, tuple):
            return out[0].chunk(2, dim=1)[0], out[1]
        return out.chunk(2, dim=1)[0]


SiT_models = {f"SiT-{size}/{p}": partial(SiT, patch_size=p, **cfg) for size, cfg in DIT_SIZES.items()
              for p in DIT_PATCHES[size]}


#################################################################################
#                Interpolant Transport (SiT and REPA training/sampling)         #
#################################################################################
# Stochastic interpolants (Albergo & Vanden-Eijnden 2023; SiT Sec. 2): x_t = alpha_t x1 + sigma_t x0 joins noise
# x0 ~ N(0, I) and data x1. A network learns the velocity u_t = d x_t / dt = alpha'_t x1 + sigma'_t x0 (or the score
# or the noise), and new samples come from integrating the probability-flow ODE dx/dt = v(x, t), or an SDE with the
# same marginals, from noise to data. Everything below is SiT's transport/ package (paths, losses, ODE/SDE
# samplers) and REPA's samplers.py written out once.
#
# Two clocks. SiT puts data at t = 1 (x_t = t x1 + (1 - t) x0, target x1 - x0). REPA puts data at t = 0
# (x_t = (1 - t) x + t eps, target eps - x). Same path, reversed time: t_REPA = 1 - t_SiT and the velocity flips
# sign. A Transport has a `clock` ("sit" or "repa"): the model always sees times of its own clock, training
# targets are derivatives in that clock, and samplers integrate in it (REPA from 1 down to 0), so each family's
# official checkpoints sample exactly as their own code does. Paths are written in SiT time `s` below.

class Transport:
    """
    An interpolant path plus what is trained and how samples are drawn.
    path_type: "Linear" (alpha = s, sigma = 1 - s), "GVP" (sin/cos; REPA's "cosine") or "VP" (score-SDE's VP path).
    prediction: "velocity" (SiT/REPA default), "score" or "noise"; loss_weight None, "velocity" or "likelihood"
    (score/noise only). time_sampling: "uniform" (SiT, REPA) or "logit_normal" (REPA's "lognormal": noise-to-signal
    ratio sigma/alpha ~ LogNormal(0, 1), which for the Linear path is logit(t) ~ N(0, 1)). clock: "sit" or "repa".
    """

    def __init__(self, path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None,
                 time_sampling="uniform", clock="sit"):
        for name, value, valid in [("path_type", path_type, ("Linear", "GVP", "VP")),
                                   ("prediction", prediction, ("velocity", "score", "noise")),
                                   ("loss_weight", loss_weight, (None, "velocity", "likelihood")),
                                   ("time_sampling", time_sampling, ("uniform", "logit_normal")),
                                   ("clock", clock, ("sit", "repa"))]:
            if value not in valid:
                raise ValueError(f"{name}={value!r}; choose from {valid}")
        if time_sampling == "logit_normal" and path_type == "VP":
            raise ValueError("logit_normal time sampling is defined for the Linear and GVP paths (as REPA's)")
        self.path_type, self.prediction, self.loss_weight = path_type, prediction, loss_weight
        self.time_sampling, self.clock = time_sampling, clock
        self.beta_min, self.beta_max = 0.1, 20.0  # VP path constants (SiT's VPCPlan; score-SDE's beta(t) range)
        # Endpoint offsets (SiT create_transport): velocity on Linear/GVP is finite everywhere, so [0, 1] is used in
        # full; score and noise blow up at an end (a 1/sigma or 1/alpha), and on the VP path sigma' is infinite at
        # the data (sigma = 0).
        if path_type == "VP":
            default_train, default_sample = 1e-5, 1e-3
        elif prediction != "velocity":
            default_train, default_sample = 1e-3, 1e-3
        else:
            default_train, default_sample = 0.0, 0.0
        self.train_eps = default_train if train_eps is None else train_eps
        self.sample_eps = default_sample if sample_eps is None else sample_eps
        self.ds_dt = 1.0 if clock == "sit" else -1.0  # d(SiT time) / d(this clock's time)
        self.nfe = 0  # network evaluations of the last sampler call

    # ---- the path ----
    def to_sit_time(self, t):
        """This clock's time -> SiT time s (data at s = 1). The map is its own inverse."""
        return t if self.clock == "sit" else 1 - t

    def _path(self, s):
        """(alpha, d alpha / ds, sigma, d sigma / ds) at SiT times s (a tensor)."""
        if self.path_type == "Linear":  # straight line between noise and data (rectified flow)
            return s, torch.ones_like(s), 1 - s, -torch.ones_like(s)
        if self.path_type == "GVP":  # alpha^2 + sigma^2 = 1 with constant speed on the quarter circle
            h = math.pi / 2
            return torch.sin(h * s), h * torch.cos(h * s), torch.cos(h * s), -h * torch.sin(h * s)
        # VP: the variance-preserving diffusion (DDPM/score SDE) with beta(r) linear from beta_min to beta_max in
        # diffusion time r = 1 - s: log alpha = -1/4 r^2 (beta_max - beta_min) - 1/2 r beta_min, sigma^2 = 1 - alpha^2.
        r = 1 - s
        log_alpha = -0.25 * r ** 2 * (self.beta_max - self.beta_min) - 0.5 * r * self.beta_min
        d_log_alpha = 0.5 * r * (self.beta_max - self.beta_min) + 0.5 * self.beta_min  # = beta(r) / 2
        alpha = torch.exp(log_alpha)
        sigma = torch.sqrt(1 - alpha ** 2)
        return alpha, alpha * d_log_alpha, sigma, -alpha ** 2 * d_log_alpha / sigma  # sigma' = -alpha alpha' / sigma

    def coefficients(self, t):
        """(alpha_t, alpha'_t, sigma_t, sigma'_t) at times t of this clock, derivatives taken in this clock."""
        alpha, d_alpha, sigma, d_sigma = self._path(self.to_sit_time(t))
        return alpha, self.ds_dt * d_alpha, sigma, self.ds_dt * d_sigma

    def drift_var(self, t):
        """
        lambda_t = (alpha'/alpha) sigma^2 - sigma sigma' (SiT time, >= 0): velocity = (alpha'/alpha) x + lambda score,
        which follows from Tweedie's E[x1 | x] = (x + sigma^2 score) / alpha and E[x0 | x] = -sigma score.
        """
        alpha, d_alpha, sigma, d_sigma = self._path(self.to_sit_time(t))
        return d_alpha / alpha * sigma ** 2 - sigma * d_sigma

    def interval(self, sde=False, train=False, diffusion_form="sigma", last_step_size=0.0):
        """
        (t_noise, t_data) in this clock: the range training draws t from and samplers integrate over
        (SiT's check_interval). With an SDE's last step the integration stops last_step_size short of the data.
        """
        eps = self.train_eps if train else self.sample_eps
        d_noise, d_data = 0.0, 0.0  # how far each end stays from pure noise and from the data (SiT time units)
        end = last_step_size if (sde and last_step_size > 0) else eps
        if self.path_type == "VP":
            d_data = end
        elif self.prediction != "velocity" or sde:
            d_noise = eps if (sde and diffusion_form == "SBDM") or self.prediction != "velocity" else 0.0
            d_data = end
        # Written per clock (not via to_sit_time) so REPA's ends are exactly its 1 and 0.04.
        return (d_noise, 1 - d_data) if self.clock == "sit" else (1 - d_noise, d_data)

    # ---- training ----
    def sample_time(self, n, device, train=True):
        """(n,) training times in this clock (uniform on the training interval, or REPA's log-normal)."""
        if self.time_sampling == "uniform":
            lo, hi = sorted(self.interval(train=train))
            return torch.rand(n, device=device) * (hi - lo) + lo
        ratio = torch.randn(n, device=device).exp()  # sigma_t / alpha_t ~ LogNormal(0, 1) (EDM, REPA loss.py)
        s = 1 / (1 + ratio) if self.path_type == "Linear" else torch.atan(1 / ratio) * (2 / math.pi)
        return self.to_sit_time(s)

    def training_losses(self, model, x1, model_kwargs=None):
        """
        SiT's objective for data x1 (N, C, H, W): dict with "loss" (N,), "t" (N,), "pred" and, for REPA's model,
        "zs" (its projected hidden states). Velocity: ||v_theta(x_t, t) - u_t||^2; noise/score with SiT's weights.
        """
        t = self.sample_time(x1.shape[0], x1.device)
        x0 = torch.randn_like(x1)
        tb = t.view(-1, *[1] * (x1.ndim - 1)).to(x1.dtype)
        alpha, d_alpha, sigma, d_sigma = self.coefficients(tb)
        xt = alpha * x1 + sigma * x0   # a point on the path
        ut = d_alpha * x1 + d_sigma * x0  # its velocity: SiT x1 - x0, REPA eps - x (clocks run opposite ways)
        out = model(xt, t, **(model_kwargs or {}))
        zs = None
        if isinstance(out, tuple):  # REPA: (output, projected hidden states)
            out, zs = out
        if self.prediction == "velocity":
            loss = mean_flat((out - ut) ** 2)
        else:
            lam = self.drift_var(tb)
            weight = {None: 1.0, "velocity": (lam / sigma) ** 2, "likelihood": lam / sigma ** 2}[self.loss_weight]
            if self.prediction == "noise":  # out ~ x0
                loss = mean_flat(weight * (out - x0) ** 2)
            else:                           # out ~ score = -x0 / sigma
                loss = mean_flat(weight * (out * sigma + x0) ** 2)
        return {"loss": loss, "t": t, "pred": out, "zs": zs}

    # ---- from network outputs to velocity and score ----
    def velocity_and_score(self, out, x, t, need_score=True):
        """Velocity dx/dt (this clock) and score grad log p_t(x) from the network output at (x, t); t broadcast."""
        alpha, d_alpha, sigma, d_sigma = self.coefficients(t)
        if self.prediction == "velocity":
            v = out
            if not need_score:
                return v, None
            # Invert v = (a'/a) x + lambda s in the form SiT uses (multiplied through by a/a'): finite at alpha = 0,
            # where the sampler starts (s = -x there).
            rev = alpha / d_alpha
            return v, (rev * v - x) / (sigma ** 2 - rev * d_sigma * sigma)
        score = out if self.prediction == "score" else -out / sigma
        return d_alpha / alpha * (x + sigma ** 2 * score) - sigma * d_sigma * score, score

    def _diffusion(self, t, form, norm):
        """SDE diffusion coefficient w(t) (SiT's compute_diffusion), as a function of SiT time."""
        s = self.to_sit_time(t)
        if form == "constant":
            return norm * torch.ones_like(s)
        if form == "SBDM":
            return norm * self.drift_var(t)
        if form == "sigma":
            return norm * self._path(s)[2]
        if form == "linear":
            return norm * (1 - s)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * s) + 1) ** 2
        if form == "increasing-decreasing":
            return norm * torch.sin(math.pi * s) ** 2
        raise ValueError(f"unknown diffusion form {form!r}; choose constant, SBDM, sigma, linear, decreasing, "
                         f"increasing-decreasing")

    def _model_fn(self, model, y, model_dtype, cfg_scale, cfg_channels, null_class, guidance_low, guidance_high):
        """
        out(x, t, t_guide): network output at state x (float64) and time t, with classifier-free guidance when
        cfg_scale > 1 and guidance_low <= t_guide <= guidance_high (REPA's guidance interval, in this clock).
        Guidance acts on the first cfg_channels channels (3 in SiT/DiT, a leftover kept for their numbers; None =
        all, as REPA); the others take the conditional output, as SiT's forward_with_cfg leaves them.
        """
        def fn(x, t, t_guide):
            n = x.shape[0]
            tt = torch.full((n,), float(t), dtype=torch.float64, device=x.device)
            guide = cfg_scale > 1.0 and guidance_low <= float(t_guide) <= guidance_high
            self.nfe += 1
            if not guide:
                out = model(x.to(model_dtype), tt.to(model_dtype), y)
                return (out[0] if isinstance(out, tuple) else out).to(torch.float64)
            y_null = torch.full_like(y, null_class)
            out = model(torch.cat([x, x]).to(model_dtype), torch.cat([tt, tt]).to(model_dtype), torch.cat([y, y_null]))
            cond, uncond = (out[0] if isinstance(out, tuple) else out).to(torch.float64).chunk(2)
            # the 3-channel leftover is SD-VAE's (4 channels); other latents are guided on every channel
            c = cond.shape[1] if cfg_channels is None or cond.shape[1] != 4 else cfg_channels
            guided = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
            return torch.cat([guided, cond[:, c:]], dim=1)
        return fn

    # ---- samplers ----
    @torch.no_grad()
    def sample_ode(self, model, z, y, sampler="dopri5", steps=50, atol=1e-6, rtol=1e-3, cfg_scale=1.0,
                   cfg_channels=None, guidance_low=0.0, guidance_high=1.0, null_class=1000, heun_last_step=None):
        """
        Probability-flow ODE from noise z (N, C, H, W) to data. "euler" / "heun": `steps` equal steps (REPA's
        euler_sampler; by default Heun's corrector is skipped on the last step in the REPA clock as REPA does, and
        kept in the SiT clock). "dopri5": adaptive Dormand-Prince 5(4) with SiT's tolerances (torchdiffeq's
        default solver in SiT). State in float64 as REPA; the model sees z's dtype.
        """
        self.nfe = 0
        fn = self._model_fn(model, y, z.dtype, cfg_scale, cfg_channels, null_class, guidance_low, guidance_high)
        t0, t1 = self.interval(sde=False)
        x = z.to(torch.float64)

        def velocity(x, t, t_guide=None):
            tb = torch.full((1,) * x.ndim, float(t), dtype=torch.float64, device=x.device)
            return self.velocity_and_score(fn(x, t, t if t_guide is None else t_guide), x, tb, need_score=False)[0]

        if sampler == "dopri5":
            x = dopri5(velocity, x, t0, t1, atol=atol, rtol=rtol)
        elif sampler in ("euler", "heun"):
            if heun_last_step is None:
                heun_last_step = self.clock == "sit"
            ts = torch.linspace(t0, t1, steps + 1, dtype=torch.float64).tolist()
            for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
                d_cur = velocity(x, t_cur)
                x_next = x + (t_next - t_cur) * d_cur
                if sampler == "heun" and (i < steps - 1 or heun_last_step):
                    # Heun's corrector: the trapezoid rule with the slope at the Euler guess; guidance is decided
                    # by t_cur for both evaluations (REPA).
                    d_next = velocity(x_next, t_next, t_guide=t_cur)
                    x_next = x + (t_next - t_cur) * 0.5 * (d_cur + d_next)
                x = x_next
        else:
            raise ValueError(f"unknown ODE sampler {sampler!r}; choose euler, heun or dopri5")
        return x.to(z.dtype)

    @torch.no_grad()
    def sample_sde(self, model, z, y, steps=250, diffusion_form="sigma", diffusion_norm=1.0, last_step="Mean",
                   last_step_size=0.04, cfg_scale=1.0, cfg_channels=None, guidance_low=0.0, guidance_high=1.0,
                   null_class=1000, generator=None):
        """
        Euler-Maruyama on the reverse SDE dx = [v + c w(t) score] dt + sqrt(2 w(t)) dW that has the ODE's
        marginals (SiT Sec. 2.3; c = +1 in the SiT clock, -1 in REPA's, where the same equation is run backwards).
        `steps` grid points from pure noise to last_step_size short of the data (SiT's linspace(0, 0.96, 250),
        REPA's linspace(1, 0.04, 250)), steps - 1 noisy steps, then one noise-free last step:
        "Mean" (x + drift * dt: SiT's default and REPA's), "Euler" (x + v dt), "Tweedie" (E[x1 | x]) or None.
        With w = sigma_t (SiT's CLI default, "sigma") this is exactly REPA's euler_maruyama_sampler.
        """
        self.nfe = 0
        if last_step is None:
            last_step_size = 0.0
        fn = self._model_fn(model, y, z.dtype, cfg_scale, cfg_channels, null_class, guidance_low, guidance_high)
        t0, t1 = self.interval(sde=True, diffusion_form=diffusion_form, last_step_size=last_step_size)
        ts = torch.linspace(t0, t1, steps, dtype=torch.float64).tolist()
        x = z.to(torch.float64)
        if not math.isfinite(float(self._diffusion(torch.tensor(t0, dtype=torch.float64), diffusion_form, 1.0))):
            # SiT starts its SDE at sample_eps, which is 0 for velocity models: SBDM's lambda_t = 1/t there.
            raise ValueError(f"diffusion form {diffusion_form!r} is infinite at the start t={t0}: set sample_eps > 0")

        def drift_and_parts(x, t):
            tb = torch.full((1,) * x.ndim, t, dtype=torch.float64, device=x.device)
            v, score = self.velocity_and_score(fn(x, t, t), x, tb)
            w = self._diffusion(tb, diffusion_form, diffusion_norm)
            return v + self.ds_dt * w * score, v, score, w, tb

        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            dt = t_next - t_cur
            drift, _, _, w, _ = drift_and_parts(x, t_cur)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float64)
            x = x + drift * dt + torch.sqrt(2 * w) * math.sqrt(abs(dt)) * noise
        if last_step is None:
            return x.to(z.dtype)
        drift, v, score, _, tb = drift_and_parts(x, ts[-1])
        dt = self.ds_dt * last_step_size  # toward the data
        if last_step == "Mean":
            x = x + drift * dt
        elif last_step == "Euler":
            x = x + v * dt
        elif last_step == "Tweedie":
            alpha, _, sigma, _ = self.coefficients(tb)
            x = (x + sigma ** 2 * score) / alpha
        else:
            raise ValueError(f"unknown last step {last_step!r}; choose Mean, Euler, Tweedie or None")
        return x.to(z.dtype)


def dopri5(f, x, t0, t1, atol=1e-6, rtol=1e-3, safety=0.9, ifactor=10.0, dfactor=0.2, max_steps=100_000):
    """
    Integrate dx/dt = f(x, t) from t0 to t1 (either direction) with the Dormand-Prince 5(4) pair; returns x(t1).
    Step control as torchdiffeq's dopri5 (which SiT calls): error measured by the RMS over the whole tensor (the
    whole batch shares the steps) of err / (atol + rtol max(|x|, |x_new|)), step *= clamp(safety err^-1/5, dfactor,
    ifactor) (never shrunk after an accepted step), first step by Hairer, Norsett & Wanner's rule; the last stage is
    reused (FSAL). One difference: the last step is shortened to land on t1, where torchdiffeq steps past t1 (the
    network then sees t > 1) and interpolates back.
    """
    # Butcher tableau (Dormand & Prince 1980): stage nodes c, coefficients a, 5th-order weights b5, error weights.
    c = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
    a = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
         [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
         [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
         [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]]
    b5 = a[6] + [0.0]
    b4 = [5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]
    e = [p - q for p, q in zip(b5, b4)]

    def rms(v):
        return float(v.pow(2).mean().sqrt())

    direction = 1.0 if t1 >= t0 else -1.0
    t, k1 = t0, f(x, t0)
    # Initial step (Hairer et al., Solving ODEs I, Sec. II.4): from the sizes of x, f and a finite-difference f'.
    scale = atol + rtol * x.abs()
    d0, d1 = rms(x / scale), rms(k1 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    d2 = rms((f(x + direction * h0 * k1, t0 + direction * h0) - k1) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    h = min(100 * h0, h1)
    for _ in range(max_steps):
        if direction * (t1 - t) <= 1e-12:
            return x
        h = min(h, abs(t1 - t))
        dt = direction * h
        k = [k1]
        for i in range(1, 7):
            xi = x + dt * sum(aij * kj for aij, kj in zip(a[i], k) if aij != 0.0)
            k.append(f(xi, t + c[i] * dt))
        x_new = x + dt * sum(bi * ki for bi, ki in zip(b5, k) if bi != 0.0)  # = the 7th stage's input (FSAL)
        err = dt * sum(ei * ki for ei, ki in zip(e, k) if ei != 0.0)
        ratio = rms(err / (atol + rtol * torch.maximum(x.abs(), x_new.abs())))
        if ratio <= 1.0:  # accept
            t = t1 if h == abs(t1 - t) else t + dt
            x, k1 = x_new, k[6]
        factor = ifactor if ratio == 0 else min(ifactor, max(safety * ratio ** -0.2, 1.0 if ratio <= 1 else dfactor))
        h = h * factor
    raise RuntimeError(f"dopri5 did not reach t={t1} in {max_steps} steps (stopped at t={t})")


# Sampling settings of each family's published evaluation (SiT's sample.py / sample_ddp.py, REPA's generate.py). SiT: adaptive ODE (or SDE with 250
# steps), CFG on 3 channels everywhere. REPA: SDE with 250 steps, CFG 1.8 on all channels inside t in [0, 0.7].
SAMPLER_DEFAULTS = {
    "sit": dict(clock="sit", mode="ode", sampler="dopri5", ode_steps=250, sde_steps=250, cfg_scale=1.5,
                cfg_channels=3, guidance_low=0.0, guidance_high=1.0),
    "repa": dict(clock="repa", mode="sde", sampler="euler", ode_steps=50, sde_steps=250, cfg_scale=1.8,
                 cfg_channels=None, guidance_low=0.0, guidance_high=0.7),
}


def sample_transport(model, z, y, *, family="sit", mode=None, sampler=None, steps=None, cfg_scale=None,
                     cfg_channels="default", guidance_low=None, guidance_high=None, path_type="Linear",
                     prediction="velocity", atol=1e-6, rtol=1e-3, diffusion_form="sigma", diffusion_norm=1.0,
                     last_step="Mean", last_step_size=0.04, null_class=None, generator=None):
    """
    Draw samples from a SiT ("sit") or SiT+REPA ("repa") model: z (N, C, H, W) noise, y (N,) labels -> latents.
    Unset arguments take the family's published settings (SAMPLER_DEFAULTS). mode "ode" (sampler euler, heun,
    dopri5) or "sde" (Euler-Maruyama + last step). null_class defaults to the model's num_classes (1000).
    """
    if family not in SAMPLER_DEFAULTS:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(SAMPLER_DEFAULTS)}")
    d = SAMPLER_DEFAULTS[family]
    mode = mode or d["mode"]
    cfg_scale = d["cfg_scale"] if cfg_scale is None else cfg_scale
    cfg_channels = d["cfg_channels"] if cfg_channels == "default" else cfg_channels
    guidance = dict(cfg_scale=cfg_scale, cfg_channels=cfg_channels,
                    guidance_low=d["guidance_low"] if guidance_low is None else guidance_low,
                    guidance_high=d["guidance_high"] if guidance_high is None else guidance_high,
                    null_class=getattr(model, "num_classes", 1000) if null_class is None else null_class)
    transport = Transport(path_type=path_type, prediction=prediction, clock=d["clock"])
    if mode == "ode":
        return transport.sample_ode(model, z, y, sampler=sampler or d["sampler"], steps=steps or d["ode_steps"],
                                    atol=atol, rtol=rtol, **guidance)
    if mode == "sde":
        return transport.sample_sde(model, z, y, steps=steps or d["sde_steps"], diffusion_form=diffusion_form,
                                    diffusion_norm=diffusion_norm, last_step=last_step,
                                    last_step_size=last_step_size, generator=generator, **guidance)
    raise ValueError(f"unknown mode {mode!r}; choose ode or sde")


#################################################################################
#                      DINOv2 (REPA's target representation)                    #
#################################################################################
# DINOv2 ViT/14 without registers (Oquab et al. 2023), as facebookresearch/dinov2's hub models build it: patch 14,
# 518 px position grid (37 x 37 + class token), LayerScale (init 1.0), LayerNorm eps 1e-6, exact GELU MLP (ViT-g:
# SwiGLU FFN). Names and shapes are those of dinov2_vit*14_pretrain.pth, so the released files load unchanged.
# REPA aligns SiT's hidden states with forward_features(x)["x_norm_patchtokens"] of ViT-B/14 (REPA Sec. 3.3).

class DINOv2Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (dinov2 layers/attention.py names)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hs)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class DINOv2Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class DINOv2SwiGLU(nn.Module):
    """ViT-g's FFN: w12 -> (silu(x1) * x2) -> w3, hidden width 2/3 of 4D rounded up to a multiple of 8 (4096)."""

    def __init__(self, dim, hidden):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class DINOv2LayerScale(nn.Module):
    """Per-channel residual scale gamma (CaiT's LayerScale)."""

    def __init__(self, dim, init_values=1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x):
        return x * self.gamma


class DINOv2Block(nn.Module):
    """Pre-norm ViT block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim, num_heads, ffn="mlp"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DINOv2Attention(dim, num_heads)
        self.ls1 = DINOv2LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = DINOv2Mlp(dim, 4 * dim) if ffn == "mlp" else DINOv2SwiGLU(dim, 4 * dim)
        self.ls2 = DINOv2LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2PatchEmbed(nn.Module):
    """14 x 14 patches -> tokens: (B, 3, H, W) -> (B, H/14 * W/14, D)."""

    def __init__(self, patch_size, dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"DINOv2 input {H}x{W} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class DINOv2(nn.Module):
    """
    DINOv2 ViT/14 backbone. pos_embed_resample says how the 37 x 37 position grid meets other input sizes:
    "dinov2": as the official forward (bicubic with scale factor (n + 0.1) / 37, no antialias) - the default, equal
    to the official forward_features; "repa": as REPA, which resamples the grid once at load with timm's
    resample_abs_pos_embed (bicubic to exactly n x n, antialias on) and then runs the official forward.
    """

    def __init__(self, embed_dim=768, depth=12, num_heads=12, ffn="mlp", patch_size=14, img_size=518,
                 pos_embed_resample="dinov2"):
        super().__init__()
        if pos_embed_resample not in ("dinov2", "repa"):
            raise ValueError(f"pos_embed_resample={pos_embed_resample!r}; choose dinov2 or repa")
        self.embed_dim, self.patch_size, self.pos_embed_resample = embed_dim, patch_size, pos_embed_resample
        self.patch_embed = DINOv2PatchEmbed(patch_size, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # masked-image-modelling token (unused by REPA)
        self.blocks = nn.ModuleList([DINOv2Block(embed_dim, num_heads, ffn) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.initialize_weights()

    def initialize_weights(self):
        # dinov2's init (only used for random-weight tests and the tiny stand-in): truncated normal 0.02.
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h, w):
        """Position embedding (1, 1 + h * w, D) for an h x w patch grid, resampled (in fp32) from the stored grid."""
        n = self.pos_embed.shape[1] - 1
        m = int(math.sqrt(n))
        if h == w == m:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:].float()
        patch_pos = patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, D, m, m)
        if self.pos_embed_resample == "dinov2":
            # The official "historical kludge" (dino issue #8): a scale factor of (n + 0.1) / m rather than the
            # output size; F.interpolate then maps coordinates with that factor, which is not exactly size n.
            patch_pos = F.interpolate(patch_pos, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic",
                                      antialias=False)
        else:
            patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", antialias=True)
        assert patch_pos.shape[-2:] == (h, w)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos.float(), patch_pos], dim=1)

    def forward_features(self, x, masks=None):
        """
        x: (B, 3, H, W) ImageNet-normalised images, H and W multiples of 14; masks: optional (B, T) bool.
        Returns the official dict: x_norm_clstoken (B, D), x_norm_regtokens (B, 0, D), x_norm_patchtokens (B, T, D),
        x_prenorm (B, 1 + T, D), masks.
        """
        B, _, H, W = x.shape
        tokens = self.patch_embed(x)  # (B, T, D), T = H/14 * W/14
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
        pos = self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size)
        if self.pos_embed_resample == "dinov2" and pos is not self.pos_embed:
            pos = pos.to(tokens.dtype)  # the official code casts a resampled grid to the tokens' dtype (autocast)
        tokens = tokens + pos
        for block in self.blocks:
            tokens = block(tokens)
        x_norm = self.norm(tokens)
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_regtokens": x_norm[:, 1:1],
                "x_norm_patchtokens": x_norm[:, 1:], "x_prenorm": tokens, "masks": masks}

    def forward(self, x):
        """The hub model's forward: the normalised class token (B, D) (its head is the identity)."""
        return self.forward_features(x)["x_norm_clstoken"]


DINOv2_models = {
    "dinov2_vits14": partial(DINOv2, embed_dim=384, depth=12, num_heads=6),
    "dinov2_vitb14": partial(DINOv2, embed_dim=768, depth=12, num_heads=12),  # REPA's encoder
    "dinov2_vitl14": partial(DINOv2, embed_dim=1024, depth=24, num_heads=16),
    "dinov2_vitg14": partial(DINOv2, embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
    # Not a released model: a random-weight stand-in with ViT-B's interface but tiny, for --preset tiny and tests
    # (no DINOv2 weights exist offline). Its features carry no meaning; it only exercises the REPA code path.
    "dinov2_tiny": partial(DINOv2, embed_dim=64, depth=2, num_heads=2),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dinov2_preprocess(x, resolution=None):
    """
    REPA's encoder input from images x (B, 3, H, W) in [-1, 1]: [0, 1] -> ImageNet mean/std -> bicubic resize to
    (H / 16) * 14 (224 for 256 px), so the DINOv2 patch grid matches SiT/2's token grid on the f8 latent.
    resolution: a side, or (height, width).
    """
    resolution = resolution or (x.shape[-1] // 16) * 14
    size = tuple(resolution) if isinstance(resolution, (tuple, list)) else (resolution, resolution)
    x = (x + 1) / 2
    mean = device_constant(IMAGENET_MEAN, x.device, x.dtype).view(1, 3, 1, 1)
    std = device_constant(IMAGENET_STD, x.device, x.dtype).view(1, 3, 1, 1)
    x = (x - mean) / std
    return F.interpolate(x, size=size, mode="bicubic")  # as REPA: normalise, then resize


#################################################################################
#                  MaskGIT: Masked Bidirectional Transformer                    #
#################################################################################
# MaskGIT (Chang et al. 2022) in the layout of its PyTorch reproduction, valeoai/Maskgit-pytorch v1,
# the generator the EQ-VAE paper trains on VQ-GAN tokens (gFID 6.80 -> 5.91 with EQ-VAE). Attribute names, module
# order and initialisation follow its Network/transformer.py, so the released checkpoint loads with load_state_dict
# unchanged and computes the same logits. One table embeds everything the transformer reads:
#   rows [0, K)           the K codebook entries of the VQ-GAN,
#   row  K                the [MASK] token,
#   rows [K+1, K+1+C)     the C class labels (class y is row y + K + 1),
#   row  K+1+C            the null class used for classifier-free guidance.
# The same table, transposed, is the output head (weights tied, plus a learned per-position bias).

class MaskGITPreNorm(nn.Module):
    """LayerNorm (PyTorch default eps 1e-5) then a sub-layer: the pre-LN residual branch."""

    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class MaskGITAttention(nn.Module):
    """Full (bidirectional) multi-head self-attention, dropout on the attention weights."""

    def __init__(self, dim, num_heads, dropout=0.0):
        super().__init__()
        # nn.MultiheadAttention gives the reference's parameter names (mha.in_proj_weight, mha.out_proj.weight).
        self.mha = nn.MultiheadAttention(dim, num_heads=num_heads, dropout=dropout, batch_first=True, bias=True)

    def forward(self, x):
        # The reference asks for the attention maps (for its visualisations) and throws them away in training;
        # need_weights=False gives the same values through the fused scaled_dot_product_attention kernel.
        return self.mha(x, x, x, need_weights=False)[0]


class MaskGITFeedForward(nn.Module):
    """Linear -> GELU (exact) -> Dropout -> Linear -> Dropout."""

    def __init__(self, dim, hidden_dim, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim, bias=True),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim, bias=True),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return self.net(x)


class MaskGITEncoder(nn.Module):
    """depth x [x + Attn(LN(x)); x + FFN(LN(x))], with the reference's nesting (layers.{i}.{0: attn, 1: ffn})."""

    def __init__(self, dim, depth, num_heads, mlp_dim, dropout=0.0):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([
                MaskGITPreNorm(dim, MaskGITAttention(dim, num_heads, dropout=dropout)),
                MaskGITPreNorm(dim, MaskGITFeedForward(dim, mlp_dim, dropout=dropout)),
            ])
            for _ in range(depth)
        ])

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class MaskTransformer(nn.Module):
    """
    MaskGIT's bidirectional transformer over a (input_size x input_size) grid of VQ-GAN token indices plus one
    class token. The defaults are the released 256 px model (16 x 16 tokens, 1024 codes, ImageNet's 1000 classes,
    width 768, depth 24, 16 heads, MLP 3072, dropout 0.1; ~174M parameters).
    """

    def __init__(self, input_size=16, codebook_size=1024, num_classes=1000, hidden_size=768, depth=24, num_heads=16,
                 mlp_dim=3072, dropout=0.1):
        super().__init__()
        self.input_size = input_size
        self.codebook_size = codebook_size
        self.num_classes = num_classes
        self.mask_token_id = codebook_size                  # [MASK], also the value training writes into masks
        self.null_class_id = codebook_size + 1 + num_classes  # the "no label" token for classifier-free guidance
        self.config = dict(input_size=input_size, codebook_size=codebook_size, num_classes=num_classes,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim, dropout=dropout)
        num_tokens = input_size * input_size
        vocab = codebook_size + 1 + num_classes + 1

        # nn.Embedding keeps its default N(0, 1) init and the position embedding is trunc-normal(0.02), as in the
        # reference (it has no other custom init: Linear/LayerNorm/MHA keep PyTorch's defaults).
        self.tok_emb = nn.Embedding(vocab, hidden_size)
        self.pos_emb = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, num_tokens + 1, hidden_size), 0.0, 0.02))

        # Layers before and after the encoder. LayerNorm eps 1e-12 here (BERT's value) vs 1e-5 inside the blocks.
        self.first_layer = nn.Sequential(
            nn.LayerNorm(hidden_size, eps=1e-12),
            nn.Dropout(p=dropout),
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
            nn.LayerNorm(hidden_size, eps=1e-12),
            nn.Dropout(p=dropout),
            nn.Linear(hidden_size, hidden_size),
        )
        self.transformer = MaskGITEncoder(hidden_size, depth, num_heads, mlp_dim, dropout=dropout)
        self.last_layer = nn.Sequential(
            nn.LayerNorm(hidden_size, eps=1e-12),
            nn.Dropout(p=dropout),
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
            nn.LayerNorm(hidden_size, eps=1e-12),
        )
        # Output bias per (position, vocabulary entry); the weight is tok_emb itself.
        self.bias = nn.Parameter(torch.zeros(num_tokens + 1, vocab))

    def forward(self, tokens, y, drop_label=None):
        """
        tokens: (B, h, w) long token indices in [0, K], K = [MASK], with h * w = input_size ** 2
        y: (B,) long class labels in [0, num_classes)
        drop_label: (B,) bool, True -> replace the label by the null class (classifier-free guidance); None = keep all
        returns: (B, h * w, K + 1) logits over the codebook and the mask token, as the reference returns them
        """
        b = tokens.shape[0]
        n = self.input_size * self.input_size
        if tokens[0].numel() != n:
            raise ValueError(f"MaskTransformer expects {self.input_size}x{self.input_size} tokens per image, got "
                             f"shape {tuple(tokens.shape)}; build it with input_size matching the VQ-GAN's token grid")
        cls_token = y.view(b, 1) + self.codebook_size + 1  # shift labels past the codebook and [MASK]
        if drop_label is not None:
            cls_token = torch.where(drop_label.view(b, 1), torch.full_like(cls_token, self.null_class_id), cls_token)
        x = torch.cat([tokens.reshape(b, n), cls_token], dim=1)  # (B, N + 1): the class token comes last
        x = self.tok_emb(x) + self.pos_emb                          # (B, N + 1, D)

        x = self.first_layer(x)
        x = self.transformer(x)
        x = self.last_layer(x)

        # Tied head: logits = x @ tok_emb^T + bias, kept for the N image positions and the K + 1 token entries only.
        # Slicing before the matmul computes exactly those entries of the reference's full (N + 1) x vocab product.
        k = self.codebook_size + 1
        return x[:, :n] @ self.tok_emb.weight[:k].t() + self.bias[:n, :k]  # (B, N, K + 1)


#################################################################################
#                      MaskGIT Masking and Decoding Schedules                   #
#################################################################################

def maskgit_mask_rate(r, mode="arccos"):
    """
    Training mask rate gamma(r) for r ~ U(0, 1) (Maskgit-pytorch's get_mask_code): arccos(r) / (pi / 2) (default),
    cos(pi r / 2) (the original MaskGIT's choice), r ("linear") or r ** 2 ("square"). Mean rates 2/pi, 2/pi, 1/2, 1/3.
    The decreasing ones (arccos, cosine) also give the JAX decoder's fraction still masked after progress r.
    """
    r = torch.as_tensor(r, dtype=torch.float32)
    if mode == "arccos":
        return torch.arccos(r) / (math.pi * 0.5)
    if mode == "cosine":
        return torch.cos(r * math.pi * 0.5)
    if mode == "linear":
        return r
    if mode == "square":
        return r ** 2
    raise ValueError(f"unknown mask schedule {mode!r}; choose from arccos, cosine, linear, square")


def maskgit_random_mask(tokens, mask_token_id, mode="arccos", generator=None):
    """
    MaskGIT's training corruption: per image draw r ~ U(0, 1), then mask each token independently with probability
    gamma(r). tokens: (B, h, w) long -> (masked tokens (B, h, w), mask (B, h, w) bool, True = masked).
    """
    b = tokens.shape[0]
    r = torch.rand(b, generator=generator, device=tokens.device)
    rate = maskgit_mask_rate(r, mode).to(tokens.device).view(b, *([1] * (tokens.dim() - 1)))
    mask = torch.rand(tokens.shape, generator=generator, device=tokens.device) < rate
    return tokens.masked_fill(mask, mask_token_id), mask


def maskgit_reveal_schedule(steps, num_tokens, mode="arccos"):
    """
    How many tokens Maskgit-pytorch's sampler reveals at each of `steps` steps (its adap_sche): weights w(r) on
    r = linspace(1, 0, steps), normalised to num_tokens, rounded (half to even), zeros raised to 1, remainder added to
    the last step. Returns a (steps,) long tensor summing to num_tokens with every entry >= 1.
    """
    if not 1 <= steps <= num_tokens:
        raise ValueError(f"steps must be in [1, {num_tokens}] to reveal at least one of {num_tokens} tokens per step, "
                         f"got {steps}")
    if steps == 1:  # the reference divides by zero here (arccos(1) = 0); one step simply reveals everything
        return torch.tensor([num_tokens])
    r = torch.linspace(1, 0, steps)
    if mode == "arccos":
        w = torch.arccos(r) / (math.pi * 0.5)
    elif mode == "cosine":
        w = torch.cos(r * math.pi * 0.5)
    elif mode == "linear":
        w = 1 - r
    elif mode == "square":
        w = 1 - r ** 2
    else:
        raise ValueError(f"unknown reveal schedule {mode!r}; choose from arccos, cosine, linear, square")
    sche = [max(1, int(v)) for v in ((w / w.sum()) * num_tokens).round()]  # at least one token per step
    sche[-1] += num_tokens - sum(sche)
    # With many steps (e.g. arccos, 256 tokens, >= 98 steps) the raised ones overshoot and the reference's last step
    # goes to zero or below; take the excess from the largest steps instead. Never triggers at the paper's settings,
    # where the result is the reference's exactly (8 steps, arccos, 256 tokens: 1 18 26 32 38 43 48 50).
    while sche[-1] < 1:
        sche[-1] += 1
        sche[max(range(steps - 1), key=lambda i: (sche[i], i))] -= 1
    return torch.tensor(sche)


#################################################################################
#                             MaskGIT Sampling                                  #
#################################################################################

def _maskgit_gumbel(shape, generator, device):
    """Standard Gumbel noise -log(-log U), drawn on the generator's device and moved to `device`."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=gen_device).clamp_(1e-20, 1.0)
    return (-torch.log(-torch.log(u))).clamp_max_(1e30).to(device)  # u = 1 would give +inf: clamp keeps it finite


def _maskgit_categorical(prob, generator):
    """Sample one index per row of prob (..., V) -> (...) long."""
    flat = prob.reshape(-1, prob.shape[-1])
    if generator is not None and generator.device != flat.device:  # draw where the generator lives
        flat = flat.to(generator.device)
    return torch.multinomial(flat, 1, generator=generator).to(prob.device).view(prob.shape[:-1])


def _maskgit_guided_logits(model, code, y, w):
    """
    Classifier-free guidance as Maskgit-pytorch: (1 + w) * conditional - w * unconditional, both halves in one
    batch (the unconditional half sees the null class). code: (B, h, w), y: (B,) -> (B, N, K + 1) float32.
    """
    b = code.shape[0]
    if w is None:  # no guidance: one conditional pass
        return model(code, y, torch.zeros(b, dtype=torch.bool, device=code.device)).float()
    drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(code.device)
    logits = model(torch.cat([code, code]), torch.cat([y, y]), drop).float()
    cond, uncond = logits.chunk(2)
    return (1 + w) * cond - w * uncond


def maskgit_cfg_weight(step, steps, cfg_w):
    """Maskgit-pytorch's guidance ramp: w_t = w * t / (T - 1), from 0 at the first step to w at the last."""
    return cfg_w * (step / max(steps - 1, 1))


@torch.no_grad()
def maskgit_sample(model, y, *, variant="pytorch", steps=None, schedule=None, sm_temp=1.0, r_temp=4.5, cfg_w=None,
                   generator=None, return_history=False):
    """
    Generate token grids by confidence-based iterative decoding (MaskGIT Sec. 3.2), starting from all [MASK].

    model: a MaskTransformer (eval mode is set for the call); y: (B,) long class labels on the model's device.
    variant "pytorch" (Maskgit-pytorch, FID 6.80 at 256 px; defaults: 8 steps, arccos, cfg_w 3): at step t sample a
      token everywhere from softmax(logits * sm_temp) (sm_temp multiplies the logits, as the reference's "softmax
      temperature" does), score it by log p + r_temp * Gumbel * (1 - t / (T - 1)), and reveal the k_t most
      confident still-masked positions, k_t from maskgit_reveal_schedule. Guidance weight ramps w t / (T - 1).
    variant "jax" (the original google-research/maskgit, FID 6.18; defaults: 12 steps, cosine, no guidance): logits
      over the codebook only; after step t keep floor(N * gamma((t + 1) / T)) tokens masked (at least 1, at most all
      but one still unknown), scored by log p + r_temp * (1 - (t + 1) / T) * Gumbel; the last step fills the rest.
      Guidance (none in the original), if asked for, ramps as in the pytorch variant.
    Revealed tokens never change. The network runs in the caller's precision (wrap the call in autocast for bf16);
    probabilities are float32. generator: optional torch.Generator (any device) for every random draw.
    return_history: also return the list of (B, h, w) bool masks (True = still masked) after each step.
    Returns tokens (B, h, w) long in [0, K).
    """
    if variant not in ("pytorch", "jax"):
        raise ValueError(f"unknown MaskGIT sampler variant {variant!r}; choose 'pytorch' or 'jax'")
    original = variant == "jax"  # the original MaskGIT's decoder
    steps = steps if steps is not None else (12 if original else 8)
    schedule = schedule if schedule is not None else ("cosine" if original else "arccos")
    cfg_w = cfg_w if cfg_w is not None else (0.0 if original else 3.0)
    if original and schedule not in ("cosine", "arccos"):
        raise ValueError(f"the jax variant needs a decreasing schedule: 'cosine' or 'arccos', got {schedule!r}")

    was_training = model.training
    model.eval()
    b, g, k = y.shape[0], model.input_size, model.codebook_size
    n = g * g
    device = y.device
    code = torch.full((b, n), model.mask_token_id, dtype=torch.long, device=device)  # (B, N), all [MASK]
    masked = torch.ones(b, n, dtype=torch.bool, device=device)                     # True = not yet revealed
    history = []
    reveal = None if original else maskgit_reveal_schedule(steps, n, schedule)  # (T,) tokens revealed per step

    for t in range(steps):
        w = maskgit_cfg_weight(t, steps, cfg_w) if cfg_w != 0 else None
        logits = _maskgit_guided_logits(model, code.view(b, g, g), y, w)  # (B, N, K + 1)
        if original:
            logits = logits[..., :k]  # the original samples codebook entries only, never [MASK]
        prob = torch.softmax(logits * sm_temp, dim=-1)
        pred = _maskgit_categorical(prob, generator)                          # (B, N)
        log_p = torch.log(prob.gather(-1, pred.unsqueeze(-1)).squeeze(-1))  # (B, N)

        if not original:
            # Anneal the Gumbel noise from r_temp at the first step to 0 at the last: early picks explore.
            conf = log_p + r_temp * _maskgit_gumbel((b, n), generator, device) * (1 - t / max(steps - 1, 1))
            conf = conf.masked_fill(~masked, -math.inf)  # never re-pick a revealed position
            idx = conf.topk(int(reveal[t]), dim=-1).indices  # (B, k_t)
            code.scatter_(1, idx, pred.gather(1, idx))
            masked.scatter_(1, idx, False)
            # The reference also samples [MASK] (index K) itself; it is clamped to the codebook at the very end.
        else:
            pred = torch.where(masked, pred, code)
            if t == steps - 1:  # the original returns the last step's samples: every token filled
                code, masked = pred, torch.zeros_like(masked)
            else:
                ratio = (t + 1) / steps
                # In float32 as the reference computes it: gamma(float32(ratio...)) times the token count, floored.
                r32 = np.float32(math.pi / 2 * ratio) if schedule == "cosine" else np.float32(ratio)
                gamma = np.cos(r32) if schedule == "cosine" else np.arccos(r32) / np.float32(math.pi / 2)
                mask_len = int(np.floor(np.float32(n) * np.clip(gamma, np.float32(1e-6), np.float32(1.0))))
                mask_len = (masked.sum(-1, keepdim=True) - 1).clamp(max=mask_len).clamp(min=1)  # (B, 1)
                conf = log_p + r_temp * (1 - ratio) * _maskgit_gumbel((b, n), generator, device)
                conf = conf.masked_fill(~masked, math.inf)  # known tokens are infinitely confident: never re-masked
                cut_off = conf.sort(dim=-1).values.gather(-1, mask_len)  # (B, 1)
                masked = conf < cut_off  # keep the mask_len least confident positions masked
                code = torch.where(masked, torch.full_like(pred, model.mask_token_id), pred)
        if return_history:
            history.append(masked.view(b, g, g).clone())

    model.train(was_training)
    tokens = code.clamp(max=k - 1).view(b, g, g)
    return (tokens, history) if return_history else tokens


#################################################################################
#                                MaskGIT Configs                                #
#################################################################################

MaskGIT_models = {
    # The released 256 px model: 16 x 16 tokens of the f16 VQ-GAN, 1024 codes, 1000 classes (~174M parameters);
    # the 512 px one is the same network over 32 x 32 tokens. (The defaults of MaskTransformer.)
    "maskgit-256": partial(MaskTransformer),
    "maskgit-512": partial(MaskTransformer, input_size=32),
    # CPU-sized model for --preset tiny; train_maskgit.py passes the tiny VQ-GAN's grid and codebook and the classes.
    "maskgit-tiny": partial(MaskTransformer, input_size=8, codebook_size=64, num_classes=10, hidden_size=128, depth=3,
                            num_heads=4, mlp_dim=512),
}
