"""The autoencoders of the paper's Table 1 and their successors (SD3 and FLUX VAEs, SD-VAE-16 = LDM kl-f16,
SDXL-VAE), against diffusers' AutoencoderKL on the same random weights; every diffusers folder variant; the
single-file layouts; latent normalisation; the loader's refusals."""
import json
import logging
import os

import diffusers  # the reference (requirements-test.txt)
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import checkpoints
import evaluate
import finetune_eqvae as fe
import models
from helpers import perturb, run_script

# CPU-sized versions of each family's layout, widths multiples of 32 (LDM's GroupNorm(32) is then inferable).
SD3_LIKE = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, use_quant_conv=False, resolution=32,
                scaling_factor=1.5305, shift_factor=0.0609)
FLUX_LIKE = dict(SD3_LIKE, scaling_factor=0.3611, shift_factor=0.1159)
PER_CHANNEL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, resolution=32, scaling_factor=0.5,
                   latents_mean=[-1.6574, 1.886, -1.383, 2.5155], latents_std=[8.4927, 5.9022, 6.5498, 5.2299])
# kl-f16's design in small: attention at the lowest level (16 px of 256 in kl-f16; 8 px of 32 here), 16 channels.
F16_LIKE = dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=16, resolution=32,
                scaling_factor=1.0)


def random_vae(config, seed=0):
    """Every tensor random (GroupNorm affines included), so a mis-mapped tensor shows."""
    torch.manual_seed(seed)
    vae = models.KLVAE(**config).eval()
    perturb(vae, 0.1)
    return vae


def outputs(vae, x):
    with torch.no_grad():
        if isinstance(vae, models.KLVAE):
            post = vae.encode(x)
            return post.mean, post.logvar, vae.decode(post.mean)
        post = vae.encode(x).latent_dist
        return post.mean, post.logvar, vae.decode(post.mean).sample


@pytest.mark.parametrize("config", [SD3_LIKE, FLUX_LIKE, PER_CHANNEL, F16_LIKE], ids=["sd3", "flux", "mean-std", "f16"])
def test_same_outputs_as_diffusers_and_its_config(config, tmp_path):
    vae, x = random_vae(config), torch.rand(2, 3, 32, 32) * 2 - 1
    checkpoints.save_diffusers(vae, str(tmp_path / "vae"))
    ref = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae")).eval()  # loads unchanged (strict)
    for ours, theirs in zip(outputs(vae, x), outputs(ref, x)):
        assert (ours - theirs).abs().max() < 5e-5  # fp32 rounding of different summation orders
    c = ref.config
    assert (c.latent_channels, c.use_quant_conv, c.use_post_quant_conv) == \
        (config["z_channels"], config.get("use_quant_conv", True), config.get("use_quant_conv", True))
    assert c.scaling_factor == config["scaling_factor"]
    assert (c.shift_factor or 0.0) == config.get("shift_factor", 0.0)
    assert c.latents_mean == config.get("latents_mean") and c.latents_std == config.get("latents_std")
    if "attn_resolutions" in config:  # kl-f16: attention blocks at the lowest level, the decoder's first
        assert c.down_block_types[-1] == "AttnDownEncoderBlock2D" and c.up_block_types[0] == "AttnUpDecoderBlock2D"
    # diffusers' own save_pretrained output reads back into the same model
    ref.save_pretrained(str(tmp_path / "saved"))
    back = checkpoints.load_autoencoder(str(tmp_path / "saved"))
    assert back.latent_norm() == vae.latent_norm()
    for ours, again in zip(outputs(vae, x), outputs(back, x)):
        assert torch.equal(ours, again)
    # ... and so does the LDM-layout export of every family (no quant convs, 16 channels, shift, per channel).
    checkpoints.save_ldm(vae, str(tmp_path / "ldm.ckpt"))
    back = checkpoints.load_autoencoder(str(tmp_path / "ldm.ckpt"))
    assert back.config == vae.config
    assert all(torch.equal(a, b) for a, b in zip(outputs(vae, x), outputs(back, x)))


