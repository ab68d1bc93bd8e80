"""VQ-GAN (taming f16-1024 layout): quantiser math, checkpoint IO, codebook health, the VQ fine-tuning loss.
Expected values are hand-computed, closed forms, brute force, or the upstream parameter layout (fixture)."""
import json
import os
import sys

import pytest
import torch
import torch.nn as nn

import checkpoints
import models

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _tiny_vq(seed=0):
    """Tiny VQGAN whose codebook is spread over its own encoder outputs, so many codes are in use."""
    torch.manual_seed(seed)
    vq = models.VQGAN_models["tiny"]().eval()
    with torch.no_grad():
        z = vq.encode(torch.rand(4, 3, 64, 64) * 2 - 1).permute(0, 2, 3, 1).reshape(-1, vq.config["embed_dim"])
        codes = z[torch.randint(0, z.shape[0], (vq.config["n_embed"],))]
        vq.quantize.embedding.weight.copy_(codes + 0.1 * z.std() * torch.randn_like(codes))
    return vq


def _hand_quantizer(codes, legacy=True):
    q = models.VectorQuantizer(len(codes), len(codes[0]), beta=0.25, legacy=legacy)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor(codes, dtype=torch.float32))
    return q


# ----------------------------------------------------------------------------- layout

def test_f16_1024_keys_and_shapes_match_taming():
    with open(os.path.join(FIXTURES, "vqgan_f16_1024_taming.json")) as f:
        fixture = json.load(f)
    with torch.device("meta"):
        vq = models.VQGAN()
    sd = vq.state_dict()
    assert list(sd) == list(fixture["shapes"])  # same names, in the order taming's VQModel registers them
    assert {k: list(v.shape) for k, v in sd.items()} == fixture["shapes"]
    assert sum(v.numel() for v in sd.values()) == fixture["num_params"] == 72141699


def test_config_inferred_from_shapes():
    with torch.device("meta"):
        vq = models.VQGAN()
    assert checkpoints.infer_vqgan_config(vq.state_dict()) == vq.config
    # An unnamed GroupNorm-32 variant: resolution is not in the weights, so attention is placed for 256 px.
    cfg = dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[16], resolution=64, z_channels=32,
               n_embed=64, embed_dim=8)
    with torch.device("meta"):
        inferred = checkpoints.infer_vqgan_config(models.VQGAN(**cfg).state_dict())
    assert inferred["attn_resolutions"] == [64] and inferred["resolution"] == 256
    assert (inferred["ch_mult"], inferred["num_res_blocks"], inferred["n_embed"], inferred["embed_dim"]) == \
        ([1, 2, 2], 1, 64, 8)


def test_unknown_config_name_lists_valid_ones():
    with pytest.raises(ValueError, match="vqgan-f16-1024"):
        models.build(models.VQGAN_models, "vqgan-f8-16384")


# ----------------------------------------------------------------------------- quantiser

