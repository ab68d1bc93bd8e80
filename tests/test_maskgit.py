"""MaskGIT: checkpoint layout, forward math, schedules, the sampler, the loss, the token cache, DDP and resume."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import models
from helpers import assert_ema_starts_at_rank0_model, perturb, run_script, run_with_ema_probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "maskgit_pytorch_v1_256.json")




def _small(**kw):
    cfg = dict(input_size=4, codebook_size=12, num_classes=5, hidden_size=16, depth=2, num_heads=2, mlp_dim=24)
    cfg.update(kw)
    return models.MaskTransformer(**cfg)


#################################################################################
#                          Layout and forward math                              #
#################################################################################

def test_released_checkpoint_layout_on_meta_device():
    """Names, order and shapes of the released Maskgit-pytorch v1 256 px checkpoint (~174M parameters)."""
    with open(FIXTURE) as f:
        fixture = json.load(f)
    with torch.device("meta"):
        model = models.MaskGIT_models["maskgit-256"]()
    sd = model.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == fixture["shapes"]
    assert len(sd) == fixture["num_tensors"]
    assert sum(v.numel() for v in sd.values()) == fixture["num_params"] == 174_160_874


def test_forward_matches_hand_written_transformer():
    """Logits against an op-by-op re-implementation from the state dict (class token last, null class row,
    LayerNorm eps 1e-12 outside / 1e-5 inside the blocks, exact GELU, tied head + bias, slicing)."""
    torch.manual_seed(0)
    model = _small().eval()
    perturb(model, 0.1)  # non-trivial LayerNorm affine and biases
    K, C, N, D, H = 12, 5, 16, 16, 2
    sd = model.state_dict()
    tokens = torch.randint(0, K + 1, (3, 4, 4))
    y = torch.tensor([0, 4, 2])
    drop = torch.tensor([False, False, True])

    ids = torch.cat([tokens.view(3, N), torch.tensor([[K + 1 + 0], [K + 1 + 4], [K + 1 + C]])], 1)  # null = K+1+C
    x = sd["tok_emb.weight"][ids] + sd["pos_emb"]

    def ln(x, pre, eps):
        return F.layer_norm(x, (D,), sd[pre + ".weight"], sd[pre + ".bias"], eps)

    def lin(x, pre):
        return x @ sd[pre + ".weight"].t() + sd[pre + ".bias"]

    x = lin(ln(F.gelu(lin(ln(x, "first_layer.0", 1e-12), "first_layer.2")), "first_layer.4", 1e-12), "first_layer.6")
    for i in range(2):
        p = f"transformer.layers.{i}"
        h = ln(x, f"{p}.0.norm", 1e-5)
        qkv = h @ sd[f"{p}.0.fn.mha.in_proj_weight"].t() + sd[f"{p}.0.fn.mha.in_proj_bias"]
        q, k, v = (t.view(3, N + 1, H, D // H).transpose(1, 2) for t in qkv.chunk(3, -1))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), -1) @ v
        x = x + lin(att.transpose(1, 2).reshape(3, N + 1, D), f"{p}.0.fn.mha.out_proj")
        x = x + lin(F.gelu(lin(ln(x, f"{p}.1.norm", 1e-5), f"{p}.1.fn.net.0")), f"{p}.1.fn.net.3")
    x = ln(F.gelu(lin(ln(x, "last_layer.0", 1e-12), "last_layer.2")), "last_layer.4", 1e-12)
    expected = (x @ sd["tok_emb.weight"].t() + sd["bias"])[:, :N, :K + 1]

    with torch.no_grad():
        out = model(tokens, y, drop)
    assert out.shape == (3, N, K + 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_clear_errors():
    model = _small()
    with pytest.raises(ValueError, match="4x4 tokens"):
        model(torch.zeros(1, 3, 3, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="maskgit-256"):
        models.build(models.MaskGIT_models, "maskgit-huge")
    sd = model.state_dict()
    sd["extra.weight"] = sd.pop("bias")
    with pytest.raises(ValueError, match=r"missing keys .*'bias'.*unexpected keys .*'extra.weight'"):
        checkpoints.load_maskgit_weights(_small(), sd)
    with pytest.raises(ValueError, match=r"shape mismatches, first pos_emb"):
        checkpoints.load_maskgit_weights(_small(), _small(input_size=5).state_dict())


def test_load_maskgit_pytorch_checkpoint_format(tmp_path):
    """A file as Maskgit-pytorch's save_network writes it: the architecture is read off the shapes."""
    torch.manual_seed(0)
    ref = _small().eval()
    path = str(tmp_path / "current.pth")
    torch.save({"iter": 7, "global_epoch": 1, "model_state_dict": ref.state_dict(), "optimizer_state_dict": {}}, path)
    model = checkpoints.load_maskgit(path, num_classes=5, num_heads=2)
    assert model.config == ref.config and model.vqgan_path is None and not model.training
    tokens, y = torch.randint(0, 13, (2, 4, 4)), torch.tensor([1, 4])
    with torch.no_grad():
        assert torch.equal(model(tokens, y), ref(tokens, y))
    torch.save({"weights": 1}, str(tmp_path / "other.pth"))
    with pytest.raises(KeyError, match="tok_emb.weight"):
        checkpoints.load_maskgit(str(tmp_path / "other.pth"))


