"""
Every network of the EQ-VAE pipeline and the math that belongs to it, in one file:
the KL autoencoder (SD-VAE), LPIPS, the PatchGAN discriminator, checkpoint loaders and exporters,
VQ-GAN, the DiT/SiT backbone with REPA's projector, DINOv2, Gaussian diffusion, interpolant transport
and MaskGIT. Sections are separated by banners; read top to bottom.
"""
import json
import math
import os
import pickle
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data  # to_uint8: the one uint8 convention (DESIGN)


#################################################################################
#                  KL Autoencoder (SD-VAE): Building Blocks                     #
#################################################################################
# Parameter names follow LDM / taming (ldm/modules/diffusionmodules/model.py), so the LDM and EQ-VAE LDM
# checkpoints and the taming VQ-GAN load into these modules unchanged; diffusers names are mapped in the loader.

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

class KLVAE(nn.Module):
    """LDM's AutoencoderKL (the SD-VAE): Encoder -> quant_conv -> posterior; z -> post_quant_conv -> Decoder."""
    def __init__(self, config):
        super().__init__()
        config = _kl_config(config)
        self.config = config
        ddconfig = {k: config[k] for k in ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                                           "in_channels", "resolution", "z_channels", "dropout", "norm_num_groups")}
        self.encoder = Encoder(**ddconfig, double_z=True)
        self.decoder = Decoder(**ddconfig)
        z, e = config["z_channels"], config["embed_dim"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * e, kernel_size=1)  # moments (mean, logvar): 8 -> 8 for SD-VAE
        self.post_quant_conv = nn.Conv2d(e, z, kernel_size=1)  # 4 -> 4 for SD-VAE
        # Latents are multiplied by this before the generative model and divided by it before decoding (DESIGN).
        self.scaling_factor = config["scaling_factor"]

    def encode(self, x):
        """x: (N, 3, H, W) in [-1, 1] -> posterior over (N, embed_dim, H / f, W / f)."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """z: (N, embed_dim, h, w) unscaled latent -> (N, 3, h * f, w * f) image, roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=True):
        """x: (N, 3, H, W) -> (x_hat, posterior); z is sampled (training) or the posterior mode."""
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_last_layer(self):
        """The weight at which LDM's adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight


# SD-VAE = LDM kl-f8 ("autoencoder_kl_32x32x4"): 83,653,863 parameters, 4 x 32 x 32 latents at 256 px.
_SD_VAE = dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], z_channels=4, embed_dim=4,
               in_channels=3, out_ch=3, resolution=256, norm_num_groups=32, dropout=0.0, scaling_factor=0.18215)
vae_configs = {
    "sd-vae": dict(_SD_VAE),
    "sdxl-vae": dict(_SD_VAE, scaling_factor=0.13025),  # same architecture, retrained; SDXL's latent scale
    # CPU-sized f8 autoencoder for tests and the demo (64 px -> 4 x 8 x 8). GroupNorm(32) needs >= 32 channels,
    # so 8 groups here; everything else is SD-VAE's design.
    "tiny": dict(_SD_VAE, ch=16, ch_mult=[1, 2, 2, 4], num_res_blocks=1, resolution=64, norm_num_groups=8),
}


def _kl_config(config):
    """Complete a KLVAE config dict with SD-VAE defaults; unknown keys are an error (typos fail loudly)."""
    unknown = sorted(set(config) - set(_SD_VAE))
    if unknown:
        raise ValueError(f"unknown KL autoencoder config keys {unknown}; valid keys: {sorted(_SD_VAE)}")
    config = {**_SD_VAE, "embed_dim": config.get("z_channels", _SD_VAE["z_channels"]), **config}
    for key in ("ch_mult", "attn_resolutions"):
        config[key] = [int(v) for v in config[key]]  # lists, so the config is JSON- and weights_only-friendly
    channels = [config["ch"]] + [config["ch"] * m for m in config["ch_mult"]]
    if any(c % config["norm_num_groups"] for c in channels):
        raise ValueError(f"norm_num_groups={config['norm_num_groups']} does not divide the channel widths {channels}")
    return config


def build_autoencoder(name_or_config):
    """A freshly initialised KLVAE from a name in vae_configs or a config dict."""
    if isinstance(name_or_config, str):
        if name_or_config not in vae_configs:
            raise KeyError(f"unknown autoencoder {name_or_config!r}; valid names: {sorted(vae_configs)}")
        name_or_config = vae_configs[name_or_config]
    return KLVAE(dict(name_or_config))


#################################################################################
#                     Pretrained Weights: Local Path or Hub Cache               #
#################################################################################

def find_weights(filename, url, path=None):
    """Local path of a weight file: `path` if given, else torch hub's cache, downloading there when online."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weight file {path!r} does not exist (expected {filename}, from {url})")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if os.path.isfile(cached):
        return cached
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, cached, progress=False)
    except Exception as e:  # offline, proxy, HTTP error: say exactly what to fetch and where it goes
        raise FileNotFoundError(
            f"{filename} is not in torch hub's cache and could not be downloaded ({type(e).__name__}: {e}). "
            f"Download {url} and put it at {cached}, or pass its path explicitly.") from None
    return cached