def test_latent_normalisation_formulas():
    z = torch.randn(2, 16, 4, 4)
    sd3 = random_vae(SD3_LIKE)
    torch.testing.assert_close(sd3.scale_latents(z), (z - 0.0609) * 1.5305)  # diffusers' SD3 pipelines
    torch.testing.assert_close(sd3.unscale_latents(sd3.scale_latents(z)), z)
    pc, z4 = random_vae(PER_CHANNEL), torch.randn(2, 4, 4, 4)
    mean, std = torch.tensor(PER_CHANNEL["latents_mean"]).view(1, 4, 1, 1), torch.tensor(PER_CHANNEL["latents_std"]).view(1, 4, 1, 1)
    torch.testing.assert_close(pc.scale_latents(z4), (z4 - mean) * 0.5 / std)  # SDXL pipelines' latents_mean/std
    torch.testing.assert_close(pc.unscale_latents(z4), z4 * std / 0.5 + mean)
    sd = models.KLVAE_models["tiny"]()
    torch.testing.assert_close(sd.scale_latents(z4), z4 * 0.18215)


def test_diffusers_folder_variants_shards_and_pipeline_subfolder(tmp_path):
    vae, x = random_vae(SD3_LIKE), torch.rand(1, 3, 32, 32) * 2 - 1
    ref = diffusers.AutoencoderKL.from_pretrained(str(checkpoints.save_diffusers(vae, str(tmp_path / "v")))).eval()
    want = outputs(vae, x)
    ref.save_pretrained(str(tmp_path / "fp16"), variant="fp16")                  # diffusion_pytorch_model.fp16.*
    ref.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")       # *.safetensors.index.json + shards
    ref.save_pretrained(str(tmp_path / "pipe" / "vae"))                          # a pipeline's vae/ subfolder
    assert any(f.endswith(".index.json") for f in os.listdir(tmp_path / "sharded"))
    for folder in ("fp16", "sharded", "pipe"):
        got = outputs(checkpoints.load_autoencoder(str(tmp_path / folder)), x)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), folder
    # a half-precision variant loads as float32 within fp16 rounding
    half = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "v"), torch_dtype=torch.float16)
    half.save_pretrained(str(tmp_path / "half"), variant="fp16")
    loaded = checkpoints.load_autoencoder(str(tmp_path / "half"))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert (outputs(loaded, x)[0] - want[0]).abs().max() < 0.05


def test_single_files_as_their_repos_ship_them(tmp_path, capsys):
    sd3, flux, x = random_vae(SD3_LIKE, 1), random_vae(FLUX_LIKE, 2), torch.rand(1, 3, 32, 32) * 2 - 1
    # SD3: the VAE inside the whole checkpoint, LDM names under first_stage_model., no quant convs.
    whole = {f"first_stage_model.{k}": v for k, v in sd3.state_dict().items()}
    whole["model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"] = torch.zeros(3, 1)
    save_file(whole, str(tmp_path / "model_a.safetensors"))
    # FLUX: ae.safetensors, LDM names without a prefix, no quant convs.
    save_file({k: v.contiguous() for k, v in flux.state_dict().items()}, str(tmp_path / "ae.safetensors"))
    notes = []
    for path, vae, norm in ((tmp_path / "model_a.safetensors", sd3, (1.5305, 0.0609)),
                            (tmp_path / "ae.safetensors", flux, (0.3611, 0.1159))):
        loaded = checkpoints.load_autoencoder(str(path), log=notes.append)
        assert (loaded.scaling_factor, loaded.config["shift_factor"]) == norm
        assert not loaded.config["use_quant_conv"] and loaded.config["z_channels"] == 16
        assert all(torch.equal(a, b) for a, b in zip(outputs(loaded, x), outputs(vae, x)))
    assert "sd3-vae" in notes[0] and "flux-vae" in notes[1]
    # The same weights under a name that says nothing: refused, saying how to choose; overrides make it load.
    save_file({k: v.contiguous() for k, v in flux.state_dict().items()}, str(tmp_path / "vae16.safetensors"))
    with pytest.raises(ValueError, match=r"SD3's or FLUX's.*--scaling-factor 1.5305 --shift-factor 0.0609"):
        checkpoints.load_autoencoder(str(tmp_path / "vae16.safetensors"))
    loaded = checkpoints.load_autoencoder(str(tmp_path / "vae16.safetensors"), scaling_factor=0.3611, shift_factor=0.1159)
    assert loaded.latent_norm()["shift_factor"] == 0.1159


