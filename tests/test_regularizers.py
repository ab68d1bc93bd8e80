"""The latent regularisers beside EQ-VAE (--regularizer scale-eq / vf / none) and the metrics each paper argues with
(block DCT spectrum, alignment with DINOv2): hand computations on toys, and whole runs."""
import itertools
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoints
import evaluate
import finetune_eqvae as fe
import models
import train_utils as tu
from helpers import run_script
from test_finetune import TINY, PointwiseAE, final_checkpoint, run_args

pytestmark = pytest.mark.usefixtures("one_thread")
ZERO = lambda shape: torch.zeros(shape)  # posterior noise 0: the latent is the posterior mean


#################################################################################
#                         scale-eq (arXiv 2502.14831)                           #
#################################################################################

def test_scale_eq_loss_by_hand():
    """L_SE = sum |down_s x - D(down_s E(x))| / B (+ LPIPS broadcast over the pixels), s from {2, 4}, written out
    with F.interpolate on a non-equivariant toy autoencoder."""
    ae, x = PointwiseAE(bias_map=True), torch.rand(2, 3, 16, 16) * 2 - 1
    model = fe.TauAutoencoder(ae)
    seen = set()
    for seed in range(6):
        s = random.Random(seed).choice([2, 4])
        seen.add(s)
        down = lambda t: F.interpolate(t, size=(16 // s, 16 // s), mode="bilinear", align_corners=False)
        z = ae.encode(x).mean
        want = (ae.decode(down(z)) - down(x)).abs().sum() / 2
        got = fe.scale_eq_loss(model, x, random.Random(seed), perceptual_weight=0.0, sample_noise=ZERO)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # With LPIPS: a per-image perceptual distance counted at every pixel of the small target, as the main branch.
        lp = torch.tensor([0.25, 0.5])
        got = fe.scale_eq_loss(model, x, random.Random(seed), lpips=lambda a, b: lp, perceptual_weight=1.0,
                               sample_noise=ZERO)
        torch.testing.assert_close(got, want + (lp * 3 * (16 // s) ** 2).sum() / 2, rtol=1e-5, atol=1e-4)
    assert seen == {2, 4}
    # At 2x the bilinear downscale is exactly the 2 x 2 average (no aliasing where the paper's factor 2 applies).
    torch.testing.assert_close(F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False),
                               F.avg_pool2d(x, 2), rtol=0, atol=1e-6)


def test_scale_eq_is_zero_for_a_scale_equivariant_autoencoder():
    """A pointwise linear autoencoder commutes with every resize: D(down E(x)) == down x, so L_SE = 0; a fixed
    position-dependent latent offset breaks it."""
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    for seed in range(4):
        good = fe.scale_eq_loss(fe.TauAutoencoder(PointwiseAE()), x, random.Random(seed), perceptual_weight=0.0,
                                sample_noise=ZERO)
        bad = fe.scale_eq_loss(fe.TauAutoencoder(PointwiseAE(True)), x, random.Random(seed), perceptual_weight=0.0,
                               sample_noise=ZERO)
        assert good.abs() < 1e-4 and bad > 1.0


#################################################################################
#                           vf (VA-VAE, arXiv 2501.01423)                       #
#################################################################################

def vf_by_loops(p, f, m1=0.5, m2=0.25):
    """VA-VAE's margin losses with python loops over images and positions: p (B, D, h, w), f (B, N, D)."""
    B, D = p.shape[:2]
    p = p.reshape(B, D, -1).transpose(1, 2)
    cos = lambda a, b: float(a @ b) / (float(a.norm()) * float(b.norm()))
    mcos, mdms, N = 0.0, 0.0, p.shape[1]
    for b in range(B):
        for i in range(N):
            mcos += max(0.0, 1 - m1 - cos(p[b, i], f[b, i]))
            for j in range(N):
                mdms += max(0.0, abs(cos(p[b, i], p[b, j]) - cos(f[b, i], f[b, j])) - m2)
    return mcos / (B * N), mdms / (B * N * N)


def test_vf_margin_losses_by_hand():
    g = torch.Generator().manual_seed(0)
    p, f = torch.randn(2, 6, 2, 3, generator=g), torch.randn(2, 6, 6, generator=g)
    mcos, mdms = fe.vf_losses(p, f)
    want = vf_by_loops(p, f)
    assert mcos > 0.1 and mdms > 0.05
    assert math.isclose(float(mcos), want[0], rel_tol=1e-5) and math.isclose(float(mdms), want[1], rel_tol=1e-5)


def test_vf_margins_leave_the_loss_at_zero_inside():
    """Every cosine above 1 - m1 and every pair's cosine difference below m2: loss 0 and no gradient; one step
    outside: a positive loss with a gradient."""
    g = torch.Generator().manual_seed(1)
    f = torch.randn(1, 4, 8, generator=g)
    p = (f + 0.15 * torch.randn(f.shape, generator=g)).transpose(1, 2).reshape(1, 8, 2, 2).requires_grad_(True)
    tokens = p.detach().reshape(1, 8, 4).transpose(1, 2)
    cos = F.cosine_similarity(tokens, f, dim=-1)
    gram = lambda t: F.normalize(t, dim=-1) @ F.normalize(t, dim=-1).transpose(1, 2)
    assert cos.min() > 0.5 + 0.05 and (gram(tokens) - gram(f)).abs().max() < 0.25 - 0.02  # inside, independently
    mcos, mdms = fe.vf_losses(p, f)
    (mcos + mdms).backward()
    assert mcos == 0 and mdms == 0 and p.grad.abs().max() == 0
    far = torch.randn(1, 8, 2, 2, generator=g, requires_grad=True)
    mcos, mdms = fe.vf_losses(far, f)
    (mcos + mdms).backward()
    assert mcos > 0 and mdms > 0 and far.grad.abs().max() > 0


def test_vf_loss_adaptive_weight_and_feature_grid():
    """The VF term = 0.1 x clamp(||grad nll|| / (||grad vf|| + 1e-4), 0, 1e8) x (mcos + mdms) at the encoder's last
    layer (not the decoder's, where the GAN's weight is taken), on DINOv2 tokens of the image resized to 14 px per
    latent position."""
    torch.manual_seed(0)
    vae, encoder = models.KLVAE(**json.loads(TINY)), checkpoints.load_dinov2("dinov2_tiny")
    proj = torch.nn.Conv2d(4, encoder.embed_dim, 1, bias=False)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    seen = []
    real = encoder.forward_features
    encoder.forward_features = lambda inp: seen.append(inp.shape) or real(inp)
    nll = (vae.decode(vae.encode(x).mean) - x).abs().sum() / 2
    term, parts = fe.vf_loss(proj, encoder, vae, x, nll, weight=0.1, sample_noise=ZERO)
    assert seen == [torch.Size([2, 3, 112, 112])]  # 8 x 8 latent -> 8 x 8 tokens of 14 px

    z = vae.encode(x).mean
    f = real(models.dinov2_preprocess(x, 112))["x_norm_patchtokens"]
    mcos, mdms = vf_by_loops(proj(z).detach(), f.detach())
    layer = vae.encoder.conv_out.weight
    g_nll = torch.autograd.grad(nll, layer, retain_graph=True)[0]
    vf = sum(fe.vf_losses(proj(z), f))
    g_vf = torch.autograd.grad(vf, layer)[0]
    w = 0.1 * min(1e8, float(g_nll.norm()) / (float(g_vf.norm()) + 1e-4))
    assert math.isclose(float(parts["vf_weight"]), w, rel_tol=1e-4)
    assert math.isclose(float(term.detach()), w * (mcos + mdms), rel_tol=1e-4)
    term.backward()
    assert proj.weight.grad.abs().max() > 0 and layer.grad.abs().max() > 0  # the projection and the encoder learn


#################################################################################
#                                  Whole runs                                   #
#################################################################################

def test_regularizer_options_and_run_names():
    base = ["--preset", "tiny"]
    a = fe.parse_args(base)
    assert (a.regularizer, a.eq_prob, a.lowres_prob) == ("eq", 0.5, 0.25) and fe.run_name(a).startswith("eqvae-")
    for reg, weight, prefix in (("scale-eq", 1.0, "scale-eq-"), ("vf", 0.1, "vf-"), ("none", 0.0, "plain-")):
        a = fe.parse_args(base + ["--regularizer", reg])
        # The same plain objective for all three (no equivariance branch, the same low-res prior preservation):
        assert (a.eq_prob, a.lowres_prob, a.reg_weight) == (0.0, 0.25, weight) and fe.run_name(a).startswith(prefix)
    assert fe.parse_args(base + ["--regularizer", "scale-eq", "--reg-weight", "0.5"]).reg_weight == 0.5
    with pytest.raises(SystemExit) as e:
        fe.parse_args(base + ["--regularizer", "vf", "--eq-prob", "0.5"])
    assert e.value.code == 2


@pytest.mark.parametrize("reg", ["scale-eq", "vf"])
def test_regularizer_run_resumes_exactly(tmp_path, reg):
    """2 steps, killed, resumed to 4 == 4 straight steps: the VF projection and its Adam are in the checkpoint."""
    extra = ["--regularizer", reg, "--vf-model", "dinov2_tiny"]
    fe.main(fe.parse_args(run_args(tmp_path / "straight", "--max-steps", "4", *extra)))
    fe.main(fe.parse_args(run_args(tmp_path / "resumed", "--max-steps", "2", *extra)))
    fe.main(fe.parse_args(run_args(tmp_path / "resumed", "--max-steps", "4", "--resume", "auto", *extra)))
    a, b = final_checkpoint(tmp_path / "straight"), final_checkpoint(tmp_path / "resumed")
    parts = ("model", "disc") + (("vf_proj",) if reg == "vf" else ())
    for part in parts:
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs after resume"
    rows = [json.loads(line) for line in open(tmp_path / "straight" / "run" / "metrics.jsonl") if '"loss"' in line]
    key = "se" if reg == "scale-eq" else "vf_weight"
    assert len(rows) == 4 and all(r[key] > 0 and r["eq_share"] == 0 for r in rows)
    # Resuming under another regulariser is refused, naming the option.
    other = "vf" if reg == "scale-eq" else "scale-eq"
    with pytest.raises(ValueError, match=f"regularizer: checkpoint '{reg}' vs now '{other}'"):
        fe.main(fe.parse_args(run_args(tmp_path / "resumed", "--max-steps", "6", "--resume", "auto",
                                       "--regularizer", other)))


def test_scale_eq_two_gloo_processes_equal_one_process(tmp_path):
    """The SE pass goes through the unwrapped autoencoder; DDP still all-reduces its gradients: 2 ranks x 2 == 1 x 4
    (the setting of test_two_gloo_processes_equal_one_process: no GAN, shared posterior noise)."""
    extra = ["--max-steps", "2", "--disc-weight", "0", "--shared-noise", "--regularizer", "scale-eq"]
    run_script(["finetune_eqvae.py", *run_args(tmp_path / "two", *extra)], nproc=2)
    fe.main(fe.parse_args(run_args(tmp_path / "one", *extra)))
    two, one = final_checkpoint(tmp_path / "two"), final_checkpoint(tmp_path / "one")
    names = [n for n, _ in models.KLVAE(**json.loads(TINY)).named_parameters()]
    for i, name in enumerate(names):
        informative = one["opt"]["state"][i]["exp_avg_sq"].sqrt() > 1e-4  # see test_finetune: rounding-only grads
        torch.testing.assert_close(two["model"][name][informative], one["model"][name][informative], rtol=1e-4,
                                   atol=1e-6, msg=f"{name} differs")


#################################################################################
#                  The metrics: block DCT spectrum, DINOv2 alignment            #
#################################################################################

def test_block_dct_spectrum_against_scipy():
    """Orthonormal DCT-II per 8 x 8 tile (scipy.fft.dctn), mean |X_uv| / mean |X_00|, in JPEG zigzag order."""
    from scipy.fft import dctn
    x = torch.rand(3, 2, 16, 24)
    tiles = x.double().numpy().reshape(3, 2, 2, 8, 3, 8).transpose(0, 1, 2, 4, 3, 5)
    amp = np.abs(dctn(tiles, axes=(-2, -1), norm="ortho")).mean(axis=(0, 1, 2, 3))
    zigzag = [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (0, 3), (1, 2), (2, 1), (3, 0)]  # JPEG's first ten
    got = models.block_dct_spectrum(x)
    np.testing.assert_allclose(got[:10], [amp[u, v] / amp[0, 0] for u, v in zigzag], rtol=1e-10)
    assert len(got) == 64 and math.isclose(got[-1], amp[7, 7] / amp[0, 0], rel_tol=1e-10)
    # A smooth ramp puts its amplitude low; white noise spreads it (the paper's RGB vs latent contrast).
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(4, 1, 16, 16)
    assert models.high_frequency_share(models.block_dct_spectrum(ramp)) < 0.01
    assert models.high_frequency_share(models.block_dct_spectrum(torch.randn(4, 1, 16, 16))) > 0.4


def test_linear_cka_known_values():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 4, generator=g)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    assert math.isclose(models.linear_cka(a, 3 * a @ q + 1), 1.0, rel_tol=1e-9)  # orthogonal map, scale, shift
    assert models.linear_cka(a, torch.randn(500, 6, generator=g)) < 0.05          # independent
    b = torch.cat([a[:, :2], torch.randn(500, 2, generator=g)], 1)                  # half shared: known value
    # CKA with isotropic unit-variance columns: ||b^T a||^2 = 2 n^2, ||a^T a|| = ||b^T b|| = 2 n -> 0.5.
    assert abs(models.linear_cka(a, b) - 0.5) < 0.05