#################################################################################
#            Autoencoder Checkpoints: LDM <-> diffusers, Load and Export        #
#################################################################################
# LDM names are this file's names. diffusers' AutoencoderKL stores the same tensors under other names (REFERENCE 4):
#   encoder.down.{i}.block.{j}          <-> encoder.down_blocks.{i}.resnets.{j}      (nin_shortcut <-> conv_shortcut)
#   encoder.down.{i}.downsample.conv    <-> encoder.down_blocks.{i}.downsamplers.0.conv
#   decoder.up.{i}.block.{j}            <-> decoder.up_blocks.{L-1-i}.resnets.{j}    (diffusers counts coarse -> fine)
#   decoder.up.{i}.upsample.conv        <-> decoder.up_blocks.{L-1-i}.upsamplers.0.conv
#   *.mid.block_{1,2}                   <-> *.mid_block.resnets.{0,1}
#   *.mid.attn_1.{norm,q,k,v,proj_out}  <-> *.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
#                                           (1x1 conv [C, C, 1, 1] <-> Linear [C, C]; older files: query/key/value/proj_attn)
#   *.norm_out                          <-> *.conv_norm_out
_ATTN_LDM_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_DIFFUSERS_TO_LDM = {v: k for k, v in _ATTN_LDM_TO_DIFFUSERS.items()}
_ATTN_OLD_DIFFUSERS = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def ldm_to_diffusers_name(name, num_levels):
    """LDM parameter name -> diffusers AutoencoderKL name (num_levels = len(ch_mult))."""
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|downsample|upsample|attn)\.(.*)", name)
    if m:
        part, updown, i, kind, rest = m.groups()
        i = int(i) if part == "encoder" else num_levels - 1 - int(i)  # decoder levels are reversed
        if kind == "block":
            j, rest = rest.split(".", 1)
            return f"{part}.{updown}_blocks.{i}.resnets.{j}.{rest.replace('nin_shortcut', 'conv_shortcut')}"
        if kind in ("downsample", "upsample"):
            return f"{part}.{updown}_blocks.{i}.{kind}rs.0.{rest}"
        raise ValueError(f"{name}: diffusers' AutoencoderKL has no attention inside {updown} blocks")
    m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)", name)
    if m:
        part, sub, rest = m.groups()
        if sub == "attn_1":
            layer, param = rest.rsplit(".", 1)
            return f"{part}.mid_block.attentions.0.{_ATTN_LDM_TO_DIFFUSERS[layer]}.{param}"
        return f"{part}.mid_block.resnets.{int(sub[-1]) - 1}.{rest}"
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", name)


def diffusers_to_ldm_name(name, num_levels):
    """diffusers AutoencoderKL name (current or older attention names) -> LDM parameter name."""
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets\.\d+|downsamplers\.0|upsamplers\.0)\.(.*)",
                     name)
    if m:
        part, updown, i, sub, rest = m.groups()
        i = int(i) if part == "encoder" else num_levels - 1 - int(i)
        if sub.startswith("resnets"):
            return f"{part}.{updown}.{i}.block.{sub.split('.')[1]}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.{updown}.{i}.{updown}sample.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets\.[01]|attentions\.0)\.(.*)", name)
    if m:
        part, sub, rest = m.groups()
        if sub.startswith("resnets"):
            return f"{part}.mid.block_{int(sub[-1]) + 1}.{rest}"
        layer, param = rest.rsplit(".", 1)
        layer = _ATTN_OLD_DIFFUSERS.get(layer, layer)
        if layer not in _ATTN_DIFFUSERS_TO_LDM:
            return name  # left unmapped: reported as an unexpected key by the loader
        return f"{part}.mid.attn_1.{_ATTN_DIFFUSERS_TO_LDM[layer]}.{param}"
    return re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", name)