def test_sdxl_ldm_file_gets_sdxl_scale_or_says_what_it_assumed(tmp_path):
    vae = random_vae(dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp_path / "sdxl_vae.safetensors"))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp_path / "other_vae.safetensors"))
    notes = []
    assert checkpoints.load_autoencoder(str(tmp_path / "sdxl_vae.safetensors"), log=notes.append).scaling_factor == 0.13025
    assert checkpoints.load_autoencoder(str(tmp_path / "other_vae.safetensors"), log=notes.append).scaling_factor == 0.18215
    assert "sdxl-vae" in notes[0] and "--scaling-factor 0.13025 for SDXL-VAE" in notes[1]


def test_kl_f16_ldm_file_round_trips_both_formats(tmp_path):
    vae, x = random_vae(F16_LIKE), torch.rand(1, 3, 32, 32) * 2 - 1
    sd = {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    torch.save({"state_dict": {**sd, "loss.logvar": torch.zeros(())}}, tmp_path / "model.ckpt")  # LDM layout
    loaded = checkpoints.load_autoencoder(str(tmp_path / "model.ckpt"))
    assert loaded.config["attn_resolutions"] == [64] and loaded.downsampling == 4  # placed for 256 px, as LDM
    checkpoints.save_diffusers(loaded, str(tmp_path / "d"))
    checkpoints.save_ldm(loaded, str(tmp_path / "back.ckpt"))
    for path in ("d", "back.ckpt"):
        again = checkpoints.load_autoencoder(str(tmp_path / path))
        assert all(torch.equal(a, b) for a, b in zip(outputs(again, x), outputs(vae, x))), path


def test_refusals_name_what_differs(tmp_path):
    vae = random_vae(SD3_LIKE)
    folder = checkpoints.save_diffusers(vae, str(tmp_path / "v"))
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    for change, match in (({"act_fn": "gelu"}, "act_fn='gelu'"), ({"mid_block_add_attention": False},
                          "mid_block_add_attention=False"), ({"use_post_quant_conv": True}, "use_post_quant_conv"),
                          ({"spatial_norm_dim": 4}, "unknown field spatial_norm_dim"),
                          ({"_class_name": "AutoencoderKLWan"}, "AutoencoderKLWan")):
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({**config, **change}, f)
        with pytest.raises(ValueError, match=match):
            checkpoints.load_autoencoder(folder)
    # A config's latent statistics for another channel count; weights of one architecture with another's config.
    with pytest.raises(ValueError, match="latents_mean has 4 values for 16 latent channels"):
        models.KLVAE(**dict(SD3_LIKE, latents_mean=[0.0] * 4, latents_std=[1.0] * 4))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**config, "use_quant_conv": True, "use_post_quant_conv": True}, f)
    with pytest.raises(KeyError, match="quant_conv.weight"):  # SD3 weights with an SD-VAE config: missing keys
        checkpoints.load_autoencoder(folder)