#################################################################################
#                                  Schedules                                    #
#################################################################################

def test_reveal_schedule_sums_and_minimum():
    for n in (16, 64, 256):
        for mode in ("arccos", "cosine", "linear", "square"):
            for steps in range(1, n + 1):
                s = models.maskgit_reveal_schedule(steps, n, mode)
                assert len(s) == steps and int(s.sum()) == n and int(s.min()) >= 1, (n, mode, steps, s)
    with pytest.raises(ValueError, match="steps must be in"):
        models.maskgit_reveal_schedule(17, 16)


def test_reveal_schedule_reference_values():
    """Values of the reference's adap_sche (Trainer/vit.py), worked out by hand from its formula:
    8 steps arccos: w = arccos(linspace(1, 0, 8)) / (pi / 2), 256 w / sum(w), rounded, 0 -> 1, last takes the rest."""
    r = [1 - i / 7 for i in range(8)]
    w = [math.acos(v) / (math.pi / 2) for v in r]
    hand = [max(1, round(256 * v / sum(w))) for v in w]
    hand[-1] += 256 - sum(hand)
    assert hand == [1, 18, 26, 32, 38, 43, 48, 50]
    assert models.maskgit_reveal_schedule(8, 256, "arccos").tolist() == hand
    assert models.maskgit_reveal_schedule(12, 256, "cosine").tolist() == [1, 5, 10, 14, 18, 22, 26, 29, 31, 33, 34, 33]


