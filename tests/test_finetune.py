"""EQ-VAE fine-tuning: the tau sampler and its application, the loss parts, DDP equivalence, exact resume, bad input."""
import json
import math
import os
import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import chi2

import finetune_eqvae as fe
import checkpoints
import models
from helpers import assert_ema_starts_at_rank0_model, run_script, run_with_ema_probe
import train_utils as tu

# The smallest useful KL-VAE: f8 (64 px -> 8 x 8 latents; 64 px keeps the smallest low-res target at 16 px, which
# LPIPS's VGG needs), 8 channels, 8 GroupNorm groups.
TINY = '{"ch": 8, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "resolution": 64, "norm_num_groups": 8}'


def run_args(results_dir, *extra):
    """A few-step CPU run of the real script on 64 px synthetic images (no LPIPS: VGG16 would be 20x the cost;
    the LPIPS term is checked in test_nll_and_kl_are_summed_and_divided_by_batch)."""
    return ["--data", "synthetic", "--resolution", "64", "--num-images", "64", "--init", "none", "--config", TINY,
            "--global-batch-size", "4", "--grad-accum", "2", "--lr", "1e-3", "--disc-ndf", "8", "--perceptual-weight", "0",
            "--num-workers", "0", "--log-every", "1", "--preview-every", "1000", "--ckpt-every", "2",
            "--keep-last", "0", "--results-dir", str(results_dir), "--exp-name", "run", *extra]


# Every test here runs tiny networks in-process: one thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def final_checkpoint(results_dir):
    return tu.load_checkpoint(tu.list_checkpoints(os.path.join(results_dir, "run", "checkpoints"))[-1])


#################################################################################
#                             tau: sampler and application                     #
#################################################################################

def test_sample_tau_official_choices_and_mix():
    """50% eq (24 scales x 3 quarter turns, uniform), 12.5% low-res (24 scales), 37.5% plain, over many draws."""
    rng, n = random.Random(0), 40000
    draws = [fe.sample_tau(rng, (32, 32)) for _ in range(n)]
    branches = Counter(t.branch for t in draws)
    expected = {"eq": 0.5 * n, "lowres": 0.125 * n, "plain": 0.375 * n}
    stat = sum((branches[b] - e) ** 2 / e for b, e in expected.items())
    assert stat < chi2.ppf(0.999, 2), (branches, stat)

    official_scales = {s / 32 for s in range(8, 32)}  # the official list, written out independently
    eq = Counter((t.scale, t.k) for t in draws if t.branch == "eq")
    assert set(eq) == {((s, s), k) for s in official_scales for k in (1, 2, 3)}  # all 72, nothing else
    e = sum(eq.values()) / 72
    assert sum((c - e) ** 2 / e for c in eq.values()) < chi2.ppf(0.999, 71)

    low = Counter(t.scale for t in draws if t.branch == "lowres")
    assert set(low) == {(s, s) for s in official_scales} and all(t.k == 0 for t in draws if t.branch != "eq")
    assert all(t.scale == (1.0, 1.0) for t in draws if t.branch == "plain")


def test_official_scales_at_other_resolutions():
    """The official 24 scales whenever they land on whole latent pixels (latent side a multiple of 32), not a finer
    grid; other latent sides (f16 VQ-GAN at 256 px: 16) use the same range on their own grid."""
    official = [s / 32 for s in range(8, 32)]
    assert fe.latent_scales(32) == official and fe.latent_scales(64) == official  # 256 px and 512 px with f8
    assert fe.latent_scales(16) == [m / 16 for m in range(4, 16)]
    rng = random.Random(0)
    assert {fe.sample_tau(rng, (64, 64), eq_prob=1.0).scale[0] for _ in range(3000)} == set(official)


def test_default_tau_is_the_same_on_every_rank():
    """The official run draws one tau per step for all GPUs (Lightning seeds every process's `random` alike); ours
    too, by default: the per-rank seeds main sets must not change the draws, which still vary per micro-batch."""
    draws = []
    for rank in (0, 1):
        tu.seed_everything(23, rank, 2)  # what main does on each of 2 ranks
        draws.append([fe.sample_tau(fe.tau_rng(23, step, micro, 2), (32, 32))
                      for step in range(50) for micro in (0, 1)])
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 20