def test_latent_stats_measure_a_known_distribution(tmp_path, capsys):
    """An autoencoder whose posterior is N(m_c, s_c^2) for every pixel (encoder output = conv_out's bias): the
    measured shift / scale and per-channel statistics are those of that distribution."""
    torch.manual_seed(0)
    vae = models.KLVAE_models["tiny-16"]()
    m, s = torch.rand(16) * 4 - 2, torch.rand(16) * 1.5 + 0.5
    with torch.no_grad():
        vae.encoder.conv_out.weight.zero_()
        vae.encoder.conv_out.bias.copy_(torch.cat([m, 2 * s.log()]))  # [mean | logvar]
    export = checkpoints.save_diffusers(vae, str(tmp_path / "vae"))
    evaluate.main(["latent-stats", "--vae", export, "--preset", "tiny", "--num-images", "64", "--write", export])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 64 images x 8 x 8 positions = 4096 draws per channel: the standard errors are ~s / 64
    assert torch.allclose(torch.tensor(out["channel_mean"], dtype=torch.float64), m.double(), atol=0.1)
    assert torch.allclose(torch.tensor(out["channel_std"], dtype=torch.float64), s.double(), rtol=0.06)
    mean, var = m.mean(), (s ** 2 + m ** 2).mean() - m.mean() ** 2  # the mixture over channels
    assert out["shift_factor"] == pytest.approx(float(mean), abs=0.05)
    assert out["scaling_factor"] == pytest.approx(float(var ** -0.5), rel=0.03)
    written = checkpoints.load_autoencoder(export)  # --write put them into the export
    assert written.latent_norm()["shift_factor"] == out["shift_factor"]
    with torch.no_grad():
        z = written.scale_latents(written.encode(torch.rand(16, 3, 64, 64) * 2 - 1).sample())
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05  # unit-ish, as a generator wants
    evaluate.main(["latent-stats", "--vae", export, "--preset", "tiny", "--num-images", "64", "--per-channel"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["scaling_factor"] == 1.0 and torch.allclose(torch.tensor(out["latents_std"], dtype=torch.float64), s.double(), rtol=0.06)


@pytest.mark.parametrize("ext", [".safetensors", ".ckpt"])
def test_writing_the_latent_norm_keeps_every_tensor(tmp_path, ext):
    """--write into a file save_ldm made changes its config only: the discriminator a fine-tune starts from and the
    stored dtype (the shipped fp16 bases) stay."""
    torch.manual_seed(0)
    vae, disc = models.KLVAE_models["tiny"]().half(), models.NLayerDiscriminator(3, 8, 3).half()
    path = str(tmp_path / f"vae{ext}")
    checkpoints.save_ldm(vae, path, discriminator=disc)
    read = lambda: checkpoints._read_state_dict_file(path)[0] if ext == ".safetensors" else \
        checkpoints.torch_load(path)["state_dict"]
    before = read()
    checkpoints.set_latent_norm(path, {"scaling_factor": 0.5, "shift_factor": -0.25, "latents_mean": None,
                                       "latents_std": None})
    after = read()
    assert sorted(after) == sorted(before) and any(k.startswith("loss.discriminator.") for k in after)
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    assert after["encoder.conv_in.weight"].dtype == torch.float16
    norm = checkpoints.load_autoencoder(path).latent_norm()
    assert norm["scaling_factor"] == 0.5 and norm["shift_factor"] == -0.25


def test_cfg_guides_every_channel_of_16_channel_latents():
    torch.manual_seed(0)
    dit = models.DiT_models["DiT-T/2"](input_size=8, in_channels=16, num_classes=10).eval()
    with torch.no_grad():
        perturb(dit, 0.02)
        x, t, y = torch.randn(2, 16, 8, 8), torch.tensor([500, 500]), torch.tensor([3, 10])
        out = dit.forward_with_cfg(x, t, y, cfg_scale=4.0)
        both = dit(torch.cat([x[:1], x[:1]]), t, y)
    guided = both[1:, :16] + 4.0 * (both[:1, :16] - both[1:, :16])  # (1 + w) c - w u on all 16 channels
    torch.testing.assert_close(out[:1, :16], guided, atol=1e-5, rtol=1e-5)


def test_dit_on_the_16_channel_tiny_autoencoder_trains_samples_decodes(tmp_path):
    """The SD3-style path at CPU size: 16 channels, no quant convs, a shift; the sampler takes the autoencoder
    and its normalisation from the checkpoint."""
    run_script(["train_dit.py", "--preset", "tiny", "--exp-name", "DiT-T-2", "--vae", "tiny-16", "--scaling-factor", "0.8", "--shift-factor",
                "0.1", "--num-images", "32", "--global-batch-size", "8", "--max-steps", "4", "--ckpt-every", "4",
                "--results-dir", str(tmp_path)])
    ckpt = str(tmp_path / "DiT-T-2" / "checkpoints" / "0000004.pt")
    state = torch.load(ckpt, weights_only=True)
    assert state["model"]["x_embedder.proj.weight"].shape[1] == 16
    assert state["vae_norm"] == {"scaling_factor": 0.8, "shift_factor": 0.1, "latents_mean": None, "latents_std": None}
    run_script(["sample.py", "--preset", "tiny", "--ckpt", ckpt, "--num-samples", "4", "--num-sampling-steps", "3",
                "--sample-dir", str(tmp_path / "s")])
    (npz,) = [p for p in os.listdir(tmp_path / "s") if p.endswith(".npz")]
    import numpy as np
    assert np.load(tmp_path / "s" / npz)["arr_0"].shape == (4, 64, 64, 3)


def test_kl_f16_from_an_ldm_file_fine_tunes_and_exports_both_formats(tmp_path):
    # kl-f16's design (ch_mult 1,1,2,2,4, attention at 16 px of 256, 16 channels) at a CPU width, as LDM saves it.
    vae = random_vae(dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(16,), z_channels=16))
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}},
               tmp_path / "model.ckpt")
    args = fe.parse_args(["--data", "synthetic", "--resolution", "64", "--init", str(tmp_path / "model.ckpt"),
                          "--num-images", "8", "--global-batch-size", "2", "--grad-accum", "1", "--max-steps", "2",
                          "--perceptual-weight", "0", "--disc-ndf", "8", "--num-workers", "0", "--results-dir",
                          str(tmp_path / "runs"), "--exp-name", "f16", "--scaling-factor", "0.5"])
    exp_dir = fe.main(args)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    ldm, folder = (checkpoints.load_autoencoder(os.path.join(exp_dir, p)) for p in ("eqvae.ckpt", "diffusers"))
    assert ldm.config["attn_resolutions"] == [16] and ldm.scaling_factor == folder.scaling_factor == 0.5
    assert all(torch.equal(a, b) for a, b in zip(outputs(ldm, x), outputs(folder, x)))
    ref = diffusers.AutoencoderKL.from_pretrained(os.path.join(exp_dir, "diffusers")).eval()
    assert all((a - b).abs().max() < 5e-5 for a, b in zip(outputs(ldm, x), outputs(ref, x)))


