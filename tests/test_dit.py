"""DiT: backbone layout, Gaussian diffusion math against closed forms, sampler, latent cache, train/sample scripts."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from scipy.stats import norm

import data
import checkpoints
import models
from helpers import assert_ema_starts_at_rank0_model, perturb, run_script, run_with_ema_probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")



#################################################################################
#                         Backbone: layout and behaviour                        #
#################################################################################

@pytest.mark.parametrize("fixture, kwargs", [
    ("dit_xl_2_256.json", {}),
    ("sit_xl_2_256.json", {}),
    ("repa_sit_xl_2_256.json", dict(learn_sigma=False, encoder_depth=8, z_dims=[768], projector_dim=2048)),
])
def test_state_dict_matches_official_layout(fixture, kwargs):
    with open(os.path.join(FIXTURES, fixture)) as f:
        ref = json.load(f)
    with torch.device("meta"):  # 675M parameters: shapes only
        model = models.DiT_models["DiT-XL/2"](input_size=32, **kwargs)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(shapes) == sorted(ref["shapes"])
    assert shapes == ref["shapes"]
    assert sum(math.prod(s) for s in shapes.values()) == ref["num_params"]


def test_all_configs_and_unknown_name():
    expected = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "T": (4, 128, 4)}
    for name, fn in models.DiT_models.items():
        size, p = name[4:].split("/")
        with torch.device("meta"):
            m = fn(input_size=32)
        depth, hidden, heads = expected[size]
        assert (len(m.blocks), m.pos_embed.shape[-1], m.num_heads, m.patch_size) == (depth, hidden, heads, int(p))
    assert len(models.DiT_models) == 18  # XL, L, B, S with patch 1, 2, 4, 8; T with 1, 2
    with pytest.raises(ValueError, match="DiT-XL/2"):
        models.build(models.DiT_models, "DiT-M/2")


def test_init_and_pos_embed():
    torch.manual_seed(0)
    m = models.DiT_models["DiT-T/2"](input_size=8)
    # adaLN-Zero: zero modulation and output layer, so the initial output is exactly zero.
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2])
    assert torch.equal(m(x, t, y), torch.zeros(2, 8, 8, 8))
    assert m.y_embedder.embedding_table.weight.shape == (1001, 128)
    # MAE sin-cos embedding at one token, by hand: first half from the column index, second from the row.
    pe, D = m.pos_embed[0], 128
    row, col = 1, 2                           # token 1 * 4 + 2 on the 4 x 4 grid
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    expect = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(pe[row * 4 + col].numpy(), expect, atol=1e-6)
    assert not m.pos_embed.requires_grad


def test_repa_projection_and_cfg_formula():
    torch.manual_seed(0)
    m = models.DiT(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=10,
                   learn_sigma=True, encoder_depth=2, z_dims=[16, 8], projector_dim=32).eval()
    perturb(m, 0.05)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([0, 5, 9])
    out, zs = m(x, t, y)
    assert out.shape == (3, 8, 8, 8) and [z.shape for z in zs] == [(3, 16, 16), (3, 16, 8)]
    # zs = projectors applied to the tokens after the second block: recompute by hand.
    h = m.x_embedder(x) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder(y, False)
    for blk in m.blocks[:2]:
        h = blk(h, c)
    torch.testing.assert_close(zs[1], m.projectors[1](h))
    # CFG: guided eps = u + s (c - u) on the first 3 channels (official default), or all 4 with the flag.
    xx, tt = torch.cat([x[:2], x[:2]]), torch.tensor([7, 7, 7, 7])
    yy = torch.tensor([1, 2, 10, 10])
    cond, _ = m(x[:2], tt[:2], yy[:2])
    uncond, _ = m(x[:2], tt[:2], yy[2:])
    guided = m.forward_with_cfg(xx, tt, yy, 4.0)
    torch.testing.assert_close(guided[:2, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(guided[2:, :3], guided[:2, :3])
    torch.testing.assert_close(guided[:2, 3:], cond[:, 3:])
    allc = m.forward_with_cfg(xx, tt, yy, 4.0, cfg_all_channels=True)
    torch.testing.assert_close(allc[:2, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]))


def test_checkpoint_for_other_config_is_named():
    small = models.DiT(input_size=8, patch_size=4, hidden_size=128, depth=4, num_heads=4)
    target = models.DiT_models["DiT-T/2"](input_size=8)
    with pytest.raises(ValueError, match=r"checkpoint is DiT-T/4.*model is DiT-T/2"):
        checkpoints.load_dit_weights(target, small.state_dict())


#################################################################################
#                     Gaussian diffusion against closed forms                   #
#################################################################################

def test_schedule_and_posterior_closed_forms():
    d = models.create_diffusion("")
    betas = 1e-4 + (0.02 - 1e-4) * np.arange(1000) / 999
    np.testing.assert_allclose(d.betas, betas, rtol=1e-12)
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(d.alphas_cumprod, abar, rtol=1e-12)
    assert d.alphas_cumprod.dtype == np.float64
    # Posterior q(x_{t-1} | x_t, x_0) by Gaussian conditioning: precision 1/(1 - abar_{t-1}) + alpha_t / beta_t.
    t = np.arange(1, 1000)
    abar_prev, alpha = abar[t - 1], 1 - betas[t]
    var = 1.0 / (1.0 / (1 - abar_prev) + alpha / betas[t])
    np.testing.assert_allclose(d.posterior_variance[t], var, rtol=1e-9)
    np.testing.assert_allclose(d.posterior_mean_coef1[t], var * np.sqrt(abar_prev) / (1 - abar_prev), rtol=1e-9)
    np.testing.assert_allclose(d.posterior_mean_coef2[t], var * np.sqrt(alpha) / betas[t], rtol=1e-9)
    assert d.posterior_variance[0] == 0 and d.posterior_log_variance_clipped[0] == np.log(d.posterior_variance[1])
    # Respacing keeps alpha-bar at the kept steps; the model sees the original indices.
    s = models.create_diffusion("250")
    assert s.num_timesteps == 250 and s.timestep_map[0] == 0 and s.timestep_map[-1] == 999
    np.testing.assert_allclose(s.alphas_cumprod, abar[s.timestep_map], rtol=1e-12)
    assert list(models.create_diffusion("ddim50").timestep_map) == list(range(0, 1000, 20))
    assert models.space_timesteps(100, "10,5") == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 50, 62, 74, 87, 99]


def test_q_sample_statistics():
    d = models.create_diffusion("")
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    for step in (0, 300, 999):
        xt = d.q_sample(x0, torch.full((20000,), step))
        abar = np.prod(1 - d.betas[: step + 1])
        assert abs(xt.mean().item() - math.sqrt(abar) * 0.7) < 0.03
        assert abs(xt.var().item() - (1 - abar)) < 0.03 * max(1 - abar, 0.01) + 2e-4


def test_vlb_terms_are_kl_and_decoder_nll():
    d = models.create_diffusion("")
    torch.manual_seed(0)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    for step in (0, 40):
        # x_t from x_0 with known noise; the "model" predicts that noise up to a small error (else at t = 0, where
        # the std is 0.01, every bin probability would underflow to the clamp).
        noise = torch.randn(2, 3, 4, 4)
        t = torch.full((2,), step)
        xt = d.q_sample(x0, t, noise)
        out = torch.cat([noise + 0.05 * torch.randn_like(noise), torch.rand(2, 3, 4, 4) * 2 - 1], 1)  # eps | v
        got = d.vb_terms_bpd(out, x0, xt, t).double().numpy()
        # Model mean and variance by hand, in float64 numpy.
        X0, XT, O = x0.double().numpy(), xt.double().numpy(), out.double().numpy()
        ab, ab_prev, beta = d.alphas_cumprod[step], d.alphas_cumprod_prev[step], d.betas[step]
        eps, v = O[:, :3], O[:, 3:]
        x0_hat = (XT - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
        c1, c2 = np.sqrt(ab_prev) * beta / (1 - ab), np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        mean = c1 * x0_hat + c2 * XT
        frac = (v + 1) / 2
        logvar = frac * np.log(beta) + (1 - frac) * np.log(d.posterior_variance[max(step, 1)])
        if step == 0:
            # Decoder NLL: -log of the Gaussian mass of x0's 8-bit bin (edges open at +-1), via the reference's tanh CDF.
            def cdf(z):
                return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
            s = np.exp(-0.5 * logvar)
            hi, lo = cdf(s * (X0 - mean + 1 / 255)), cdf(s * (X0 - mean - 1 / 255))
            expect = -np.log(np.clip(hi - lo, 1e-12, None))
            exact = -np.log(norm.cdf(s * (X0 - mean + 1 / 255)) - norm.cdf(s * (X0 - mean - 1 / 255)))
            assert expect.max() < 20 and np.abs(expect - exact).max() < 0.05  # not clamped; tanh CDF ~ exact
        else:
            tm = c1 * X0 + c2 * XT
            tlv = np.log(d.posterior_variance[step])
            expect = 0.5 * (-1 + logvar - tlv + np.exp(tlv - logvar) + (tm - mean) ** 2 * np.exp(-logvar))
        expect = expect.reshape(2, -1).mean(1) / np.log(2)
        np.testing.assert_allclose(got, expect, rtol=2e-4, atol=1e-5)


def test_training_loss_is_mse_plus_detached_vlb():
    d = models.create_diffusion("")
    torch.manual_seed(0)
    m = models.DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    perturb(m, 0.05)
    x0, t, noise, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 5, 999]), torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2])
    m.eval()
    terms = d.training_losses(m, x0, t, dict(y=y), noise=noise)
    xt = d.q_sample(x0, t, noise)
    out = m(xt, t, y)
    torch.testing.assert_close(terms["mse"], ((noise - out[:, :4]) ** 2).mean((1, 2, 3)))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    # The VLB must not push the mean: its gradient w.r.t. the eps half of the output is zero.
    out = out.detach().requires_grad_(True)
    d.vb_terms_bpd(torch.cat([out[:, :4].detach(), out[:, 4:]], 1), x0, xt, t).sum().backward()
    assert out.grad[:, :4].abs().max() == 0 and out.grad[:, 4:].abs().max() > 0


def test_sampler_deterministic_for_a_seed():
    torch.manual_seed(0)
    m = models.DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=4).eval()
    perturb(m, 0.05)
    d = models.create_diffusion("8")
    z = torch.randn(2, 4, 8, 8)
    kw = dict(y=torch.tensor([1, 4]), cfg_scale=2.0)

    def run(seed, ddim=False):
        g = torch.Generator().manual_seed(seed)
        loop = d.ddim_sample_loop if ddim else d.p_sample_loop
        return loop(m.forward_with_cfg, z.shape, z.clone(), model_kwargs=kw, generator=g)
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(run(1, True), run(2, True))  # DDIM (eta 0) uses no noise after x_T
    # The model sees original timesteps: with "8" respacing, the first call is at t = 999.
    seen = []
    d.p_sample_loop(lambda x, t, **k: (seen.append(t[0].item()), m(x, t, k["y"]))[1], (1, 4, 8, 8),
                    model_kwargs=dict(y=torch.tensor([0])), device="cpu")
    assert seen == sorted(seen, reverse=True) and seen[0] == 999 and seen[-1] == 0 and len(seen) == 8


#################################################################################
#                                 Latent cache                                  #
#################################################################################

def test_latent_cache_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = models.KLVAE_models["tiny"]().eval()
    images = data.build_dataset("synthetic", 64, "center", num_images=7)
    cache = str(tmp_path / "cache")
    # Two "ranks" (run one after the other here): each writes only its own shards.
    meta = data.build_latent_cache(vae, images, cache, 64, vae_name="tiny", rank=0, world_size=2, batch_size=2,
                                   shard_size=3)
    assert sorted(os.listdir(cache)) == ["labels_00000.npy", "labels_00002.npy", "meta.json", "shard_00000.npy",
                                         "shard_00002.npy"]
    with pytest.raises(FileNotFoundError, match="incomplete"):
        data.LatentCache(cache)
    data.build_latent_cache(vae, images, cache, 64, vae_name="tiny", rank=1, world_size=2, batch_size=2, shard_size=3)
    mtime = os.path.getmtime(os.path.join(cache, "shard_00001.npy"))
    assert meta["latent_shape"] == [4, 8, 8] and meta["num_images"] == 7
    # A rerun (one process) keeps finished shards and only writes the missing one.
    os.remove(os.path.join(cache, "shard_00002.npy"))
    data.build_latent_cache(vae, images, cache, 64, vae_name="tiny", batch_size=4, shard_size=3)
    assert os.path.getmtime(os.path.join(cache, "shard_00001.npy")) == mtime
    # Round trip: cached means equal direct encodings up to float16 rounding (relative 2^-11) and the float32
    # differences between batch sizes (1e-5, as before float16), for the image and its mirror.
    x = torch.stack([images[i][0] for i in range(7)])
    with torch.no_grad():
        post, post_f = vae.encode(x), vae.encode(x.flip(-1))
    fp16 = dict(rtol=2 ** -11, atol=1e-5)
    ds = data.LatentCache(cache, mode="mean")
    assert len(ds) == 7 and [ds[i][1] for i in range(7)] == [images[i][1] for i in range(7)]
    assert ds[0][0].dtype == torch.float32
    torch.testing.assert_close(torch.stack([ds[i][0] for i in range(7)]), post.mean, **fp16)
    raw = np.load(os.path.join(cache, "shard_00002.npy"))  # image 6 is the first of shard 2
    assert raw.dtype == np.float16 and meta["dtype"] == "float16"
    torch.testing.assert_close(torch.from_numpy(raw[0, 1, :4]).float(), post_f.mean[6], **fp16)
    torch.testing.assert_close(torch.from_numpy(raw[0, 1, 4:]).float(), post_f.std[6], **fp16)
    # Sampling draws z = mean + std * eps around the image or its mirror.
    sampled = data.LatentCache(cache)
    torch.manual_seed(1)
    z = sampled[6][0]
    err = torch.stack([((z - p.mean[6]) / p.std[6]).abs().max() for p in (post, post_f)]).min()
    assert err < 6
    # Another VAE or resolution: a clear error, and the cache is left as it was.
    other = models.KLVAE_models["tiny"]().eval()
    with pytest.raises(ValueError, match="vae_sha256"):
        data.build_latent_cache(other, images, cache, 64, vae_name="other", shard_size=3)
    with pytest.raises(ValueError, match="resolution"):
        data.build_latent_cache(vae, data.build_dataset("synthetic", 32, "center", num_images=7), cache, 32,
                                shard_size=3)
    assert os.path.getmtime(os.path.join(cache, "shard_00001.npy")) == mtime


#################################################################################
#                      Scripts: train (DDP, resume), sample                     #
#################################################################################

TINY = ["train_dit.py", "--preset", "tiny", "--num-images", "64", "--global-batch-size", "8", "--exp-name", "DiT-T-2"]


def test_train_loss_decreases_and_resume_is_exact(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    steps = ["--max-steps", "24", "--log-every", "6", "--ckpt-every", "12", "--lr", "5e-4"]  # lr: fewer steps
    run_script(TINY + ["--results-dir", a] + steps)
    rows = [json.loads(line) for line in open(os.path.join(a, "DiT-T-2", "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [6, 12, 18, 24]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(r["img_per_sec"] > 0 for r in rows)  # one metric name in every stage
    # Kill-and-resume: continue from the step-12 checkpoint in a fresh folder; it must equal the straight run.
    os.makedirs(os.path.join(b, "DiT-T-2", "checkpoints"))
    shutil.copy(os.path.join(a, "DiT-T-2", "checkpoints", "0000012.pt"), os.path.join(b, "DiT-T-2", "checkpoints"))
    run_script(TINY + ["--results-dir", b, "--resume", "auto"] + steps)
    ca = torch.load(os.path.join(a, "DiT-T-2", "checkpoints", "0000024.pt"), weights_only=False)
    cb = torch.load(os.path.join(b, "DiT-T-2", "checkpoints", "0000024.pt"), weights_only=False)
    for key in ("model", "ema"):
        for name in ca[key]:
            assert torch.equal(ca[key][name], cb[key][name]), f"{key}.{name} differs after resume"
    assert ca["loader"] == cb["loader"]
    # A fresh start in a folder with checkpoints refuses to overwrite them (checked before anything is built).
    import train_dit
    with pytest.raises(FileExistsError, match="--resume auto"):
        train_dit.main(train_dit.get_args(TINY[1:] + ["--results-dir", a]))

    # Sampling: exactly N images and labels, identical after an interrupted run picks up its shards.
    ckpt = os.path.join(a, "DiT-T-2", "checkpoints", "0000024.pt")
    args = ["sample.py", "--preset", "tiny", "--ckpt", ckpt, "--sample-dir", str(tmp_path / "s"),
            "--num-samples", "5", "--per-proc-batch-size", "2", "--num-sampling-steps", "4"]
    run_script(args)
    (npz,) = [p for p in os.listdir(tmp_path / "s") if p.endswith(".npz")]
    first = np.load(tmp_path / "s" / npz)
    assert first["arr_0"].shape == (5, 64, 64, 3) and first["arr_0"].dtype == np.uint8
    assert first["arr_1"].shape == (5,) and first["arr_1"].max() < 10
    shard_dir = tmp_path / "s" / npz[:-4]
    assert sorted(os.listdir(shard_dir)) == ["000000.npz", "000001.npz", "000002.npz"]
    os.remove(shard_dir / "000001.npz")
    os.remove(tmp_path / "s" / npz)
    run_script(args)
    again = np.load(tmp_path / "s" / npz)
    assert np.array_equal(first["arr_0"], again["arr_0"]) and np.array_equal(first["arr_1"], again["arr_1"])
    # Bad model name: the valid ones are listed.
    import sample
    with pytest.raises(ValueError, match="DiT-XL/2"):
        sample.family_of("DiT-Q/2")


def test_torchrun_two_processes_with_latent_cache(tmp_path):
    out, ema = run_with_ema_probe(TINY + ["--results-dir", str(tmp_path), "--max-steps", "4", "--log-every", "2",
                                          "--ckpt-every", "4", "--num-images", "16", "--cache-latents",
                                          str(tmp_path / "cache"), "--cache-shard-size", "4", "--cache-batch-size",
                                          "4"], tmp_path)
    assert "world_size=2" in out.stdout
    assert_ema_starts_at_rank0_model(ema)  # the model is built alike on every rank, EMA before DDP included
    # 4 shards, split over the 2 ranks, all present; the checkpoint holds both ranks' RNG states.
    assert sorted(f for f in os.listdir(tmp_path / "cache") if f.startswith("shard")) == \
        [f"shard_{k:05d}.npy" for k in range(4)]
    ckpt = torch.load(tmp_path / "DiT-T-2" / "checkpoints" / "0000004.pt", weights_only=False)
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    rows = [json.loads(line) for line in open(tmp_path / "DiT-T-2" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)


def test_nan_loss_stops_without_touching_checkpoints(tmp_path):
    import train_dit
    import train_utils
    # An absurd learning rate blows the weights up after the first step; step 1's checkpoint must survive as saved.
    args = train_dit.get_args(TINY[1:] + ["--num-images", "8", "--results-dir", str(tmp_path), "--lr", "1e30",
                                          "--max-steps", "5", "--ckpt-every", "1", "--log-every", "1"])
    with pytest.raises(train_utils.NonFiniteLossError, match="step 2"):
        train_dit.main(args)
    ckpts = sorted(os.listdir(tmp_path / "DiT-T-2" / "checkpoints"))
    assert ckpts == ["0000001.pt"]
    state = torch.load(tmp_path / "DiT-T-2" / "checkpoints" / ckpts[0], weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_compile_gives_the_eager_losses_and_keys(tmp_path, one_thread):
    """--compile: the same losses and weights as eager to float tolerance after 2 steps, and checkpoints with the
    official keys (compiled in place). inductor's own RNG would draw other label-dropout masks than eager torch:
    fallback_random makes it use torch's, so the two runs are comparable."""
    import train_dit
    import train_utils
    rows, states = {}, {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        args = train_dit.get_args(TINY[1:] + ["--num-images", "16", "--global-batch-size", "4", "--max-steps", "2",
                                              "--log-every", "1", "--ckpt-every", "2", "--results-dir",
                                              str(tmp_path / name)] + extra)
        with torch._inductor.config.patch(fallback_random=True):  # (not monkeypatch: its undo breaks the config)
            train_dit.main(args)
        rows[name] = [json.loads(line) for line in open(tmp_path / name / "DiT-T-2" / "metrics.jsonl")]
        states[name] = train_utils.load_checkpoint(str(tmp_path / name / "DiT-T-2" / "checkpoints" / "0000002.pt"))
    torch._dynamo.reset()
    for a, b in zip(rows["eager"], rows["compiled"]):
        for key in ("loss", "mse", "vb"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert rows["eager"][1]["loss"] != rows["eager"][0]["loss"]  # step 2 saw an update
    for part in ("model", "ema"):
        assert list(states["eager"][part]) == list(states["compiled"][part])  # no _orig_mod. / module. prefixes
        for k, v in states["eager"][part].items():
            torch.testing.assert_close(states["compiled"][part][k], v, rtol=1e-4, atol=1e-5, msg=f"{part}.{k}")


def test_sample_reads_official_and_train_py_checkpoints(tmp_path):
    import argparse
    import sample
    model = models.DiT_models["DiT-T/2"](input_size=8)
    sd = model.state_dict()
    torch.save(sd, tmp_path / "plain.pt")  # the released DiT-XL-2-256x256.pt is a plain state dict
    ema = {k: v + 1 for k, v in sd.items()}
    torch.save({"model": sd, "ema": ema, "opt": {}, "args": argparse.Namespace(model="DiT-T/2")},
               tmp_path / "trainpy.pt")  # DiT's train.py layout, args pickled as a Namespace
    assert all(torch.equal(sample.read_checkpoint(str(tmp_path / "plain.pt"), "ema")[0][k], sd[k]) for k in sd)
    assert all(torch.equal(sample.read_checkpoint(str(tmp_path / "trainpy.pt"), "ema")[0][k], ema[k]) for k in sd)
    assert all(torch.equal(sample.read_checkpoint(str(tmp_path / "trainpy.pt"), "model")[0][k], sd[k]) for k in sd)


def test_guidance_interval_in_dit_sampler_by_hand():
    """EQ-VAE Table 4's *: guidance only for t / 1000 in [low, high]; elsewhere the conditional output, by hand."""
    torch.manual_seed(0)
    dit = models.DiT_models["DiT-T/2"](input_size=8, num_classes=10).eval()
    with torch.no_grad():
        perturb(dit, 0.02)
        x = torch.randn(2, 4, 8, 8)
        for t_val, guided in ((100, False), (500, True), (900, False)):
            t, y = torch.tensor([t_val, t_val]), torch.tensor([3, 10])
            out = dit.forward_with_cfg(torch.cat([x[:1], x[:1]]), t, y, cfg_scale=4.0, guidance_interval=(0.2, 0.7))
            both = dit(torch.cat([x[:1], x[:1]]), t, y)
            cond, uncond = both[:1, :3], both[1:, :3]
            want = uncond + 4.0 * (cond - uncond) if guided else cond
            torch.testing.assert_close(out[:1, :3], want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out[:1, 3:], both[:1, 3:], atol=0, rtol=0)  # the 4th channel and sigma: cond