def test_sample_tau_variants():
    rng = random.Random(1)
    draw = lambda n=2000, **kw: [fe.sample_tau(rng, (32, 32), eq_prob=1.0, **kw) for _ in range(n)]
    assert all(t.scale == (1.0, 1.0) and t.k in (1, 2, 3) for t in draw(transforms="rot"))
    assert all(t.k == 0 and t.scale[0] == t.scale[1] < 1 for t in draw(transforms="scale"))
    # Table 5's anisotropic scaling alone, and with rotations (the official `anisotropic: True`).
    aniso, aniso_rot = draw(transforms="aniso"), draw(transforms="aniso+rot")
    assert sum(t.scale[0] != t.scale[1] for t in aniso) > 0.9 * len(aniso) and all(t.k == 0 for t in aniso)
    assert sum(t.scale[0] != t.scale[1] for t in aniso_rot) > 0.9 * len(aniso_rot) and all(t.k for t in aniso_rot)
    # The paper's s ~ U(0.25, 1) on the latent grid: every whole latent size in [n/4, n) equally likely, never s = 1
    # (no transformation); at n = 32 it is the official set. Chi-square against the flat distribution.
    for n in (32, 20):
        uni = Counter(fe.sample_tau(rng, (n, n), eq_prob=1.0, transforms="scale", scales="uniform").scale[0]
                      for _ in range(6000))
        want = [m / n for m in range(math.ceil(n / 4), n)]
        assert sorted(uni) == want
        assert chi2.sf(sum((uni[s] - 6000 / len(want)) ** 2 / (6000 / len(want)) for s in want), len(want) - 1) > 1e-3
    assert all(fe.sample_tau(rng, (32, 32), eq_prob=0.0).branch != "eq" for _ in range(200))  # Table 6 control


class PointwiseAE(nn.Module):
    """A linear 1x1 'autoencoder' (3 -> 4 -> 3, f = 1): commutes with any resize and rotation, hence exactly
    equivariant; with `bias_map` a fixed position-dependent latent offset breaks that."""

    def __init__(self, bias_map=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = torch.randn(4, 3, generator=g)
        self.A_pinv = torch.linalg.pinv(self.A)  # left inverse: A_pinv @ A = I
        self.bias_map = bias_map

    def _offset(self, h, w):
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        return (torch.sin(7 * xx) + torch.cos(5 * yy))[None, None] if self.bias_map else 0.0

    def encode(self, x):
        z = torch.einsum("oc,bchw->bohw", self.A, x) + self._offset(*x.shape[-2:])
        return models.DiagonalGaussianDistribution(torch.cat([z, torch.full_like(z, -30.0)], 1))

    def decode(self, z):
        return torch.einsum("co,bohw->bchw", self.A_pinv, z - self._offset(*z.shape[-2:]))


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_latent_and_image_receive_the_same_tau(interp):
    """With an exactly equivariant autoencoder D(tau E(x)) == tau x for every tau; not so for a non-equivariant one."""
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    zero = lambda shape: torch.zeros(shape)
    taus = [fe.Tau("eq", (m / 32, m / 32), k) for m in (8, 13, 31) for k in (1, 2, 3)]
    taus += [fe.Tau("eq", (9 / 32, 20 / 32), 1), fe.Tau("lowres", (12 / 32, 12 / 32)), fe.Tau("plain")]
    good, bad = fe.TauAutoencoder(PointwiseAE(), interp), fe.TauAutoencoder(PointwiseAE(True), interp)
    for tau in taus:
        target, x_hat, _ = good(x, tau, zero)
        h, w = round(32 * tau.scale[0]), round(32 * tau.scale[1])
        assert target.shape[-2:] == ((w, h) if tau.k % 2 else (h, w))
        torch.testing.assert_close(x_hat, target, atol=1e-5, rtol=0)
        # Independent construction of tau x for the equivariance branch: resize, then rot90 over (-1, -2).
        if tau.branch == "eq":
            ref = torch.rot90(F.interpolate(x, size=(h, w), mode=interp, align_corners=False), tau.k, (-1, -2))
            torch.testing.assert_close(target, ref, atol=0, rtol=0)
        target, x_hat, _ = bad(x, tau, zero)
        err = (x_hat - target).abs().max()
        assert err > 1e-2 if tau.branch == "eq" else err < 1e-5  # the plain/low-res paths never move the latent


def test_real_autoencoder_shapes_match_for_every_branch():
    """f = 8 KL-VAE at 32 px (4 x 4 latents): decoded tau E(x) and tau x have the same size for all choices."""
    torch.manual_seed(0)
    model = fe.TauAutoencoder(models.KLVAE(**json.loads(TINY)))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    for tau in [fe.Tau("eq", (m / 4, m / 4), k) for m in (1, 2, 3) for k in (1, 3)] + [fe.Tau("lowres", (0.25, 0.25))]:
        target, x_hat, posterior = model(x, tau)
        assert target.shape == x_hat.shape
        if tau.branch == "eq":
            assert posterior.mean.shape[-2:] == (4, 4)  # KL on the posterior of the untransformed image


def test_equivariance_error_dashboard():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert max(fe.equivariance_errors(PointwiseAE(), x).values()) < 1e-10
    assert min(fe.equivariance_errors(PointwiseAE(True), x).values()) > 1e-3


#################################################################################
#                                   Loss parts                                  #
#################################################################################

def test_adaptive_weight_matches_formula():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(3, 3))
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    nll, g = (W @ x).pow(2).sum(), torch.sin(W @ y).sum()
    # Closed-form gradients: d/dW sum((Wx)^2) = 2 (Wx) x^T, d/dW sum(sin(Wy)) = cos(Wy) y^T.
    g_nll, g_g = 2 * (W @ x) @ x.T, torch.cos(W @ y) @ y.T
    expected = g_nll.norm() / (g_g.norm() + 1e-4)
    torch.testing.assert_close(fe.adaptive_weight(nll, g, W), expected.detach())
    assert fe.adaptive_weight(nll * 1e9, g * 0, W).item() == 1e4  # clamped to [0, 1e4]