def test_an_export_that_fails_spares_the_others(tmp_path, monkeypatch):
    vae = models.KLVAE_models["tiny"]()

    def broken(*a, **k):
        raise RuntimeError("an exporter bug")
    monkeypatch.setattr(checkpoints, "save_ldm", broken)
    with pytest.raises(ValueError, match=r"failed for eqvae.ckpt: RuntimeError: an exporter bug \(written: diffusers"):
        fe.export_autoencoder(vae, str(tmp_path), logging.getLogger("test"))
    assert checkpoints.load_autoencoder(str(tmp_path / "diffusers")).config == vae.config


def test_dit_with_patch_size_1_on_f16_latents_trains_and_samples(tmp_path):
    """kl-f16's generative path (SD-VAE-16 in Table 1): 16 x 4 x 4 latents of a 64 px image, DiT-T/1 tokens."""
    f16 = dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(4,), z_channels=16, resolution=64,
               scaling_factor=0.5)
    checkpoints.save_ldm(random_vae(f16), str(tmp_path / "f16.ckpt"))
    run_script(["train_dit.py", "--preset", "tiny", "--exp-name", "f16", "--vae", str(tmp_path / "f16.ckpt"),
                "--model", "DiT-T/1", "--num-images", "16", "--global-batch-size", "8", "--max-steps", "2",
                "--ckpt-every", "2", "--results-dir", str(tmp_path)])
    state = torch.load(str(tmp_path / "f16" / "checkpoints" / "0000002.pt"), weights_only=True)
    assert state["model"]["pos_embed"].shape == (1, 16, 128)  # 4 x 4 tokens of patch 1 (DiT-T: width 128)
    run_script(["sample.py", "--preset", "tiny", "--ckpt", str(tmp_path / "f16" / "checkpoints" / "0000002.pt"),
                "--num-samples", "2", "--num-sampling-steps", "2", "--out", str(tmp_path / "s.npz"),
                "--sample-dir", str(tmp_path / "s")])
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 64, 64, 3)