def test_nearest_code_on_hand_built_codebook():
    q = _hand_quantizer([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    # (B=1, C=2, h=2, w=2): points (0.1, 0.1), (0.9, -0.2), (0.2, 1.5), (0.6, 0.0)
    pts = torch.tensor([[0.1, 0.1], [0.9, -0.2], [0.2, 1.5], [0.6, 0.0]])
    z = pts.view(1, 2, 2, 2).permute(0, 3, 1, 2)
    z_q, _, idx = q(z)
    # squared distances to the codes by hand: (0.02, 0.82, 3.62), (0.05, 0.05+..., ...) -> 0, 1, 2, 1
    assert idx.tolist() == [[[0, 1], [2, 1]]]
    assert torch.equal(z_q.permute(0, 2, 3, 1).reshape(4, 2), q.embedding.weight[torch.tensor([0, 1, 2, 1])])


def test_nearest_code_stays_fp32_under_autocast():
    # Near-tied distances between large vectors: the bf16 matmul picks wrong codes, the fp32 one does not.
    torch.manual_seed(0)
    q = models.VectorQuantizer(64, 16)
    with torch.no_grad():
        q.embedding.weight.copy_(10 + 0.05 * torch.randn(64, 16))
    z = q.embedding.weight.detach()[torch.randint(0, 64, (128,))] + 0.01 * torch.randn(128, 16)
    brute = ((z[:, None] - q.embedding.weight.detach()[None]) ** 2).sum(-1).argmin(1).view(2, 8, 8)
    z = z.view(2, 8, 8, 16).permute(0, 3, 1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx = q.nearest_codes(z)
    assert torch.equal(idx, brute)


def test_straight_through_gradient():
    q = _hand_quantizer([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    z = torch.randn(2, 2, 3, 3, requires_grad=True)
    z_q, _, _ = q(z)
    w = torch.randn_like(z_q)
    (z_q * w).sum().backward()
    assert torch.equal(z.grad, w)  # d z_q / d z = identity
    assert q.embedding.weight.grad is None or not q.embedding.weight.grad.any()  # no path from z_q to the codes


@pytest.mark.parametrize("legacy", [True, False])
def test_codebook_loss_placements(legacy):
    # 1-d codes {0, 1}; z = (0.2, 0.7) -> codes (0, 1); squared errors 0.04 and 0.09, mean 0.065.
    q = _hand_quantizer([[0.0], [1.0]], legacy=legacy)
    z = torch.tensor([0.2, 0.7]).view(1, 1, 1, 2).requires_grad_(True)
    _, loss, idx = q(z)
    assert idx.tolist() == [[[0, 1]]]
    assert loss.item() == pytest.approx(0.065 * 1.25, abs=1e-7)  # same value both ways; the gradients differ
    loss.backward()
    # commitment d/dz mean((sg[zq] - z)^2) = (z - zq) (N = 2); codebook d/de mean((e - sg[z])^2) = (e - z)
    commit, book = torch.tensor([0.2, -0.3]), torch.tensor([-0.2, 0.3])
    if legacy:  # taming legacy=True: beta on the codebook term
        exp_z, exp_e = commit, 0.25 * book
    else:  # VQ-VAE paper: beta on the commitment term
        exp_z, exp_e = 0.25 * commit, book
    assert torch.allclose(z.grad.view(-1), exp_z, atol=1e-6)
    assert torch.allclose(q.embedding.weight.grad.view(-1), exp_e, atol=1e-6)


def test_decode_indices_matches_decode_of_quantized_and_rejects_bad_indices():
    vq = _tiny_vq()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z_q, _, idx = vq.quantize(vq.encode(x))
        assert idx.shape == (2, 8, 8) and idx.dtype == torch.long
        assert torch.equal(vq.decode_indices(idx), vq.decode(z_q))
        assert torch.equal(vq.encode_indices(x), idx)
        for bad in (vq.config["n_embed"], -1):
            with pytest.raises(ValueError, match=r"\[0, 255\]"):
                vq.decode_indices(torch.full((1, 8, 8), bad))
        with pytest.raises(ValueError, match="shape"):
            vq.decode_indices(idx.float())


# ----------------------------------------------------------------------------- codebook health

def codebook_usage(indices, n_embed):
    return models.codebook_usage_from_histogram(models.codebook_histogram(indices, n_embed))


def test_codebook_usage_known_values():
    assert codebook_usage(torch.tensor([0, 0, 1, 1]), 4) == (pytest.approx(2.0), 2)
    assert codebook_usage(torch.arange(8).view(2, 2, 2), 8) == (pytest.approx(8.0), 0)
    assert codebook_usage(torch.full((3, 4, 4), 5), 16) == (pytest.approx(1.0), 15)
    # p = (1/2, 1/4, 1/4, 0): H = 1.5 ln 2, perplexity 2^1.5
    assert codebook_usage(torch.tensor([[0, 0], [1, 2]]), 4) == (pytest.approx(2 ** 1.5), 1)
    # a window accumulated from two steps equals the usage of both batches together
    h = models.codebook_histogram(torch.tensor([0, 0]), 4) + models.codebook_histogram(torch.tensor([1, 2]), 4)
    assert models.codebook_usage_from_histogram(h) == (pytest.approx(2 ** 1.5), 1)
    with pytest.raises(ValueError):
        models.codebook_usage_from_histogram(torch.zeros(4))


# ----------------------------------------------------------------------------- checkpoint IO

def _same_outputs(a, b, x):
    with torch.no_grad():
        xa, la, ia = a(x)
        xb, lb, ib = b(x)
    assert torch.equal(ia, ib) and torch.equal(xa, xb) and torch.equal(la, lb)


def test_taming_format_round_trip(tmp_path):
    vq = _tiny_vq()
    path = str(tmp_path / "last.ckpt")
    checkpoints.save_taming(vq, path)
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["state_dict"] and list(raw["state_dict"]) == list(vq.state_dict())
    loaded = checkpoints.load_autoencoder(path)
    assert isinstance(loaded, models.VQGAN) and not loaded.training
    assert loaded.config == vq.config  # the tiny config is recognised from its shapes
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    _same_outputs(vq, loaded, x)
    assert len(torch.unique(vq.encode_indices(x))) > 10  # the comparison covers many codes, not one


def test_maskgit_folder_lightning_checkpoint(tmp_path, monkeypatch):
    # MaskGIT-pytorch ships taming's Lightning last.ckpt: weights under state_dict next to loss.* tensors and
    # pickled Lightning objects whose classes need not be importable here.
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "fake_lightning_mod.py").write_text("class ModelCheckpoint:\n    def __init__(self):\n        self.best = 1\n")
    monkeypatch.syspath_prepend(str(mod_dir))
    import fake_lightning_mod
    vq = _tiny_vq(1)
    sd = {**vq.state_dict(), "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4)}
    folder = tmp_path / "VQGAN"
    (folder / "ckpts").mkdir(parents=True)
    torch.save({"state_dict": sd, "callbacks": {fake_lightning_mod.ModelCheckpoint: fake_lightning_mod.ModelCheckpoint()},
                "global_step": 7}, str(folder / "ckpts" / "last.ckpt"))
    del sys.modules["fake_lightning_mod"]
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(mod_dir)])
    loaded = checkpoints.load_autoencoder(str(folder))
    _same_outputs(vq, loaded, torch.rand(1, 3, 64, 64) * 2 - 1)
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        checkpoints.load_autoencoder(str(tmp_path / "mods"))


def test_own_format_and_prefixed_state_dicts():
    vq = _tiny_vq(2)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    own = {"model": vq.state_dict(), "config": vq.config}
    _same_outputs(vq, checkpoints.load_vqgan_from_state_dict(own, "own"), x)
    ldm = {"state_dict": {f"first_stage_model.{k}": v for k, v in vq.state_dict().items()}}
    _same_outputs(vq, checkpoints.load_vqgan_from_state_dict(ldm, "ldm"), x)


def test_load_errors():
    sd = _tiny_vq().state_dict()
    with pytest.raises(ValueError, match=r"256 codes.*n_embed=512"):
        checkpoints.load_vqgan_from_state_dict(sd, "tiny.ckpt", config=dict(models.VQGAN_models["tiny"]().config, n_embed=512))
    with pytest.raises(ValueError, match=r"16-dim.*embed_dim=32"):
        checkpoints.load_vqgan_from_state_dict(sd, "tiny.ckpt", config=dict(models.VQGAN_models["tiny"]().config, embed_dim=32))
    del sd["decoder.conv_out.bias"]
    with pytest.raises(KeyError, match="decoder.conv_out.bias"):
        checkpoints.load_vqgan_from_state_dict(sd, "tiny.ckpt", config="tiny")
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        checkpoints.infer_vqgan_config({"encoder.conv_in.weight": torch.zeros(16, 3, 3, 3)})
    with pytest.raises(FileNotFoundError):
        checkpoints.load_autoencoder("/nonexistent/last.ckpt")


# ----------------------------------------------------------------------------- fine-tuning loss

def test_vq_generator_loss_closed_form():
    # x_hat = s * base with a scalar "last layer" s, LPIPS a constant per image, D the identity: every term,
    # and the adaptive weight's two gradients, have closed forms.
    torch.manual_seed(0)
    x, base = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    s = nn.Parameter(torch.tensor(0.7))
    x_hat = s * base
    p = torch.tensor([0.3, 0.5])
    codebook_loss = torch.tensor(0.125)
    loss, parts = models.vq_generator_loss(x, x_hat, codebook_loss, lambda a, b: p, lambda im: im, s)
    with torch.no_grad():
        r = x - 0.7 * base
        nll = r.abs().mean() + p.mean()  # |x - x_hat| and LPIPS averaged, LPIPS broadcast over pixels
        g = -(0.7 * base).mean()
        dnll = (-torch.sign(r) * base).mean()  # d nll / d s
        dg = -base.mean()  # d g / d s
        d_weight = 0.8 * dnll.abs() / (dg.abs() + 1e-4)
        expected = nll + d_weight * g + 1.0 * codebook_loss
    assert parts["d_weight"].item() == pytest.approx(d_weight.item(), rel=1e-5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    off, parts0 = models.vq_generator_loss(x, x_hat, codebook_loss, lambda a, b: p, lambda im: im, s, disc_factor=0.0)
    assert off.item() == pytest.approx((nll + codebook_loss).item(), rel=1e-6) and parts0["d_weight"] == 0