def _diffusers_to_ldm_state_dict(sd):
    """Rename a diffusers state dict to LDM names; attention Linear [C, C] weights become 1x1 convs [C, C, 1, 1]."""
    num_levels = 1 + max(int(m.group(2)) for k in sd if (m := re.match(r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.", k)))
    out = {}
    for k, v in sd.items():
        name = diffusers_to_ldm_name(k, num_levels)
        if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", name) and v.ndim == 2:
            v = v[:, :, None, None]
        out[name] = v
    return out


def _ldm_to_diffusers_state_dict(sd, num_levels):
    """Rename an LDM state dict to diffusers names; attention 1x1 conv weights become Linear [C, C]."""
    out = {}
    for k, v in sd.items():
        name = ldm_to_diffusers_name(k, num_levels)
        if re.search(r"\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", name):
            v = v[:, :, 0, 0]
        out[name] = v
    return out


def _config_from_diffusers(cfg):
    """Our KLVAE config from a diffusers AutoencoderKL config.json."""
    unsupported = []
    if cfg.get("act_fn", "silu") != "silu":
        unsupported.append(f"act_fn={cfg['act_fn']!r}")
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if cfg.get(key, True) is False:
            unsupported.append(f"{key}=False")
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != kind for t in cfg.get(key, [kind])):
            unsupported.append(f"{key}={cfg[key]}")
    if cfg.get("shift_factor") not in (None, 0, 0.0):
        unsupported.append(f"shift_factor={cfg['shift_factor']}")
    if unsupported:
        raise NotImplementedError(f"diffusers autoencoder config not supported by KLVAE (SD-VAE layout): "
                                  f"{', '.join(unsupported)}")
    widths = list(cfg["block_out_channels"])
    if any(w % widths[0] for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first width")
    return dict(ch=widths[0], ch_mult=[w // widths[0] for w in widths], num_res_blocks=cfg.get("layers_per_block", 1),
                attn_resolutions=[], z_channels=cfg.get("latent_channels", 4), embed_dim=cfg.get("latent_channels", 4),
                in_channels=cfg.get("in_channels", 3), out_ch=cfg.get("out_channels", 3),
                resolution=cfg.get("sample_size", 256), norm_num_groups=cfg.get("norm_num_groups", 32),
                scaling_factor=cfg.get("scaling_factor", _SD_VAE["scaling_factor"]))


def _infer_kl_config(sd, source):
    """KLVAE config read off the tensor shapes of an LDM-named state dict (files without a config)."""
    def shape(key):
        if key not in sd:
            raise KeyError(f"{source}: cannot infer the autoencoder architecture, tensor {key!r} is missing "
                           f"(first keys: {sorted(sd)[:5]})")
        return tuple(sd[key].shape)
    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    num_res_blocks = len({m.group(1) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    resolution = 256  # not stored in weights; only places attention levels (attn_resolutions) below
    config = dict(
        ch=ch, in_channels=in_channels, num_res_blocks=num_res_blocks, resolution=resolution,
        ch_mult=[shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels],
        attn_resolutions=[resolution // 2 ** i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd],
        z_channels=shape("decoder.conv_in.weight")[1], embed_dim=shape("post_quant_conv.weight")[1],
        out_ch=shape("decoder.conv_out.weight")[0],
    )
    # LDM hard-codes GroupNorm(32); a file without a config cannot tell us anything else.
    widths = [ch] + [ch * m for m in config["ch_mult"]]
    if any(w % 32 for w in widths):
        raise ValueError(f"{source}: channel widths {widths} are not multiples of 32, so the GroupNorm group count "
                         f"cannot be inferred; load a checkpoint that carries its config (save_ldm / save_diffusers)")
    return config


class _PickleStub:
    """Inert stand-in for a class a checkpoint pickled next to its weights (Lightning callbacks, argparse args)."""
    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _torch_load(path):
    """torch.load with weights_only=True, tolerating the Python objects that LDM's Lightning checkpoints pickle:
    instead of unpickling arbitrary code (which would also need Lightning installed) each class the safe
    unpickler refuses is allow-listed as an inert stub, and the load retried."""
    stubs = []
    while True:
        try:
            with torch.serialization.safe_globals(stubs):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            m = re.search(r"GLOBAL ([\w.]+)", str(e))
            if m is None or len(stubs) >= 64 or any(name == m.group(1) for _, name in stubs):
                raise ValueError(f"{path!r}: cannot read this checkpoint safely ({e})") from None
            stubs.append((_PickleStub, m.group(1)))
        except (RuntimeError, EOFError) as e:  # truncated zip, not a torch file at all
            raise ValueError(f"{path!r} is not a readable PyTorch checkpoint ({e})") from None


def _read_checkpoint(path, ema=False):
    """(state_dict, config or None, diffusers config or None) from any supported file or folder."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no autoencoder checkpoint at {path!r}")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "vae", "config.json")):
            path = os.path.join(path, "vae")  # a whole diffusers pipeline folder: use its vae/ subfolder
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path) and find_vqgan_checkpoint(path):
            return _read_checkpoint(find_vqgan_checkpoint(path), ema)  # taming / MaskGIT-pytorch VQ-GAN folder
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{path!r} is a folder without config.json (expected a diffusers AutoencoderKL "
                                    f"folder: config.json + {' or '.join(_DIFFUSERS_WEIGHTS)})")
        weights = [os.path.join(path, w) for w in _DIFFUSERS_WEIGHTS if os.path.isfile(os.path.join(path, w))]
        if not weights:
            raise FileNotFoundError(f"diffusers folder {path!r} has config.json but neither of {_DIFFUSERS_WEIGHTS}")
        with open(config_path) as f:
            diffusers_config = json.load(f)
        return _read_checkpoint(weights[0])[0], None, diffusers_config
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        from safetensors import safe_open
        with safe_open(path, framework="pt", device="cpu") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        return sd, json.loads(meta["config"]) if "config" in meta else None, None  # save_ldm stores its config here
    if ext not in (".ckpt", ".pt", ".pth", ".bin"):
        raise ValueError(f"unknown checkpoint format {ext!r} for {path!r}: expected a diffusers folder or a "
                         f".safetensors, .ckpt, .pt, .pth or .bin file")
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path!r} holds a {type(ckpt).__name__}, not a state dict or checkpoint dict")
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else None
    if isinstance(ckpt.get("state_dict"), dict):  # LDM / taming Lightning checkpoint, or our save_ldm
        return ckpt["state_dict"], config, None
    if isinstance(ckpt.get("model"), dict):  # this project's checkpoints: {"model", "config" or "args", ...}
        if ema and not isinstance(ckpt.get("ema"), dict):
            raise KeyError(f"{path!r} has no 'ema' weights (keys: {sorted(ckpt)})")
        return ckpt["ema" if ema else "model"], config, None
    return ckpt, None, None  # a plain state dict


def _strip_prefixes(sd):
    """Drop wrappers' prefixes (DDP, torch.compile, SD's first_stage_model., vae.) and the LDM loss.* tensors."""
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    for prefix in ("first_stage_model.", "vae."):
        # A whole Stable Diffusion checkpoint also holds the UNet and text encoder: keep only the autoencoder.
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    # LDM training checkpoints carry the discriminator and LPIPS under loss.*: not part of the autoencoder.
    return {k: v for k, v in sd.items() if not k.startswith("loss.") and torch.is_tensor(v)}


class CheckpointMismatchError(KeyError, ValueError):
    """A state dict that does not fit the model built for it (a KeyError for the keys, a ValueError for shapes)."""
    def __str__(self):
        return str(self.args[0])  # KeyError would print the message in quotes


def load_state_dict_checked(model, sd, source, describe=None):
    """
    model.load_state_dict(sd, strict=True) with an error that names the first missing and unexpected keys and the
    first shape mismatch. describe: optional fn(state_dict) -> str naming the config a state dict was made for
    (e.g. "DiT-XL/2"), so a checkpoint of another config says which one it is.
    """
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        msg = []
        if describe is not None:
            try:
                msg.append(f"checkpoint is {describe(sd)}, model is {describe(own)}")
            except (KeyError, ValueError, IndexError):
                pass  # too far off to describe: the keys below say enough
        if missing or unexpected:
            msg.append(f"{len(missing)} missing keys (first 5: {missing[:5]}), "
                       f"{len(unexpected)} unexpected keys (first 5: {unexpected[:5]})")
        if wrong:
            k = wrong[0]
            msg.append(f"{len(wrong)} shape mismatches, first {k}: shape {tuple(sd[k].shape)} in the checkpoint "
                       f"vs {tuple(own[k].shape)} in the model")
        raise CheckpointMismatchError(f"{source}: state dict does not fit the {type(model).__name__} built for it: "
                                      + "; ".join(msg))
    model.load_state_dict(sd, strict=True)
    return model


def load_autoencoder(path, ema=False):
    """A KLVAE (or taming VQGAN) in eval mode from a diffusers folder, an LDM / diffusers / taming file, or this
    project's checkpoint ({"model", "config" or "args", ...}; ema=True takes its "ema" weights instead)."""
    sd, config, diffusers_config = _read_checkpoint(path, ema)
    source = str(path)
    sd = _strip_prefixes(sd)
    if "quantize.embedding.weight" in sd:  # taming VQ-GAN (REFERENCE 5): built by the VQ-GAN section
        return load_vqgan_from_state_dict(sd, source, config=config).eval()  # own VQ checkpoints carry a config
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        sd = _diffusers_to_ldm_state_dict(sd)
    # Some diffusers -> LDM conversions leave the attention 1x1 convs as 2-D [C, C] matrices.
    sd = {k: v[:, :, None, None] if v.ndim == 2 and re.search(r"\.attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$", k)
          else v for k, v in sd.items()}
    if not any(k.startswith("encoder.") for k in sd):
        raise ValueError(f"{source}: not an autoencoder checkpoint (no encoder.* tensors; first keys: {sorted(sd)[:5]})")
    if diffusers_config is not None:
        config = _config_from_diffusers(diffusers_config)  # scaling_factor as the folder says (eq-vae-ema: 0.0683)
    elif config is None:
        config = _infer_kl_config(sd, source)  # scaling_factor: SD-VAE's default (set SDXL's 0.13025 yourself)
    vae = KLVAE(config)
    load_state_dict_checked(vae, sd, source)
    return vae.eval()


def _export_state_dict(vae):
    """The model's tensors, detached, contiguous, on the CPU (safetensors refuses shared or strided storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in vae.state_dict().items()}


def save_diffusers(vae, folder):
    """Write `vae` as a diffusers AutoencoderKL folder: config.json + diffusion_pytorch_model.safetensors."""
    from safetensors.torch import save_file
    c = vae.config
    if c["attn_resolutions"] or c["embed_dim"] != c["z_channels"]:
        raise ValueError("diffusers' AutoencoderKL has no attention outside the mid block and one latent width "
                         f"(attn_resolutions={c['attn_resolutions']}, embed_dim={c['embed_dim']}, z={c['z_channels']})")
    L = len(c["ch_mult"])
    config = {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0",
        "in_channels": c["in_channels"], "out_channels": c["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * L, "up_block_types": ["UpDecoderBlock2D"] * L,
        "block_out_channels": [c["ch"] * m for m in c["ch_mult"]], "layers_per_block": c["num_res_blocks"],
        "act_fn": "silu", "latent_channels": c["z_channels"], "norm_num_groups": c["norm_num_groups"],
        "sample_size": c["resolution"], "scaling_factor": float(vae.scaling_factor),
    }
    os.makedirs(folder, exist_ok=True)
    save_file(_ldm_to_diffusers_state_dict(_export_state_dict(vae), L),
              os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def save_ldm(vae, path):
    """Write `vae` in LDM format: {"state_dict": LDM names} (.ckpt/.pt/.pth) or a flat .safetensors file; our
    config rides along ("config" key / safetensors metadata) and is ignored by LDM's own loader."""
    config = dict(vae.config, scaling_factor=float(vae.scaling_factor))
    sd = _export_state_dict(vae)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, path, metadata={"format": "pt", "config": json.dumps(config)})
    else:
        torch.save({"state_dict": sd, "config": config}, path)


#################################################################################
#                        LPIPS (VGG16, lin layers v0.1)                         #
#################################################################################

_VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
_LPIPS_VGG_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"


class NetLinLayer(nn.Module):
    """LPIPS's per-layer weighting: dropout then a 1x1 conv to one channel, no bias (keys lin{k}.model.1.weight)."""
    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018), VGG16 variant v0.1; frozen, built in eval mode."""
    # Note: the lin layers' Dropout is identity in eval mode. LDM keeps LPIPS inside its Lightning module, whose
    # .train() switches that dropout on during autoencoder training; call .train() to reproduce that, .eval() not to.
    chns = (64, 128, 256, 512, 512)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def __init__(self, vgg_weights=None, lin_weights=None, pretrained=True):
        super().__init__()
        # Scaling layer: maps [-1, 1] inputs to ImageNet-normalised ones (REFERENCE 6).
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
        if pretrained:
            self._load_pretrained(vgg_weights, lin_weights)
        else:
            # Random weights for tests: torchvision's VGG init; lin weights >= 0 like the trained ones (LPIPS
            # clamps them during training), so distances stay non-negative.
            for m in self.features:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
            for lin, c in zip(self.lins.values(), self.chns):
                nn.init.uniform_(lin.model[1].weight, 0.0, 2.0 / c)
        self.requires_grad_(False)
        self.eval()

    def _load_pretrained(self, vgg_weights, lin_weights):
        """Load torchvision's VGG16 features and LPIPS v0.1 lin weights (paths, or torch hub's cache)."""
        vgg = torch.load(find_weights("vgg16-397923af.pth", _VGG16_URL, vgg_weights), map_location="cpu",
                         weights_only=True)
        vgg = {k[len("features."):]: v for k, v in vgg.items()
               if k.startswith("features.") and int(k.split(".")[1]) < len(self.features)}
        load_state_dict_checked(self.features, vgg, "VGG16 weights")
        lin = torch.load(find_weights("vgg.pth", _LPIPS_VGG_URL, lin_weights), map_location="cpu", weights_only=True)
        load_state_dict_checked(self.lins, lin, "LPIPS lin weights")  # keys lin{k}.model.1.weight

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
            stride = 2 if n < n_layers else 1  # 64->128, 128->256 stride 2; 256->512 stride 1 (REFERENCE 1)
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
    """Discriminator hinge loss 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) (REFERENCE 1)."""
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


class VQGAN(nn.Module):
    """Taming VQModel: encoder -> quant_conv -> codebook -> post_quant_conv -> decoder."""

    def __init__(self, config="vqgan-f16-1024"):
        super().__init__()
        config = _vq_resolve_config(config)
        self.config = config
        dd = {k: config[k] for k in _VQ_DDCONFIG_KEYS}  # taming's "ddconfig"
        # Modules in taming's order, so state_dict() lists the keys as released checkpoints do.
        self.encoder = Encoder(**dd, double_z=False)
        self.decoder = Decoder(**dd, double_z=False)
        self.quantize = VectorQuantizer(config["n_embed"], config["embed_dim"], beta=config["beta"],
                                        legacy=config["legacy"])
        self.quant_conv = nn.Conv2d(config["z_channels"], config["embed_dim"], 1)
        self.post_quant_conv = nn.Conv2d(config["embed_dim"], config["z_channels"], 1)
        # VQ latents are used as they are (MaskGIT consumes indices); kept so code written for KLVAE runs unchanged.
        self.scaling_factor = 1.0

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


#################################################################################
#                               VQ-GAN Configs                                  #
#################################################################################

_VQ_DDCONFIG_KEYS = ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "in_channels", "resolution",
                     "z_channels", "norm_num_groups", "dropout")

vq_configs = {
    # taming configs/imagenet_vqgan.yaml: the f16 / 1024-code VQ-GAN of MaskGIT-pytorch and of the paper's Table 1,
    # 72,141,699 parameters, 16 x 16 tokens at 256 px (beta 0.25 is hard-coded in taming's VQModel; legacy=True is
    # VectorQuantizer2's default).
    "vqgan-f16-1024": dict(ch=128, out_ch=3, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16],
                           in_channels=3, resolution=256, z_channels=256, norm_num_groups=32, n_embed=1024,
                           embed_dim=256, beta=0.25, legacy=True),
    # CPU-sized for tests and the demo at 64 px (818K parameters in the encoder + decoder, ~2x faster than ch 32).
    # f8 rather than f16: 64 px / 16 would leave a 4 x 4 token grid, too small for MaskGIT's masking schedule and
    # for EQ-VAE's latent rescaling (only 2 x 2 and 3 x 3 targets); 8 x 8 keeps both meaningful. Attention at the
    # lowest resolution (8 px) as f16-1024 has it at its lowest (16); widths and GroupNorm(8) as the tiny KL-VAE;
    # a 256-code x 16-dim codebook keeps z_channels == embed_dim as in the full model. (taming itself cannot build
    # this one: it hard-codes GroupNorm(32).)
    "tiny": dict(ch=16, out_ch=3, ch_mult=[1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[8], in_channels=3,
                 resolution=64, z_channels=16, norm_num_groups=8, n_embed=256, embed_dim=16, beta=0.25,
                 legacy=True),
}
_VQ_DEFAULTS = dict(in_channels=3, out_ch=3, norm_num_groups=32, dropout=0.0, beta=0.25, legacy=True)


def _vq_resolve_config(config):
    """A vq_configs name or a config dict -> a complete config dict (a copy); unknown keys are an error."""
    if isinstance(config, str):
        if config not in vq_configs:
            raise ValueError(f"unknown VQ-GAN config {config!r}; valid names: {sorted(vq_configs)}")
        config = vq_configs[config]
    valid = set(_VQ_DDCONFIG_KEYS) | {"n_embed", "embed_dim", "beta", "legacy"}
    unknown = sorted(set(config) - valid)
    if unknown:
        raise ValueError(f"unknown VQ-GAN config keys {unknown}; valid keys: {sorted(valid)}")
    config = {**_VQ_DEFAULTS, **config}
    missing = sorted(valid - set(config))
    if missing:
        raise ValueError(f"VQ-GAN config is missing {missing}")
    for key in ("ch_mult", "attn_resolutions"):
        config[key] = [int(v) for v in config[key]]  # lists, as the KL configs: JSON- and weights_only-friendly
    return config


#################################################################################
#                         VQ-GAN Checkpoint Loading and Saving                  #
#################################################################################
# Formats: taming's Lightning last.ckpt ({"state_dict": {encoder.*, decoder.*, quantize.*, quant_conv.*,
# post_quant_conv.*, loss.*}}, plus Lightning bookkeeping), the same file as MaskGIT-pytorch distributes it
# (pretrained_maskgit/VQGAN/last.ckpt next to model.yaml; its trainer reads ckpts/last.ckpt + configs/model.yaml,
# taming's release layout), a plain state dict, LDM checkpoints with a VQ first stage under first_stage_model.,
# and this project's {"model": sd, "config": cfg}. model.yaml is never needed: shapes give the architecture.

def _vq_unwrap(obj, source):
    """Checkpoint object -> (flat VQModel state dict without loss.* keys, saved config or None)."""
    config = None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # taming / Lightning
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        config = obj.get("config") if isinstance(obj.get("config"), dict) else None
        obj = obj["model"]  # this project's {"model": sd, "config": cfg}
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: not a state dict (got {type(obj).__name__})")
    # Prefixes (DDP module., first_stage_model. of a whole LDM) and taming's loss.* (VQLPIPSWithDiscriminator's
    # LPIPS + PatchGAN, stored next to the model) are handled as for the KL autoencoder.
    return _strip_prefixes(obj), config


def infer_vqgan_config(sd, source="state dict"):
    """Read a VQ-GAN config off the tensor shapes of a taming-named state dict."""
    def shape(key):
        if key not in sd:
            raise ValueError(f"{source}: not a taming VQ-GAN state dict, tensor {key!r} is missing "
                             f"(first keys: {sorted(sd)[:5]})")
        return tuple(sd[key].shape)

    n_embed, embed_dim = shape("quantize.embedding.weight")
    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"{source}: encoder.down levels {levels} are not 0, 1, ..., L-1")
    attn_levels = [i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd]
    config = dict(
        ch=ch, in_channels=in_channels, out_ch=shape("decoder.conv_out.weight")[0],
        ch_mult=[shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels],
        num_res_blocks=len({m.group(1) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}),
        z_channels=shape("quant_conv.weight")[1], n_embed=n_embed, embed_dim=embed_dim)
    # The weights store neither the training resolution (it only places attention: the network is convolutional)
    # nor the GroupNorm group count. A known config with these shapes supplies both; else taming's 256 px and 32.
    for known in vq_configs.values():
        known_attn = [i for i in levels if known["resolution"] // 2 ** i in known["attn_resolutions"]]
        if all(known[k] == v for k, v in config.items()) and known_attn == attn_levels:
            return _vq_resolve_config(known)
    widths = [ch] + [ch * m for m in config["ch_mult"]]
    if any(w % 32 for w in widths):
        raise ValueError(f"{source}: channel widths {widths} are not multiples of 32, so the GroupNorm group count "
                         f"cannot be inferred; pass config= or load a checkpoint that carries its config")
    return _vq_resolve_config(dict(config, resolution=256, attn_resolutions=[256 // 2 ** i for i in attn_levels]))


def load_vqgan_from_state_dict(sd, source="state dict", config=None):
    """A taming / MaskGIT / LDM / own-format VQ-GAN state dict (wrapped or not) -> VQGAN in eval mode.
    config: None (read from the checkpoint or inferred from shapes), a vq_configs name, or a dict."""
    sd, saved_config = _vq_unwrap(sd, source)
    inferred = infer_vqgan_config(sd, source)
    if config is None:
        config = saved_config if saved_config is not None else inferred
    else:
        config = _vq_resolve_config(config)
        # The two mistakes worth a sentence of their own: the wrong codebook size or the wrong code width.
        if config["n_embed"] != inferred["n_embed"]:
            raise ValueError(f"{source}: codebook has {inferred['n_embed']} codes (quantize.embedding.weight "
                             f"{tuple(sd['quantize.embedding.weight'].shape)}) but the config asks for "
                             f"n_embed={config['n_embed']}")
        if config["embed_dim"] != inferred["embed_dim"]:
            raise ValueError(f"{source}: codes are {inferred['embed_dim']}-dim (quantize.embedding.weight "
                             f"{tuple(sd['quantize.embedding.weight'].shape)}) but the config asks for "
                             f"embed_dim={config['embed_dim']}")
    model = VQGAN(config)
    load_state_dict_checked(model, sd, source)  # names missing / unexpected keys and shape mismatches
    return model.eval()


def find_vqgan_checkpoint(folder):
    """The checkpoint file of a taming / MaskGIT-pytorch VQGAN folder, or None."""
    for name in ("last.ckpt", os.path.join("ckpts", "last.ckpt")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def load_vqgan(path, config=None):
    """A VQ-GAN checkpoint file or folder (taming / MaskGIT-pytorch: last.ckpt or ckpts/last.ckpt; model.yaml is
    not needed, the architecture is read off the shapes) -> VQGAN in eval mode."""
    if os.path.isdir(path):
        file = find_vqgan_checkpoint(path)
        if file is None:
            raise FileNotFoundError(f"{path}: no VQ-GAN checkpoint in this folder (looked for last.ckpt and "
                                    f"ckpts/last.ckpt, the taming / MaskGIT-pytorch layouts)")
        path = file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VQ-GAN checkpoint {path} does not exist")
    # _torch_load (KL section): weights_only=True, with inert stubs for the Lightning objects taming pickled
    return load_vqgan_from_state_dict(_torch_load(path), source=path, config=config)


def save_taming(vq, path):
    """Write vq in taming's layout ({"state_dict": ...}) that taming's VQModel.init_from_ckpt and MaskGIT-pytorch
    read; written to a temporary file and renamed, so an interrupted save leaves no half file."""
    sd = {k: v.detach().cpu().contiguous() for k, v in vq.state_dict().items()}
    tmp = f"{path}.tmp"
    torch.save({"state_dict": sd}, tmp)
    os.replace(tmp, path)


#################################################################################
#                  VQ-GAN Fine-tuning Loss (taming VQLPIPSWithDiscriminator)    #
#################################################################################

def vq_generator_loss(x, x_hat, codebook_loss, lpips, discriminator, last_layer, disc_factor=1.0,
                      perceptual_weight=1.0, codebook_weight=1.0, disc_weight=0.8):
    """Autoencoder loss of the VQ branch, taming's VQLPIPSWithDiscriminator (optimizer_idx 0) as in
    configs/imagenet_vqgan.yaml: codebook_weight 1.0, disc_weight 0.8, perceptual_weight 1.0, hinge GAN.
    x, x_hat: (B, 3, H, W) target (tau-transformed in the equivariance branch) and reconstruction in [-1, 1];
    codebook_loss: () from VQGAN.quantize; lpips: callable (x, y) -> (B,); discriminator: PatchGAN;
    last_layer: VQGAN.get_last_layer(); disc_factor: 0 before the GAN starts. Returns (loss, dict of parts).
    The discriminator's own update is the hinge loss shared with the KL branch."""
    # Unlike the KL loss (summed over pixels, divided by B), taming averages: mean over every element of
    # |x - x_hat| + LPIPS, with LPIPS (B,) broadcast over the pixels of its image.
    p_loss = lpips(x, x_hat).view(-1, 1, 1, 1)
    rec = (x - x_hat).abs() + perceptual_weight * p_loss
    nll = rec.mean()
    g_loss = -discriminator(x_hat).mean()
    if disc_factor > 0 and torch.is_grad_enabled() and g_loss.requires_grad:
        # Adaptive weight: balance the GAN gradient against the reconstruction gradient at the decoder's last
        # layer, ||grad nll|| / (||grad g|| + 1e-4), clamped to [0, 1e4], treated as a constant.
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * disc_weight
    else:
        d_weight = torch.zeros((), device=x.device)  # taming: 0 when no gradient can be taken (eval)
    loss = nll + d_weight * disc_factor * g_loss + codebook_weight * codebook_loss.mean()
    parts = {"nll": nll.detach(), "rec": (x - x_hat).abs().mean().detach(), "lpips": p_loss.mean().detach(),
             "codebook": codebook_loss.detach().mean(), "g_loss": g_loss.detach(), "d_weight": d_weight.detach()}
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


#################################################################################
#               DiT: Embedding Layers for Timesteps and Class Labels            #
#################################################################################
# The DiT/SiT/REPA backbone (Peebles & Xie 2023; Ma et al. 2024; Yu et al. 2025). Parameter names and shapes are
# those of facebookresearch/DiT's models.py (REFERENCE 7), so the official DiT-XL-2-256x256.pt, SiT-XL-2-256.pt and
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

    def initialize_weights(self):
        # Xavier-uniform on every Linear (projectors included, as REPA), zero biases:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        if self.pos_embed.is_meta:  # built on the meta device (shape checks): nothing to fill
            return

        # Fixed sin-cos position embedding (MAE):
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.x_embedder.num_patches ** 0.5))
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Patch embedding initialised like nn.Linear on the flattened kernel (instead of nn.Conv2d's default):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity (DiT Sec. 3.2), and the output starts at zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

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

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_all_channels=False):
        """
        Classifier-free guidance in one batched forward. x, t, y: (2N, ...) with the conditional half first and the
        null label in the second half; the first half of x is used for both. Returns (2N, out_channels, H, W) with the
        guided eps in both halves.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        if isinstance(model_out, tuple):
            model_out = model_out[0]
        # For exact reproducibility of the official numbers, guidance acts on only the first three channels by
        # default, as in DiT and SiT (a leftover; cfg 1.5 on 3 of 4 channels ~ 1.375 on all). cfg_all_channels=True
        # is the standard formulation.
        n = self.in_channels if cfg_all_channels else 3
        eps, rest = model_out[:, :n], model_out[:, n:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
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

def DiT_XL_2(**kwargs): return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)
def DiT_XL_4(**kwargs): return DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)
def DiT_XL_8(**kwargs): return DiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)
def DiT_L_2(**kwargs): return DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)
def DiT_L_4(**kwargs): return DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)
def DiT_L_8(**kwargs): return DiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)
def DiT_B_2(**kwargs): return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)
def DiT_B_4(**kwargs): return DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)
def DiT_B_8(**kwargs): return DiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)
def DiT_S_2(**kwargs): return DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)
def DiT_S_4(**kwargs): return DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)
def DiT_S_8(**kwargs): return DiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)
# Not in the paper: a CPU-sized model for the tiny preset and tests (8x8x4 latents of 64 px images).
def DiT_T_2(**kwargs): return DiT(depth=4, hidden_size=128, patch_size=2, num_heads=4, **kwargs)


DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
    "DiT-T/2": DiT_T_2,
}


def build_dit(name, **kwargs):
    """DiT_models[name](**kwargs) with a clear error for an unknown name."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; valid DiT models: {', '.join(DiT_models)}")
    return DiT_models[name](**kwargs)