def _last_layer_weights(h, target, g_factor, reduce, amp, grad_scale=None):
    """The adaptive weight at a 1-layer 'decoder' conv(h) with a 1-layer 'PatchGAN', under CPU fp16 autocast."""
    torch.manual_seed(0)
    conv, disc = nn.Conv2d(8, 3, 3, padding=1), nn.Conv2d(3, 1, 4, stride=2)
    with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
        x_hat = conv(h)
        g = -disc(x_hat).float().mean() * g_factor
    nll = reduce((x_hat.float() - target).abs())
    return fe.adaptive_weight(nll, g, conv.weight, grad_scale)


def test_adaptive_weight_under_fp16_equals_fp32():
    """fp16: differentiated at the GradScaler's scale and unscaled in fp32, the weight is its fp32 value; unscaled,
    the VQ loss's per-pixel gradients (a mean over 2 x 3 x 128 x 128 values) are fp16-subnormal and the weight is far
    off, and the KL loss's last-layer gradient (a sum over 256 x 256 pixels) overflows fp16 at scale 1, which
    GradScaler answers by lowering its scale (here 1/4). Scaled gradients that still overflow give weight 0 (the
    step is skipped by GradScaler), never inf or NaN."""
    torch.manual_seed(1)
    h, target = torch.randn(2, 8, 128, 128), torch.rand(2, 3, 128, 128) * 2 - 1
    mean = lambda r: r.mean()                                                  # taming's VQ loss
    ref = _last_layer_weights(h, target, 1e-3, mean, amp=False)
    scaled = _last_layer_weights(h, target, 1e-3, mean, amp=True, grad_scale=torch.tensor(2.0 ** 16))
    unscaled = _last_layer_weights(h, target, 1e-3, mean, amp=True)
    assert 10 < ref < 1e4                                                     # not clamped
    assert abs(scaled / ref - 1) < 2e-3 and abs(unscaled / ref - 1) > 0.1
    assert _last_layer_weights(h, target, 1e-3, mean, amp=True, grad_scale=torch.tensor(2.0 ** 60)) == 0

    h, target = torch.rand(1, 8, 256, 256) + 1.5, torch.full((1, 3, 256, 256), -10.0)
    total = lambda r: r.sum() / 1                                              # LDM's KL loss: sum / B
    ref = _last_layer_weights(h, target, 1e3, total, amp=False)
    scaled = _last_layer_weights(h, target, 1e3, total, amp=True, grad_scale=torch.tensor(0.25))
    assert 10 < ref < 1e4 and abs(scaled / ref - 1) < 2e-3
    assert _last_layer_weights(h, target, 1e3, total, amp=True, grad_scale=torch.tensor(1.0)) == 0  # overflow


def test_hinge_loss_known_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    expected = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert math.isclose(models.hinge_d_loss(real, fake).item(), expected, rel_tol=1e-6)
    # The training step's discriminator_loss: two PatchGAN passes (real = the transformed target, fake = detached x_hat).
    disc = lambda img: img.mean(dim=(1, 2, 3))  # a "PatchGAN" whose logits are the image means
    target, x_hat = real.view(3, 1, 1, 1).expand(3, 3, 24, 24), fake.view(3, 1, 1, 1).expand(3, 3, 24, 24)
    d, lr_, lf_ = fe.discriminator_loss(disc, target, x_hat.requires_grad_())
    assert math.isclose(d.item(), expected, rel_tol=1e-6) and math.isclose(lr_.item(), 0.5, rel_tol=1e-6)
    assert not d.requires_grad  # the reconstruction is detached: the discriminator loss never reaches the autoencoder


