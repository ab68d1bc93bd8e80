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
    _load_state_dict_checked(model, sd, source)  # names missing / unexpected keys and shape mismatches
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