def dit_config_from_state_dict(state_dict):
    """Read (depth, hidden_size, patch_size, in_channels, out_channels, input_size, num_classes) off DiT weights."""
    w = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_ch, p = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    out_ch = state_dict["final_layer.linear.weight"].shape[0] // (p * p)
    grid = int(round(state_dict["pos_embed"].shape[1] ** 0.5))
    return dict(depth=depth, hidden_size=hidden, patch_size=p, in_channels=in_ch, out_channels=out_ch,
                input_size=grid * p, num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1)


def _describe_dit(cfg):
    """Human-readable config, with the DiT_models name when one matches."""
    known = {(28, 1152): "XL", (24, 1024): "L", (12, 768): "B", (12, 384): "S", (4, 128): "T"}
    size = known.get((cfg["depth"], cfg["hidden_size"]))
    name = f"DiT-{size}/{cfg['patch_size']} " if size else ""
    return (f"{name}(depth {cfg['depth']}, hidden {cfg['hidden_size']}, patch {cfg['patch_size']}, "
            f"{cfg['in_channels']}->{cfg['out_channels']} channels, {cfg['input_size']}x{cfg['input_size']} latents, "
            f"{cfg['num_classes']} classes)")


def load_dit_weights(model, state_dict, source="checkpoint"):
    """model.load_state_dict(state_dict) with errors that say which config the checkpoint was trained for."""
    return load_state_dict_checked(model, state_dict, source,
                                   describe=lambda sd: _describe_dit(dit_config_from_state_dict(sd)))