class FixedOutputs(nn.Module):
    """Stands in for TauAutoencoder: returns a fixed target, reconstruction and posterior."""
    is_vq = False

    def __init__(self, target, x_hat, posterior):
        super().__init__()
        self.out = (target, x_hat, posterior)

    def forward(self, x, tau, sample_noise=None):
        return self.out


def test_nll_and_kl_are_summed_and_divided_by_batch():
    # B = 2 images of 3 x 2 x 2 = 12 values; |target - x_hat| = 0.5 and 1.5; LPIPS 0.2 and 0.4 (broadcast per pixel).
    target = torch.zeros(2, 3, 2, 2)
    x_hat = torch.cat([torch.full((1, 3, 2, 2), 0.5), torch.full((1, 3, 2, 2), -1.5)])
    # Posterior: mean 1, logvar 0 everywhere on a (2, 1, 1, 1) latent -> KL = 0.5 * (1 + 1 - 1 - 0) = 0.5 per image.
    posterior = models.DiagonalGaussianDistribution(torch.cat([torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)], 1))
    lpips = lambda a, b: torch.tensor([0.2, 0.4])
    out = fe.eqvae_losses(FixedOutputs(target, x_hat, posterior), target, fe.Tau("plain"), lpips=lpips,
                          perceptual_weight=1.0, kl_weight=1e-6)
    nll = (12 * (0.5 + 0.2) + 12 * (1.5 + 0.4)) / 2
    assert math.isclose(out["nll"].item(), nll, rel_tol=1e-6)
    assert math.isclose(out["kl"].item(), (0.5 + 0.5) / 2, rel_tol=1e-6)
    assert math.isclose(out["loss"].item(), nll + 1e-6 * 0.5, rel_tol=1e-6)
    assert math.isclose(out["rec"].item(), 1.0, rel_tol=1e-6) and math.isclose(out["lpips"].item(), 0.3, rel_tol=1e-6)


#################################################################################
#                   Whole runs: DDP, resume, non-finite loss, bad input         #
#################################################################################

def test_two_gloo_processes_equal_one_process(tmp_path):
    """2 ranks x batch 2 == 1 rank x batch 4 after 2 steps with accumulation 2. They must agree only where the math
    is the same: no GAN (--disc-weight 0: the PatchGAN's BatchNorm normalises per process and the adaptive weight
    uses each rank's local gradients) and --shared-noise (the test hook: posterior noise drawn from a seed shared by
    all ranks; normally each rank draws its own). tau is shared by all ranks by default, as in the official run."""
    extra = ["--max-steps", "2", "--disc-weight", "0", "--shared-noise"]
    run_script(["finetune_eqvae.py", *run_args(tmp_path / "two", *extra)], nproc=2)
    fe.main(fe.parse_args(run_args(tmp_path / "one", *extra)))
    two, one = final_checkpoint(tmp_path / "two"), final_checkpoint(tmp_path / "one")
    assert two["step"] == one["step"] == 2
    # Elements whose gradient is zero in exact arithmetic (a conv bias right before a one-channel GroupNorm, the
    # attention key bias) get only rounding noise, which Adam normalises to +-lr whatever its size: they differ with
    # any change of summation order, so they are only bounded (by lr x steps); all others must agree closely.
    names = [n for n, _ in models.KLVAE(**json.loads(TINY)).named_parameters()]
    lr, checked = 1e-3, 0
    for i, name in enumerate(names):
        a, b = two["model"][name], one["model"][name]
        informative = one["opt"]["state"][i]["exp_avg_sq"].sqrt() > 1e-4  # noise: ~1e-6, real: > 1e-3
        torch.testing.assert_close(a[informative], b[informative], rtol=1e-4, atol=1e-6, msg=f"{name} differs")
        assert (a - b).abs().max() <= 2 * lr * 2 + 1e-6
        checked += informative.sum().item()
    assert checked > 0.95 * sum(v.numel() for v in one["model"].values())