def test_mask_rates_follow_schedule():
    """Empirical mask rate = E[gamma(r)], r ~ U(0, 1): 2/pi (arccos, cosine), 1/2 (linear), 1/3 (square); and
    E[gamma^2] for arccos = (4 / pi^2) * int_0^1 arccos(r)^2 dr = 4 (pi - 2) / pi^2."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (20000, 8, 8), generator=g)
    for mode, mean in (("arccos", 2 / math.pi), ("cosine", 2 / math.pi), ("linear", 0.5), ("square", 1 / 3)):
        masked, mask = models.maskgit_random_mask(tokens, 50, mode, generator=g)
        assert abs(mask.float().mean().item() - mean) < 0.01, mode
        assert torch.equal(masked[mask], torch.full_like(masked[mask], 50))
        assert torch.equal(masked[~mask], tokens[~mask])
    # Per-image rate m = gamma + binomial noise over 64 tokens: E[m^2] = E[gamma^2] + E[gamma (1 - gamma)] / 64.
    _, mask = models.maskgit_random_mask(tokens, 50, "arccos", generator=g)
    m = mask.float().mean((1, 2))
    e2 = 4 * (math.pi - 2) / math.pi ** 2
    assert abs((m ** 2).mean().item() - (e2 + (2 / math.pi - e2) / 64)) < 0.01


#################################################################################
#                                  Sampler                                      #
#################################################################################

class RecordingModel(nn.Module):
    """Dummy transformer: random logits, records every input grid and label-drop vector."""

    def __init__(self, grid=4, codebook_size=10):
        super().__init__()
        self.input_size, self.codebook_size, self.mask_token_id = grid, codebook_size, codebook_size
        self.calls = []
        self.g = torch.Generator().manual_seed(1)

    def forward(self, tokens, y, drop_label):
        self.calls.append((tokens.clone(), drop_label.clone()))
        b = tokens.shape[0]
        return 3 * torch.randn(b, self.input_size ** 2, self.codebook_size + 1, generator=self.g)


@pytest.mark.parametrize("variant,steps,cfg_w", [("pytorch", 8, 3.0), ("pytorch", 5, 0.0), ("jax", 12, 0.0),
                                                 ("jax", 6, 2.0)])
def test_sampler_never_changes_revealed_tokens(variant, steps, cfg_w):
    model = RecordingModel()
    y = torch.tensor([1, 2, 3])
    out, history = models.maskgit_sample(model, y, variant=variant, steps=steps, cfg_w=cfg_w,
                                         generator=torch.Generator().manual_seed(0), return_history=True)
    K, N = 10, 16
    assert out.shape == (3, 4, 4) and out.dtype == torch.long and 0 <= int(out.min()) and int(out.max()) < K
    assert len(model.calls) == steps and len(history) == steps
    grids = [c[0][:3].view(3, N) for c in model.calls] + [out.view(3, N)]
    assert (grids[0] == K).all()  # starts all masked
    for before, after in zip(grids[:-1], grids[1:]):
        known = before != K
        assert torch.equal(after[known], before[known].clamp(max=K - 1))  # revealed tokens never change
    assert not history[-1].any()  # ends with no masks
    revealed = [int((~h.view(3, N)).sum(1)[0]) for h in history]
    if variant == "pytorch":
        expected = torch.cumsum(models.maskgit_reveal_schedule(steps, N, "arccos"), 0).tolist()
    else:  # still masked after step t: floor(N cos(pi/2 (t+1)/T)), kept in [1, unknown - 1], none after the last;
        # float32 as the reference (JAX) computes it (at T = 12, step 7: 16 * cos(pi/3) = 7.9999995 -> 7 masked).
        expected, unknown = [], N
        for t in range(steps - 1):
            gamma = max(np.cos(np.float32(math.pi / 2 * (t + 1) / steps)), np.float32(1e-6))
            keep = max(1, min(unknown - 1, int(np.floor(np.float32(N) * gamma))))
            expected.append(N - keep)
            unknown = keep
        expected.append(N)
    assert revealed == expected
    if cfg_w:  # guided: every call doubles the batch, conditional half first, unconditional half on the null class
        for _, drop in model.calls:
            assert drop.tolist() == [False] * 3 + [True] * 3


def test_cfg_weight_ramp_and_combination(monkeypatch):
    assert [models.maskgit_cfg_weight(t, 8, 3.0) for t in range(8)] == pytest.approx([3.0 * t / 7 for t in range(8)])
    seen = []
    original = models._maskgit_guided_logits

    def spy(model, code, y, w):
        seen.append(w)
        return original(model, code, y, w)

    monkeypatch.setattr(models, "_maskgit_guided_logits", spy)
    models.maskgit_sample(RecordingModel(), torch.tensor([0]), steps=8, cfg_w=3.0)
    assert seen == pytest.approx([3.0 * t / 7 for t in range(8)])

    class TwoFaced(nn.Module):  # conditional logits A, unconditional B
        def forward(self, tokens, y, drop_label):
            a, b = torch.full((1, 4, 3), 2.0), torch.tensor([[[1.0, -1.0, 0.5]]]).expand(1, 4, 3)
            return torch.where(drop_label.view(-1, 1, 1), b, a)

    out = original(TwoFaced(), torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long), 1.5)
    torch.testing.assert_close(out, (2.5 * torch.full((1, 4, 3), 2.0) - 1.5 * torch.tensor([1.0, -1.0, 0.5])))


#################################################################################
#                           Loss, token cache, training                         #
#################################################################################

def test_label_smoothing_loss_by_hand():
    import train_maskgit
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]])  # (B=1, N=2, K+1=3)
    code = torch.tensor([[0, 1]]).view(1, 1, 2)
    eps = 0.1
    total = 0.0
    for row, target in zip(logits[0].tolist(), [0, 1]):
        logz = math.log(sum(math.exp(v) for v in row))
        nll = [logz - v for v in row]
        total += (1 - eps) * nll[target] + eps * sum(nll) / 3
    assert train_maskgit.maskgit_loss(logits, code, eps).item() == pytest.approx(total / 2, rel=1e-6)


def _tiny_vq(seed):
    torch.manual_seed(seed)
    return models.VQGAN_models["tiny"]().eval()


def test_token_cache_contents_resume_and_mismatch(tmp_path, one_thread):
    import data
    ds = data.build_dataset("synthetic", 64, "center", num_images=10)
    vq = _tiny_vq(0)
    cache = str(tmp_path / "cache")
    kw = dict(resolution=64, data_name="synthetic", batch_size=4, shard_size=4, log=lambda *a: None)
    meta = data.build_token_cache(vq, ds, cache, **kw)
    assert meta["grid"] == [8, 8] and meta["codebook_size"] == 256 and meta["num_classes"] == 10
    tc = data.TokenCache(cache, flip=False)
    x = torch.stack([ds[i][0] for i in range(10)])
    with torch.no_grad():
        direct, mirrored = vq.encode_indices(x), vq.encode_indices(x.flip(-1))
    assert torch.equal(torch.stack([tc[i][0] for i in range(10)]), direct)
    assert [tc[i][1] for i in range(10)] == [ds[i][1] for i in range(10)]
    shards = np.concatenate([np.load(os.path.join(cache, f"shard_{k:05d}.npy")) for k in range(3)])  # (10, 2, 8, 8)
    assert shards.dtype == np.uint16  # 256 codes fit in 16 bits
    assert torch.equal(torch.from_numpy(shards[:, 0].astype(np.int64)), direct)
    assert torch.equal(torch.from_numpy(shards[:, 1].astype(np.int64)), mirrored)

    # A partial cache is resumed: only the missing shard is encoded again, to the same tokens.
    os.remove(os.path.join(cache, "shard_00001.npy"))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        data.TokenCache(cache)
    calls = []
    encode = vq.encode_indices
    vq.encode_indices = lambda x: calls.append(len(x)) or encode(x)
    data.build_token_cache(vq, ds, cache, **kw)
    assert calls == [1, 4, 4]  # the probe image, then shard 1's 4 images and their mirrors
    tc = data.TokenCache(cache, flip=False)
    assert torch.equal(torch.stack([tc[i][0] for i in range(10)]), direct)

    # Another VQ-GAN or another resolution: a clear error.
    with pytest.raises(ValueError, match="vqgan_sha256"):
        data.build_token_cache(_tiny_vq(1), ds, cache, **kw)
    with pytest.raises(ValueError, match="resolution: cache 64 vs now 32"):
        data.build_token_cache(vq, data.build_dataset("synthetic", 32, "center", num_images=10), cache,
                               **{**kw, "resolution": 32})


def _args(tmp_path, exp, *extra):
    return ["--preset", "tiny", "--results-dir", str(tmp_path / "results"), "--exp-name", exp, "--num-images", "32",
            "--cache", str(tmp_path / "cache"), "--cache-shard-size", "8", "--global-batch-size", "8",
            "--log-every", "2", *extra]


def test_torchrun_two_processes(tmp_path):
    _, ema = run_with_ema_probe(["train_maskgit.py", *_args(tmp_path, "ddp", "--max-steps", "4", "--ckpt-every", "4")],
                                tmp_path, cwd=tmp_path)
    assert_ema_starts_at_rank0_model(ema)
    run = tmp_path / "results" / "ddp"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [2, 4] and all(math.isfinite(row["loss"]) for row in rows)
    assert (run / "checkpoints" / "0000004.pt").exists()
    assert sorted(p.name for p in (tmp_path / "cache").glob("shard_*.npy")) == [f"shard_{k:05d}.npy" for k in range(4)]
    assert len(torch.load(run / "checkpoints" / "0000004.pt", weights_only=False)["rng"]) == 2  # both ranks' RNG


def test_resume_equals_straight_run_and_checkpoint_samples(tmp_path, one_thread):
    import train_maskgit
    def run(*argv):
        return train_maskgit.main(train_maskgit.parse_args(_args(tmp_path, *argv)))

    straight = run("a", "--max-steps", "6", "--ckpt-every", "6")
    run("b", "--max-steps", "3", "--ckpt-every", "3")
    resumed = run("b", "--max-steps", "6", "--ckpt-every", "3", "--resume", "auto")
    a = torch.load(os.path.join(straight, "checkpoints", "0000006.pt"), weights_only=False)
    b = torch.load(os.path.join(resumed, "checkpoints", "0000006.pt"), weights_only=False)
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert a["opt"]["state"][0]["exp_avg"].equal(b["opt"]["state"][0]["exp_avg"])
    assert a["loader"] == b["loader"]
    # metrics.jsonl of the resumed run has each step once
    assert [json.loads(line)["step"] for line in open(os.path.join(resumed, "metrics.jsonl"))] == [2, 3, 4, 6]

    # The checkpoint loads for sampling (EMA weights) and decodes to token grids of the tiny VQ-GAN.
    model = checkpoints.load_maskgit(os.path.join(resumed, "checkpoints", "0000006.pt"))
    assert not model.training and model.config["input_size"] == 8 and model.config["codebook_size"] == 256
    assert checkpoints.load_autoencoder(model.vqgan_path).quantize.embedding.weight.shape == (256, 16)  # its tokeniser
    tokens = models.maskgit_sample(model, torch.tensor([0, 9]), steps=4, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 8, 8) and int(tokens.max()) < 256