#################################################################################
#                  Gaussian Diffusion (DiT's training and sampling)             #
#################################################################################
# DDPM (Ho et al. 2020) with the improvements of IDDPM (Nichol & Dhariwal 2021) that DiT trains with (REFERENCE 7):
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

    @staticmethod
    def _extract(arr, t, x):
        """arr[t] for a batch of indices t (N,), as float32 shaped (N, 1, 1, 1) to broadcast against x."""
        return torch.from_numpy(arr).to(t.device)[t].float().view(-1, *([1] * (x.ndim - 1)))

    def _model(self, model, x, t, model_kwargs):
        """Call the model at the original timesteps that the (possibly respaced) indices t stand for."""
        ts = torch.from_numpy(self.timestep_map).to(device=t.device, dtype=t.dtype)[t]
        out = model(x, ts, **(model_kwargs or {}))
        return out[0] if isinstance(out, tuple) else out  # REPA returns (output, projections)

    # ---- forward process ----
    def q_mean_variance(self, x_start, t):
        """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): (mean, variance, log variance)."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        return mean, self._extract(1.0 - self.alphas_cumprod, t, x_start), \
            self._extract(self.log_one_minus_alphas_cumprod, t, x_start)

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. t = 0 is one step of noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """q(x_{t-1} | x_t, x_0): (mean, variance, clipped log variance)."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, self._extract(self.posterior_variance, t, x_t), \
            self._extract(self.posterior_log_variance_clipped, t, x_t)

    # ---- reverse process ----
    def _predict_xstart_from_eps(self, x_t, t, eps):
        return self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t \
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) \
            / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

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
            min_log = self._extract(self.posterior_log_variance_clipped, t, x)
            max_log = self._extract(np.log(self.betas), t, x)
            frac = (var_values + 1) / 2  # [-1, 1] -> [beta~_t, beta_t] in log space (IDDPM Eq. 15)
            model_log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output[:, :C]
            model_log_variance = self._extract(self.fixed_log_variance, t, x).expand_as(x)
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
        alpha_bar = self._extract(self.alphas_cumprod, t, x)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x)
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
            t = torch.tensor([i] * shape[0], device=img.device)
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
#  Work-in-progress sections, developed in parallel in _wip_models_*.py files.  #
#  Each file is written as if it were a section of this file; they are merged   #
#  verbatim before landing and this hook is removed.                            #
#################################################################################
def _load_wip_sections():
    import glob
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_wip_models_*.py"))):
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), globals())


_load_wip_sections()
