"""SiT/REPA: paths against closed forms, samplers on a Gaussian whose exact flow is known, guidance interval,
REPA's loss, DINOv2 and SiT layouts against the official ones, and train_sit.py (torchrun, resume)."""
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch

import checkpoints
import models
from helpers import assert_ema_starts_at_rank0_model, perturb, run_script, run_with_ema_probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, ROOT)
import train_sit  # noqa: E402  (for its projection_loss)




#################################################################################
#                                 Interpolant paths                             #
#################################################################################

def closed_form(path, s):
    """(alpha, sigma) in SiT time s (data at s = 1), written from the papers' formulas."""
    if path == "Linear":
        return s, 1 - s
    if path == "GVP":
        return np.sin(np.pi * s / 2), np.cos(np.pi * s / 2)
    r = 1 - s  # VP: alpha = exp(-1/2 int_0^r beta), beta(r) = 0.1 + 19.9 r
    alpha = np.exp(-0.5 * (0.1 * r + 0.5 * 19.9 * r ** 2))
    return alpha, np.sqrt(1 - alpha ** 2)


@pytest.mark.parametrize("clock", ["sit", "repa"])
@pytest.mark.parametrize("path", ["Linear", "GVP", "VP"])
def test_path_coefficients_and_derivatives(path, clock):
    tr = models.Transport(path, clock=clock)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    alpha, d_alpha, sigma, d_sigma = tr.coefficients(t)
    s = t.numpy() if clock == "sit" else 1 - t.numpy()  # REPA: t = 0 is data
    a_ref, s_ref = closed_form(path, s)
    np.testing.assert_allclose(alpha.numpy(), a_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), s_ref, rtol=1e-12, atol=1e-12)
    # Derivatives in this clock, against central differences of the closed forms.
    h = 1e-6
    sp, sm = (s + h, s - h) if clock == "sit" else (s - h, s + h)
    np.testing.assert_allclose(d_alpha.numpy(), (closed_form(path, sp)[0] - closed_form(path, sm)[0]) / (2 * h),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(d_sigma.numpy(), (closed_form(path, sp)[1] - closed_form(path, sm)[1]) / (2 * h),
                               rtol=1e-6, atol=1e-7)
    if clock == "repa" and path == "Linear":  # REPA loss.py: alpha = 1 - t, sigma = t, alpha' = -1, sigma' = 1
        torch.testing.assert_close(alpha, 1 - t)
        torch.testing.assert_close(d_sigma, torch.ones_like(t))


def test_intervals_follow_sit_and_repa():
    assert models.Transport().interval() == (0.0, 1.0)                          # velocity: the whole path
    assert models.Transport(prediction="noise").interval(train=True) == (1e-3, 1 - 1e-3)
    assert models.Transport("VP").interval(train=True) == (0.0, 1 - 1e-5)
    assert models.Transport().interval(sde=True, last_step_size=0.04) == (0.0, 0.96)
    assert models.Transport(clock="repa").interval(sde=True, last_step_size=0.04) == (1.0, 0.04)  # REPA's grid ends
    with pytest.raises(ValueError, match="sample_eps"):  # SBDM's 1/t at t = 0 (NaN samples in SiT's own code)
        models.Transport().sample_sde(lambda x, t, y: x, torch.zeros(1, 1), None, diffusion_form="SBDM")


@pytest.mark.parametrize("clock", ["sit", "repa"])
def test_velocity_target_and_loss(clock):
    """x_t and the regression target, recomputed from the same random draws: SiT x1 - x0, REPA eps - x."""
    seen = {}

    def model(xt, t, y):
        seen.update(xt=xt, t=t)
        return torch.zeros_like(xt)

    x1 = torch.randn(5, 4, 2, 2)
    torch.manual_seed(3)
    terms = models.Transport(clock=clock).training_losses(model, x1, dict(y=None))
    torch.manual_seed(3)
    t = torch.rand(5).view(-1, 1, 1, 1)  # drawn first, then the noise
    x0 = torch.randn_like(x1)
    if clock == "sit":
        xt, target = t * x1 + (1 - t) * x0, x1 - x0
    else:
        xt, target = (1 - t) * x1 + t * x0, x0 - x1
    torch.testing.assert_close(seen["t"], t.flatten())
    torch.testing.assert_close(seen["xt"], xt)
    torch.testing.assert_close(terms["loss"], (target ** 2).mean(dim=(1, 2, 3)))


def test_logit_normal_times():
    torch.manual_seed(0)
    t = models.Transport(time_sampling="logit_normal", clock="repa").sample_time(20000, "cpu")
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03  # REPA: log(t / (1 - t)) ~ N(0, 1)


#################################################################################
#             Samplers on a Gaussian toy with the exact velocity field          #
#################################################################################

M, S = 1.5, 0.5  # data N(M, S^2); noise N(0, 1); Linear path


def sit_velocity(x, s):
    """Exact E[x1 - x0 | x_s = x] for x_s = s x1 + (1 - s) x0 (jointly Gaussian): the flow maps z to M + S z."""
    var = s ** 2 * S ** 2 + (1 - s) ** 2
    return M + (s * S ** 2 - (1 - s)) / var * (x - s * M)


def sit_score(x, s):
    """grad log N(x; s M, s^2 S^2 + (1 - s)^2)."""
    return -(x - s * M) / (s ** 2 * S ** 2 + (1 - s) ** 2)


class ToyModel:
    """The exact velocity in the model's own clock, as a stand-in network; records the calls it gets."""

    def __init__(self, clock):
        self.clock, self.calls = clock, []

    def __call__(self, x, t, y):
        self.calls.append((float(t[0]), x.shape[0]))
        tt = t.view(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        return sit_velocity(x, tt) if self.clock == "sit" else -sit_velocity(x, 1 - tt)


@pytest.mark.parametrize("family", ["sit", "repa"])
@pytest.mark.parametrize("sampler, steps, tol", [("euler", 100, 6e-2), ("heun", 50, 2e-3), ("dopri5", None, 5e-2)])
def test_ode_samplers_land_on_the_gaussian(family, sampler, steps, tol):
    torch.manual_seed(0)
    z = torch.randn(4000, 1, 1, 1)
    y = torch.zeros(4000, dtype=torch.long)
    x = models.sample_transport(ToyModel(family), z, y, family=family, mode="ode", sampler=sampler, steps=steps,
                                cfg_scale=1.0)
    assert (x - (M + S * z)).abs().max() < tol  # the exact flow map (torchdiffeq's dopri5 errs 0.036 here too)
    assert abs(x.mean() - M) < 0.05 and abs(x.std() - S) < 0.05
    if sampler == "dopri5":  # tighter tolerances converge to the exact map
        x = models.sample_transport(ToyModel(family), z, y, family=family, mode="ode", sampler=sampler,
                                    cfg_scale=1.0, rtol=1e-7, atol=1e-9)
        assert (x.double() - (M + S * z.double())).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["sit", "repa"])
def test_sde_sampler_lands_on_the_gaussian(family):
    torch.manual_seed(0)
    z = torch.randn(4000, 1, 1, 1)
    x = models.sample_transport(ToyModel(family), z, torch.zeros(4000, dtype=torch.long), family=family, mode="sde",
                                steps=100, cfg_scale=1.0, generator=torch.Generator().manual_seed(1))
    assert abs(x.mean() - M) < 0.05 and abs(x.std() - S) < 0.05


@pytest.mark.parametrize("family", ["sit", "repa"])
def test_sde_steps_and_noise_free_last_step_by_hand(family):
    """Three grid points: two Euler-Maruyama steps with w = sigma, then the mean step (SiT "Mean", REPA's last)."""
    z = torch.randn(6, 1, 2, 2, dtype=torch.float64)
    y = torch.zeros(6, dtype=torch.long)
    out = models.sample_transport(ToyModel(family), z, y, family=family, mode="sde", steps=3, cfg_scale=1.0,
                                  generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x = z.clone()
    if family == "sit":  # SiT: t = linspace(0, 0.96, 3); dx = (v + sigma score) dt + sqrt(2 sigma) dW
        for t, dt in [(0.0, 0.48), (0.48, 0.48)]:
            noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
            x = x + (sit_velocity(x, t) + (1 - t) * sit_score(x, t)) * dt + math.sqrt(2 * (1 - t) * dt) * noise
        x = x + (sit_velocity(x, 0.96) + 0.04 * sit_score(x, 0.96)) * 0.04
    else:  # REPA: t = linspace(1, 0.04, 3) then 0; d = v - 1/2 (2t) score, x += d dt + sqrt(2t) sqrt(|dt|) eps
        for t, dt in [(1.0, -0.48), (0.52, -0.48)]:
            noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
            d = -sit_velocity(x, 1 - t) - t * sit_score(x, 1 - t)
            x = x + d * dt + math.sqrt(2 * t) * math.sqrt(abs(dt)) * noise
        x = x + (-sit_velocity(x, 0.96) - 0.04 * sit_score(x, 0.96)) * -0.04
    torch.testing.assert_close(out, x, rtol=1e-10, atol=1e-10)


class ConstantModel:
    """Velocity 1 for real labels and 0 for the null label, so guided steps move by cfg_scale; records calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((float(t[0]), x.shape[0]))
        return (y != 1000).to(x.dtype).view(-1, 1, 1, 1).expand_as(x).clone(), []  # REPA-style (out, zs)


def test_guidance_interval_and_cfg_channels():
    z, y = torch.zeros(2, 4, 1, 1), torch.tensor([3, 4])
    # REPA's ODE on linspace(1, 0, 11): guided (batch doubled) exactly while t_cur <= 0.65.
    m = ConstantModel()
    x = models.sample_transport(m, z, y, family="repa", mode="ode", sampler="euler", steps=10, cfg_scale=2.0,
                                guidance_high=0.65)
    assert [(round(t, 6), n) for t, n in m.calls] == [(1.0, 2), (0.9, 2), (0.8, 2), (0.7, 2)] + \
        [(round(0.6 - 0.1 * i, 6), 4) for i in range(6)]
    torch.testing.assert_close(x, torch.full_like(z, -0.1 * (4 * 1.0 + 6 * 2.0)))  # all 4 channels guided (REPA)
    # Heun: REPA skips the corrector on the last step (19 evaluations for 10 steps, the corrector at t_next but
    # guided by t_cur's interval); SiT's torchdiffeq Heun corrects every step (20).
    m = ConstantModel()
    models.sample_transport(m, z, y, family="repa", mode="ode", sampler="heun", steps=10, cfg_scale=2.0,
                            guidance_high=0.65)
    assert len(m.calls) == 19 and (round(m.calls[7][0], 6), m.calls[7][1]) == (0.6, 2)  # corrector of 0.7 -> 0.6
    m = ConstantModel()
    models.sample_transport(m, z, y, family="sit", mode="ode", sampler="heun", steps=10, cfg_scale=1.0)
    assert len(m.calls) == 20
    # SiT: guidance everywhere, on the first three channels only.
    x = models.sample_transport(ConstantModel(), z, y, family="sit", mode="ode", sampler="euler", steps=4,
                                cfg_scale=2.0)
    torch.testing.assert_close(x[:, :, 0, 0], torch.tensor([[2.0, 2.0, 2.0, 1.0]] * 2))
    # REPA's published SDE setting: guidance interval [0, 0.7] on its 250-point grid, last step included.
    m = ConstantModel()
    models.sample_transport(m, z, y, family="repa")
    grid = np.linspace(1, 0.04, 250)
    assert len(m.calls) == 250
    assert [n for _, n in m.calls] == [4 if t <= 0.7 else 2 for t in grid]
    assert sum(n == 4 for _, n in m.calls) == int((grid <= 0.7).sum()) == 172


def test_projection_loss():
    torch.manual_seed(0)
    z = torch.randn(3, 16, 8)
    assert torch.allclose(train_sit.projection_loss(z, z), torch.tensor(-1.0))
    assert torch.allclose(train_sit.projection_loss(2.5 * z, z), torch.tensor(-1.0))  # cosine: scale-free
    assert torch.allclose(train_sit.projection_loss(-z, z), torch.tensor(1.0))
    e = torch.eye(8)
    assert torch.allclose(train_sit.projection_loss(e[None, :4], e[None, 4:]), torch.tensor(0.0))
    # REPA loss.py's loops: sum over samples of the token-mean of -<z/|z|, z'/|z'|>, divided by the batch size.
    w = torch.randn(3, 16, 8)
    ref = sum((-(F_normalize(z[j]) * F_normalize(w[j])).sum(-1)).mean() for j in range(3)) / 3
    torch.testing.assert_close(train_sit.projection_loss(w, z), ref)


def F_normalize(v):
    return v / v.norm(dim=-1, keepdim=True)


#################################################################################
#                              Layouts and networks                             #
#################################################################################

@pytest.mark.parametrize("fixture, kwargs", [
    ("sit_xl_2_256.json", {}),
    ("repa_sit_xl_2_256.json", dict(encoder_depth=8, z_dims=[768], projector_dim=2048)),
])
def test_sit_and_repa_layouts(fixture, kwargs):
    with open(os.path.join(FIXTURES, fixture)) as f:
        ref = json.load(f)
    with torch.device("meta"):
        model = models.SiT_models["SiT-XL/2"](**kwargs)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["shapes"]
    assert model.learn_sigma == (not kwargs)  # REPA: 4 output channels
    assert len(models.SiT_models) == 18
    with pytest.raises(ValueError, match="SiT-XL/2"):
        models.build(models.SiT_models, "SiT-M/2")


def test_sit_forward_keeps_first_half_and_rebuilds_from_state_dict():
    torch.manual_seed(0)
    sit = models.SiT_models["SiT-T/2"](input_size=8, num_classes=10).eval()
    perturb(sit, 0.05)
    dit = models.DiT_models["DiT-T/2"](input_size=8, num_classes=10).eval()
    dit.load_state_dict(sit.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    torch.testing.assert_close(sit(x, t, y), dit(x, t, y)[:, :4])
    again = checkpoints.sit_from_state_dict(sit.state_dict()).eval()
    torch.testing.assert_close(again(x, t, y), sit(x, t, y))
    repa = models.SiT_models["SiT-T/2"](input_size=8, num_classes=10, encoder_depth=2, z_dims=[64], projector_dim=32)
    back = checkpoints.sit_from_state_dict(repa.state_dict(), encoder_depth=2)
    assert not back.learn_sigma and back.z_dims == [64] and back.encoder_depth == 2


DINOV2_PARAMS = {"dinov2_vits14": 22_056_576, "dinov2_vitl14": 304_368_640, "dinov2_vitg14": 1_136_480_768}


def test_dinov2_layouts():
    with open(os.path.join(FIXTURES, "dinov2_vitb14.json")) as f:
        ref = json.load(f)
    with torch.device("meta"):
        m = models.DINOv2_models["dinov2_vitb14"]()
    assert {k: list(v.shape) for k, v in m.state_dict().items()} == ref["shapes"]
    for name, n in DINOV2_PARAMS.items():  # counted on facebookresearch/dinov2's hub models
        with torch.device("meta"):
            m = models.DINOv2_models[name]()
        assert sum(v.numel() for v in m.state_dict().values()) == n, name
    assert tuple(m.state_dict()["blocks.0.mlp.w12.weight"].shape) == (8192, 1536)  # ViT-g: SwiGLU, hidden 4096
    with pytest.raises(ValueError, match="dinov2_vitb14"):
        checkpoints.load_dinov2("dinov2_vitx14")


def keys_bicubic_1d(values, n_out, scale):
    """PyTorch/OpenCV bicubic (Keys, a = -0.75) along the last axis, no antialias: source = (dst + 0.5) * scale - 0.5,
    neighbours clamped at the borders. Written out to check the resampling independently."""
    a, n_in = -0.75, values.shape[-1]

    def w(d):
        d = abs(d)
        return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1 if d <= 1 else a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a

    out = np.zeros(values.shape[:-1] + (n_out,))
    for j in range(n_out):
        src = (j + 0.5) * scale - 0.5
        i0 = math.floor(src)
        for k in range(i0 - 1, i0 + 3):
            out[..., j] += w(src - k) * values[..., min(max(k, 0), n_in - 1)]
    return out


@pytest.mark.parametrize("mode", ["dinov2", "repa"])
def test_dinov2_position_grid_resampling(mode):
    torch.manual_seed(0)
    m = models.DINOv2(embed_dim=3, depth=0, num_heads=1, pos_embed_resample=mode)
    assert m.interpolate_pos_encoding(37, 37) is m.pos_embed  # 518 px: used as stored
    pe = m.interpolate_pos_encoding(16, 16)
    torch.testing.assert_close(pe[0, 0], m.pos_embed[0, 0])  # class token untouched
    grid = pe[0, 1:].reshape(16, 16, 3).detach().double().numpy()
    stored = m.pos_embed[0, 1:].reshape(37, 37, 3).detach().double().numpy()
    if mode == "dinov2":
        # The official kludge: scale factor (16 + 0.1) / 37 handed to F.interpolate, so the source coordinate is
        # (dst + 0.5) * 37 / 16.1 - 0.5, not (dst + 0.5) * 37 / 16 - 0.5.
        ref = keys_bicubic_1d(stored.transpose(2, 0, 1), 16, 37 / 16.1)            # along columns: (3, 37, 16)
        ref = keys_bicubic_1d(ref.transpose(0, 2, 1), 16, 37 / 16.1).transpose(2, 1, 0)  # then rows -> (16, 16, 3)
        np.testing.assert_allclose(grid, ref, atol=1e-5)
    else:
        # REPA/timm: antialiased bicubic to exactly 16 x 16: a mirror-symmetric grid stays mirror-symmetric
        # (it would not with the 0.1 offset), and the values are smoothed averages of their neighbourhood.
        sym = torch.from_numpy(stored + stored[::-1] + stored[:, ::-1] + stored[::-1, ::-1]).float()
        with torch.no_grad():
            m.pos_embed[0, 1:] = sym.reshape(-1, 3)
        g = m.interpolate_pos_encoding(16, 16)[0, 1:].reshape(16, 16, 3)
        torch.testing.assert_close(g, g.flip(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(g, g.flip(1), atol=1e-5, rtol=0)
        assert g.std() < 0.6 * sym.std()  # antialiasing low-passes the random grid


def test_dinov2_forward_and_preprocess():
    torch.manual_seed(0)
    m = models.DINOv2_models["dinov2_tiny"]().eval()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    x = models.dinov2_preprocess(images)
    assert x.shape == (2, 3, 56, 56)  # (64 / 16) * 14: one DINOv2 token per SiT/2 token of the 8 x 8 latent
    mean = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1)
    same = models.dinov2_preprocess(torch.full((1, 3, 64, 64), 0.2))  # constants survive bicubic resizing
    torch.testing.assert_close(same, ((0.6 - mean) / std).expand(1, 3, 56, 56))
    out = m.forward_features(x)
    assert out["x_norm_patchtokens"].shape == (2, 16, 64) and out["x_norm_clstoken"].shape == (2, 64)
    torch.testing.assert_close(out["x_norm_patchtokens"], torch.nn.functional.layer_norm(
        out["x_prenorm"][:, 1:], (64,), m.norm.weight, m.norm.bias, eps=1e-6))


#################################################################################
#                       train_sit.py: torchrun and exact resume                 #
#################################################################################

TINY = ["train_sit.py", "--preset", "tiny", "--repa", "--num-images", "32", "--global-batch-size", "8",
        "--log-every", "2", "--ckpt-every", "2", "--exp-name", "SiT-T-2-REPA"]


def test_torchrun_two_processes_repa_with_latent_cache(tmp_path):
    out, ema = run_with_ema_probe(TINY + ["--results-dir", str(tmp_path), "--max-steps", "4", "--num-images", "16",
                                          "--cache-latents", str(tmp_path / "cache"), "--cache-shard-size", "8",
                                          "--cache-batch-size", "8"], tmp_path)
    assert "world_size=2" in out.stdout and "RANDOM-weight stand-in for DINOv2" in out.stdout
    assert_ema_starts_at_rank0_model(ema)
    assert "cached latents + their images for DINOv2" in out.stdout
    rows = [json.loads(line) for line in open(tmp_path / "SiT-T-2-REPA" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(np.isfinite(r["loss"]) and -1 <= r["proj_loss"] <= 1 for r in rows)
    assert all(abs(r["loss"] - (r["denoise_loss"] + 0.5 * r["proj_loss"])) < 1e-5 for r in rows)
    ckpt = torch.load(tmp_path / "SiT-T-2-REPA" / "checkpoints" / "0000004.pt", weights_only=False)
    assert len(ckpt["rng"]) == 2 and "projectors.0.4.weight" in ckpt["ema"]


def test_plain_sit_run(tmp_path):
    out = run_script(["train_sit.py", "--preset", "tiny", "--num-images", "16", "--global-batch-size", "8",
                      "--max-steps", "2", "--log-every", "1", "--results-dir", str(tmp_path), "--exp-name", "SiT-T-2"])
    assert "random flip" in out.stdout and "sit clock" in out.stdout and "DINOv2" not in out.stdout
    ckpt = torch.load(tmp_path / "SiT-T-2" / "checkpoints" / "0000002.pt", weights_only=False)
    assert ckpt["ema"]["final_layer.linear.weight"].shape[0] == 2 * 2 * 8  # learned-sigma head kept, as SiT
    assert not any(k.startswith("projectors") for k in ckpt["ema"])


def test_repa_resume_is_exact(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_script(TINY + ["--results-dir", str(a), "--max-steps", "4"])
    os.makedirs(b / "SiT-T-2-REPA" / "checkpoints")
    shutil.copy(a / "SiT-T-2-REPA" / "checkpoints" / "0000002.pt", b / "SiT-T-2-REPA" / "checkpoints")
    run_script(TINY + ["--results-dir", str(b), "--max-steps", "4", "--resume", "auto"])
    ca = torch.load(a / "SiT-T-2-REPA" / "checkpoints" / "0000004.pt", weights_only=False)
    cb = torch.load(b / "SiT-T-2-REPA" / "checkpoints" / "0000004.pt", weights_only=False)
    for key in ("model", "ema"):
        for name in ca[key]:
            assert torch.equal(ca[key][name], cb[key][name]), f"{key}.{name} differs after resume"
    assert ca["loader"] == cb["loader"]
