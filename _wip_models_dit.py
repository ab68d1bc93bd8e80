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


def load_dit_weights(model, state_dict):
    """model.load_state_dict(state_dict) with errors that say which config the checkpoint was trained for."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or wrong:
        msg = []
        try:
            msg.append(f"checkpoint is {_describe_dit(dit_config_from_state_dict(state_dict))}, "
                       f"model is {_describe_dit(dit_config_from_state_dict(own))}")
        except (KeyError, ValueError, IndexError):
            pass
        if missing:
            msg.append(f"missing keys (first 5 of {len(missing)}): {missing[:5]}")
        if unexpected:
            msg.append(f"unexpected keys (first 5 of {len(unexpected)}): {unexpected[:5]}")
        if wrong:
            k = wrong[0]
            msg.append(f"{len(wrong)} shape mismatches, first {k}: checkpoint {tuple(state_dict[k].shape)} "
                       f"vs model {tuple(own[k].shape)}")
        raise ValueError("checkpoint does not fit this model: " + "; ".join(msg))
    model.load_state_dict(state_dict)
    return model


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
