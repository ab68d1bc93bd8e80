#################################################################################
#                  MaskGIT: Masked Bidirectional Transformer                    #
#################################################################################
# MaskGIT (Chang et al. 2022) in the layout of its PyTorch reproduction, valeoai/Maskgit-pytorch v1 (REFERENCE 10),
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

def MaskGIT_256(**kwargs):
    """The released 256 px model: 16 x 16 tokens of the f16 VQ-GAN, 1024 codes, 1000 classes (~174M params)."""
    return MaskTransformer(**{**dict(input_size=16, codebook_size=1024, num_classes=1000, hidden_size=768, depth=24,
                                     num_heads=16, mlp_dim=3072, dropout=0.1), **kwargs})


def MaskGIT_512(**kwargs):
    """The released 512 px model: same network over 32 x 32 tokens."""
    return MaskGIT_256(**{"input_size": 32, **kwargs})


def MaskGIT_tiny(**kwargs):
    """CPU-sized model for --preset tiny; pass input_size / codebook_size / num_classes of the tiny VQ-GAN and data."""
    return MaskTransformer(**{**dict(input_size=8, codebook_size=64, num_classes=10, hidden_size=128, depth=3,
                                     num_heads=4, mlp_dim=512, dropout=0.1), **kwargs})


MaskGIT_models = {"maskgit-256": MaskGIT_256, "maskgit-512": MaskGIT_512, "maskgit-tiny": MaskGIT_tiny}


def build_maskgit(name, **kwargs):
    """MaskGIT_models[name](**kwargs) with a clear error for an unknown name."""
    if name not in MaskGIT_models:
        raise ValueError(f"unknown model {name!r}; valid MaskGIT models: {', '.join(MaskGIT_models)}")
    return MaskGIT_models[name](**kwargs)


def maskgit_config_from_state_dict(state_dict, num_classes=1000, num_heads=16):
    """
    Read the architecture off MaskTransformer weights. The table holds K + 1 + C + 1 rows, so the split between codes
    K and classes C needs one of them: num_classes (1000 for the released ImageNet models). Heads cannot be read off
    weights: num_heads, 16 as in every released model.
    """
    vocab, hidden = state_dict["tok_emb.weight"].shape
    depth = 1 + max(int(key.split(".")[2]) for key in state_dict if key.startswith("transformer.layers."))
    grid = int(round((state_dict["pos_emb"].shape[1] - 1) ** 0.5))
    return dict(input_size=grid, codebook_size=vocab - num_classes - 2, num_classes=num_classes, hidden_size=hidden,
                depth=depth, num_heads=num_heads, mlp_dim=state_dict["transformer.layers.0.1.fn.net.0.weight"].shape[0])


def load_maskgit_weights(model, state_dict, source="checkpoint"):
    """model.load_state_dict(state_dict) that names the first missing/unexpected keys and shape mismatches."""
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}  # DDP saves
    return load_state_dict_checked(model, state_dict, f"{source} (MaskTransformer {model.config})")


def load_maskgit(path, use_ema=True, num_classes=1000, num_heads=16):
    """
    A MaskTransformer in eval mode from a checkpoint file: this project's train_maskgit.py checkpoint ({"model",
    "ema", "config", "vqgan", ...}; EMA weights unless use_ema=False) or a Maskgit-pytorch file ({"model_state_dict",
    ...}, e.g. its released MaskGIT_ImageNet_256.pth, or a plain state dict; config read off the weights, with
    num_classes and num_heads given, as the weights do not tell).
    model.vqgan_path is the VQ-GAN the checkpoint was trained on, when it says (ours), else None.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MaskGIT checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(ckpt, dict) and "config" in ckpt and "model" in ckpt:  # ours
        state_dict = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
        config = ckpt["config"]
    else:
        state_dict = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        if not isinstance(state_dict, dict) or "tok_emb.weight" not in state_dict:
            found = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise KeyError(f"{path} is neither a train_maskgit.py checkpoint nor a Maskgit-pytorch state dict "
                           f"(no 'tok_emb.weight'; top-level keys: {found})")
        state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
        config = maskgit_config_from_state_dict(state_dict, num_classes=num_classes, num_heads=num_heads)
    model = load_maskgit_weights(MaskTransformer(**config), state_dict).eval()
    # The tokeniser it was trained on (train_maskgit.py records its path; None for Maskgit-pytorch files).
    model.vqgan_path = ckpt.get("vqgan") if isinstance(ckpt, dict) else None
    return model