def test_two_gloo_processes_with_gan_and_vq(tmp_path):
    """The full objective under DDP (GAN, adaptive weight via autograd.grad, no_sync micro-steps, --tau-per-rank:
    each rank its own tau, so 16 px targets on one rank and 64 px on another) runs through; and the VQ-GAN path in
    one process. Every rank's EMA starts from the weights DDP broadcast from rank 0."""
    _, ema = run_with_ema_probe(["finetune_eqvae.py", *run_args(tmp_path / "gan", "--max-steps", "3", "--eq-prob",
                                                                "0.7", "--tau-per-rank", "--ema-decay", "0.9")],
                                tmp_path)
    assert_ema_starts_at_rank0_model(ema)  # the EMA (--ema-decay) starts from the model all ranks share
    rows = [json.loads(line) for line in open(tmp_path / "gan" / "run" / "metrics.jsonl") if '"loss"' in line]
    assert len(rows) == 3 and all(r["d_weight"] > 0 and r["d"] > 0 for r in rows)

    args = run_args(tmp_path / "vq", "--model", "vq", "--max-steps", "1", "--grad-accum", "1")
    args[args.index(TINY)] = "tiny"
    fe.main(fe.parse_args(args))
    assert isinstance(checkpoints.load_autoencoder(str(tmp_path / "vq" / "run" / "vqgan.ckpt")), models.VQGAN)


def test_resume_equals_uninterrupted_run(tmp_path):
    """Killed after step 2 (its checkpoint) and resumed == straight 4 steps, exactly, GAN and EMA included."""
    extra = ["--ema-decay", "0.9"]
    fe.main(fe.parse_args(run_args(tmp_path / "straight", "--max-steps", "4", *extra)))
    fe.main(fe.parse_args(run_args(tmp_path / "resumed", "--max-steps", "2", *extra)))
    fe.main(fe.parse_args(run_args(tmp_path / "resumed", "--max-steps", "4", "--resume", "auto", *extra)))
    a, b = final_checkpoint(tmp_path / "straight"), final_checkpoint(tmp_path / "resumed")
    assert a["step"] == b["step"] == 4 and a["loader"] == b["loader"]
    for part in ("model", "disc", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs after resume"
    assert a["opt"]["state"].keys() == b["opt"]["state"].keys()
    assert all(torch.equal(a["opt"]["state"][i]["exp_avg"], b["opt"]["state"][i]["exp_avg"]) for i in a["opt"]["state"])
    # The run folder also holds the exports, and they load back.
    assert checkpoints.load_autoencoder(os.path.join(tmp_path, "resumed", "run", "diffusers")) is not None

    # Bad input on the same folder: a fresh run would overwrite it; resuming with another architecture.
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        fe.main(fe.parse_args(run_args(tmp_path / "resumed", "--max-steps", "6")))
    other = TINY.replace('"ch": 8', '"ch": 16')
    args = run_args(tmp_path / "resumed", "--max-steps", "6", "--resume", "auto")
    args[args.index(TINY)] = other
    with pytest.raises(ValueError, match=r"different settings:\s+config: ch: checkpoint 8 vs now 16"):
        fe.main(fe.parse_args(args))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = fe.eqvae_losses

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:  # step 3, first micro-batch (2 micro-batches per step)
            out["kl"] = out["kl"] * float("nan")
        return out

    monkeypatch.setattr(fe, "eqvae_losses", poisoned)
    with pytest.raises(tu.NonFiniteLossError, match=r"step 3: kl"):
        fe.main(fe.parse_args(run_args(tmp_path, "--max-steps", "4")))
    ckpts = tu.list_checkpoints(os.path.join(tmp_path, "run", "checkpoints"))
    assert [os.path.basename(p) for p in ckpts] == ["0000002.pt"]
    assert tu.load_checkpoint(ckpts[0])["step"] == 2
    assert not os.path.exists(os.path.join(tmp_path, "run", "diffusers"))  # no export of a broken model


def test_bad_input_messages(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--init /no/such/vae: could not load"):
        fe.main(fe.parse_args(run_args(tmp_path, "--init", "/no/such/vae")))
    with pytest.raises(ValueError, match="unknown autoencoder 'sd-vea'"):
        fe.main(fe.parse_args(run_args(tmp_path, "--config", "sd-vea")))
    fake = lambda: SimpleNamespace(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"), is_main=True)
    monkeypatch.setattr(tu, "setup_distributed", fake)
    with pytest.raises(ValueError, match="--global-batch-size 4 is not divisible by the world size 3"):
        fe.main(fe.parse_args(run_args(tmp_path)))


def test_preset_changes_only_untyped_defaults():
    args = fe.parse_args(["--preset", "tiny", "--perceptual-weight", "1", "--max-steps", "7"])
    assert (args.perceptual_weight, args.max_steps, args.resolution, args.init) == (1.0, 7, 64, checkpoints.TINY_BASE["kl"])
    assert fe.parse_args(["--preset", "tiny", "--model", "vq"]).init == checkpoints.TINY_BASE["vq"]  # its own base
    args = fe.parse_args(["--data", "/imagenet/train", "--init", "sd-vae-ft-ema/"])  # the paper's settings
    assert (args.eq_prob, args.lowres_prob, args.global_batch_size, args.grad_accum, args.disc_start) == (0.5, 0.25, 80, 2, 0)
    assert args.base_lr * args.grad_accum * args.global_batch_size == pytest.approx(7.2e-4)


#################################################################################
#        The paper's protocol: starting state, precision, preview, ablations     #
#################################################################################

def lightning_checkpoint(path, vae, disc):
    """An LDM training checkpoint as Lightning 1.4 writes it (the official run's --resume input, kl-f8's
    model.ckpt): state_dict in module order with loss.* between decoder and quant convs, two Adam states by
    parameter position (configure_optimizers' order), global_step."""
    ae_params = [p for m in (vae.encoder, vae.decoder, vae.quant_conv, vae.post_quant_conv) for p in m.parameters()]
    opt_ae, opt_disc = torch.optim.Adam(ae_params, lr=3e-5, betas=(0.5, 0.9)), torch.optim.Adam(disc.parameters(),
                                                                                                 lr=3e-5, betas=(0.5, 0.9))
    for p in ae_params + list(disc.parameters()):
        p.grad = torch.randn_like(p)
    opt_ae.step(), opt_disc.step()
    sd = {f"encoder.{k}": v for k, v in vae.encoder.state_dict().items()}
    sd.update({f"decoder.{k}": v for k, v in vae.decoder.state_dict().items()})
    sd.update({"loss.logvar": torch.zeros(()), **{f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()}})
    sd.update({f"quant_conv.{k}": v for k, v in vae.quant_conv.state_dict().items()})
    sd.update({f"post_quant_conv.{k}": v for k, v in vae.post_quant_conv.state_dict().items()})
    torch.save({"state_dict": sd, "optimizer_states": [opt_ae.state_dict(), opt_disc.state_dict()],
                "lr_schedulers": [], "global_step": 246803, "epoch": 12,
                "config": vae.config}, path)  # (the config only because this tiny one's GroupNorm(8) is not inferable)
    return opt_ae, opt_disc


def test_official_starting_state_restores_the_discriminator_and_both_adams(tmp_path):
    torch.manual_seed(0)
    vae, disc = models.KLVAE(**json.loads(TINY)), models.NLayerDiscriminator(ndf=8).apply(models.weights_init)
    disc(torch.randn(2, 3, 64, 64))  # BatchNorm statistics of a trained discriminator, not the init's
    opt_ae, opt_disc = lightning_checkpoint(tmp_path / "model.ckpt", vae, disc)
    state = checkpoints.init_training_state(str(tmp_path / "model.ckpt"), vae, disc)
    assert state["global_step"] == 246803
    assert all(torch.equal(state["disc"][k], v) for k, v in disc.state_dict().items())  # BN buffers included
    fresh_vae, fresh_disc = models.KLVAE(**json.loads(TINY)), models.NLayerDiscriminator(ndf=8)
    new_ae, new_disc = torch.optim.Adam(fresh_vae.parameters()), torch.optim.Adam(fresh_disc.parameters())
    new_ae.load_state_dict(state["opt_ae"]), new_disc.load_state_dict(state["opt_disc"])
    old = {id(p): n for n, p in vae.named_parameters()}
    by_name = {old[id(p)]: opt_ae.state[p] for p in opt_ae.param_groups[0]["params"]}
    for name, p in fresh_vae.named_parameters():
        assert torch.equal(new_ae.state[p]["exp_avg"], by_name[name]["exp_avg"]), name
    assert new_ae.param_groups[0]["lr"] == 3e-5  # param_groups come from the file, as Optimizer.load_state_dict
    for p, q in zip(fresh_disc.parameters(), disc.parameters()):
        assert torch.equal(new_disc.state[p]["exp_avg_sq"], opt_disc.state[q]["exp_avg_sq"])
    # The whole run: restored and logged; the file's learning rate unless --lr; --init-state fresh restores nothing.
    folder = fe.main(fe.parse_args(["--preset", "tiny", "--init", str(tmp_path / "model.ckpt"), "--config", TINY,
                                    "--max-steps", "1", "--num-images", "8", "--global-batch-size", "2",
                                    "--disc-ndf", "8", "--results-dir", str(tmp_path), "--exp-name", "a"]))
    log = open(os.path.join(folder, "log.txt")).read()
    assert "discriminator: restored from the init file" in log and "learning rate 3e-05 from the file" in log
    # A resume keeps the file's rate (not the configured base-lr x batch), unless --lr says otherwise:
    for extra, want in (([], 3e-5), (["--lr", "1e-4"], 1e-4)):
        steps = str(int(tu.list_checkpoints(os.path.join(folder, "checkpoints"))[-1][-10:-3]) + 1)
        folder = fe.main(fe.parse_args(["--preset", "tiny", "--init", str(tmp_path / "model.ckpt"), "--config", TINY,
                                        "--max-steps", steps, "--num-images", "8", "--global-batch-size", "2",
                                        "--disc-ndf", "8", "--results-dir", str(tmp_path), "--exp-name", "a",
                                        "--resume", "auto"] + extra))
        ckpt = torch.load(tu.list_checkpoints(os.path.join(folder, "checkpoints"))[-1], weights_only=False)
        assert {g["lr"] for o in ("opt", "opt_disc") for g in ckpt[o]["param_groups"]} == {want}, extra
    folder = fe.main(fe.parse_args(["--preset", "tiny", "--init", str(tmp_path / "model.ckpt"), "--init-state",
                                    "fresh", "--max-steps", "1", "--num-images", "8", "--global-batch-size", "2",
                                    "--disc-ndf", "8", "--results-dir", str(tmp_path), "--exp-name", "b"]))
    assert "Init state" not in open(os.path.join(folder, "log.txt")).read()


def test_fine_tune_defaults_to_fp32_on_cuda_and_generators_to_bf16(monkeypatch):
    assert tu.resolve_precision(None, torch.device("cuda"), cuda_default="fp32") == "fp32"
    assert tu.resolve_precision(None, torch.device("cuda")) == "bf16" and tu.resolve_precision(None, "cpu") == "fp32"
    seen = {}

    def stop(precision, device, cuda_default="bf16"):
        seen["default"] = cuda_default
        raise KeyboardInterrupt
    monkeypatch.setattr(tu, "resolve_precision", stop)
    with pytest.raises(KeyboardInterrupt):
        fe.main(fe.parse_args(["--preset", "tiny"]))
    assert seen["default"] == "fp32"  # the official fine-tune: Lightning's 32-bit


def test_channels_last_and_cudnn_benchmark_compute_the_same_fine_tune(tmp_path):
    losses = {}
    for name, extra in (("nchw", []), ("nhwc", ["--channels-last", "--cudnn-benchmark"])):
        folder = fe.main(fe.parse_args(["--preset", "tiny", "--max-steps", "3", "--num-images", "8",
                                        "--global-batch-size", "2", "--log-every", "1", "--results-dir", str(tmp_path),
                                        "--exp-name", name, *extra]))
        rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
        losses[name] = [r[k] for r in rows if "rec" in r for k in ("rec", "nll", "kl")]
    assert torch.backends.cudnn.benchmark  # (the option reached the backend)
    torch.backends.cudnn.benchmark = False
    # The same steps in another memory layout: float rounding apart. (Not the weights: Adam turns the rounding
    # noise of gradients that are zero in exact arithmetic, the attention's key bias, into lr-sized steps.)
    assert len(losses["nchw"]) == 9 and losses["nhwc"] == pytest.approx(losses["nchw"], rel=1e-4)


def test_compile_traces_the_blocks_at_every_tau_size_and_keeps_the_eager_losses(tmp_path, monkeypatch):
    # torch.compile's graph capture (dynamo + AOT autograd) without inductor's C++ code generation, which would take
    # minutes on this CPU: the adaptive weight's autograd.grad through compiled blocks, new tau sizes every step.
    compiled = []
    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(type(self).__name__) or
                        real(self, backend="aot_eager"))
    torch._dynamo.reset()
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        folder = fe.main(fe.parse_args(["--preset", "tiny", "--max-steps", "4", "--num-images", "8", "--eq-prob", "1",
                                        "--global-batch-size", "2", "--log-every", "1", "--results-dir", str(tmp_path),
                                        "--exp-name", name, *extra]))
        rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
        losses[name] = [r[k] for r in rows if "rec" in r for k in ("rec", "nll", "kl")]
    assert set(compiled) == {"ResnetBlock", "Downsample", "Upsample"}  # attention and conv_out stay eager
    assert len(losses["eager"]) == 12 and losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
    torch._dynamo.reset()


def test_keep_best_keeps_the_k_lowest_as_lightnings_save_top_k(tmp_path):
    saved = []
    for step, value in [(1, 0.5), (2, 0.3), (3, 0.4), (4, 0.6), (5, 0.1)]:
        tu.keep_best(str(tmp_path), step, value, 2, lambda s: saved.append(s) or
                     torch.save({"step": s}, tmp_path / f"{s:07d}.pt"))
    assert saved == [1, 2, 3, 5]  # step 4 (0.6) was never among the 2 best, so it is not even written
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["0000002.pt", "0000005.pt"]
    assert json.loads((tmp_path / "best.json").read_text()) == {"5": 0.1, "2": 0.3}


def test_held_out_reconstruction_loss_selects_the_best_checkpoints(tmp_path):
    folder = fe.main(fe.parse_args(["--preset", "tiny", "--max-steps", "4", "--num-images", "8", "--global-batch-size",
                                    "2", "--val-every", "1", "--val-images", "8", "--keep-best", "2",
                                    "--results-dir", str(tmp_path), "--exp-name", "v"]))
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    val = {r["step"]: r["val_rec_loss"] for r in rows if "val_rec_loss" in r}
    assert sorted(val) == [1, 2, 3, 4]
    best = sorted(val, key=val.get)[:2]
    kept = sorted(int(p[:-3]) for p in os.listdir(os.path.join(folder, "checkpoints", "best")) if p.endswith(".pt"))
    assert kept == sorted(best)
    # The value is LDM's val/rec_loss of the kept weights: mean |x - x_hat| of a posterior sample (no LPIPS here).
    vae = checkpoints.load_autoencoder(os.path.join(folder, "checkpoints", "best", f"{best[0]:07d}.pt"))
    x = fe.held_out_images(fe.parse_args(["--preset", "tiny", "--val-images", "8"]), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        by_hand = (x - vae.eval().decode(vae.encode(x).sample(g))).abs().mean().item()
    assert by_hand == pytest.approx(val[best[0]], rel=1e-4)


def test_preview_rows_show_figure_2_on_an_exactly_equivariant_autoencoder():
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    rows = fe.preview_rows(PointwiseAE(), x)
    assert list(rows) == ["x", "D(E(x))", "tau x", "D(E(tau x))", "D(tau E(x))"]
    torch.testing.assert_close(rows["D(E(tau x))"], rows["D(tau E(x))"], atol=1e-5, rtol=0)  # equivariant: equal
    torch.testing.assert_close(rows["D(tau E(x))"], rows["tau x"], atol=1e-5, rtol=0)
    bad = fe.preview_rows(PointwiseAE(True), x)
    assert (bad["D(E(tau x))"] - bad["D(tau E(x))"]).abs().max() > 1e-2  # not equivariant: they differ


def test_explicit_latent_loss_by_hand():
    """App. A.1: sum over the batch of ||tau E(x) - E(tau x)||^2, divided by B, times the weight, added to the loss."""
    torch.manual_seed(0)
    ae = PointwiseAE(True)  # its latent offset map makes tau E(x) and E(tau x) differ
    model, x, tau = fe.TauAutoencoder(ae), torch.rand(2, 3, 16, 16) * 2 - 1, fe.Tau("eq", (0.5, 0.5), 1)
    zero = lambda shape: torch.zeros(shape)
    z = torch.einsum("oc,bchw->bohw", ae.A, x) + ae._offset(16, 16)                       # E(x), the mean
    tx = torch.rot90(F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False), 1, (-1, -2))
    e_tx = torch.einsum("oc,bchw->bohw", ae.A, tx) + ae._offset(8, 8)                     # E(tau x)
    tz = torch.rot90(F.interpolate(z, size=(8, 8), mode="bilinear", align_corners=False), 1, (-1, -2))
    want = (tz - e_tx).pow(2).sum() / 2
    plain = fe.eqvae_losses(model, x, tau, perceptual_weight=0.0, sample_noise=zero)
    out = fe.eqvae_losses(model, x, tau, perceptual_weight=0.0, sample_noise=zero, latent_weight=0.1)
    torch.testing.assert_close(out["latent"], want)
    torch.testing.assert_close(out["loss"], plain["loss"] + 0.1 * want)
    assert fe.eqvae_losses(model, x, fe.Tau("plain"), perceptual_weight=0.0, sample_noise=zero,
                           latent_weight=0.1)["latent"] == 0  # only the equivariance branch has a pair
