"""KL autoencoder (SD-VAE): parameter layout vs the LDM / diffusers fixtures, building blocks vs closed forms,
checkpoint round trips through every supported format, and the loader's errors."""
import argparse
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import checkpoints
import models
from helpers import perturb

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

# A KL-VAE small enough for exact round trips in milliseconds, with widths that are multiples of 32 so that the
# architecture can also be inferred from a bare LDM state dict (LDM hard-codes GroupNorm(32)).
MICRO = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, resolution=32)


def _fixture(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


def _random_vae(config=MICRO, seed=0):
    """A model whose every tensor (GroupNorm affines included) is random, so a mis-mapped tensor shows."""
    torch.manual_seed(seed)
    vae = (models.KLVAE_models[config]() if isinstance(config, str) else models.KLVAE(**config)).eval()
    perturb(vae, 0.1)
    return vae


def _outputs(vae, x):
    with torch.no_grad():
        posterior = vae.encode(x)
        return posterior.mean, posterior.logvar, vae.decode(posterior.mean)


def _assert_same_model(a, b, x):
    for u, v in zip(_outputs(a, x), _outputs(b, x)):
        assert torch.equal(u, v)
    assert a.scaling_factor == b.scaling_factor


# ----------------------------------------------------------------------------------------------------------------
# Parameter layout
# ----------------------------------------------------------------------------------------------------------------

def test_sd_vae_state_dict_matches_ldm_fixture():
    fixture = _fixture("sd_vae_ldm.json")
    with torch.device("meta"):  # names and shapes only: no 83M-parameter allocation
        vae = models.KLVAE_models["sd-vae"]()
    shapes = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert shapes == fixture["shapes"]
    assert sum(p.numel() for p in vae.parameters()) == fixture["num_params"] == 83_653_863
    assert vae.scaling_factor == 0.18215
    assert models.KLVAE_models["sdxl-vae"]().scaling_factor == 0.13025


def test_diffusers_name_mapping_matches_fixture():
    ldm, diffusers = _fixture("sd_vae_ldm.json")["shapes"], _fixture("sd_vae_diffusers.json")["shapes"]
    mapped = {checkpoints.ldm_to_diffusers_name(k, 4): k for k in ldm}
    assert set(mapped) == set(diffusers)
    for d_name, l_name in mapped.items():
        l_shape = ldm[l_name]
        if ".attentions.0.to_" in d_name and d_name.endswith("weight"):
            assert l_shape == diffusers[d_name] + [1, 1]  # 1x1 conv [C, C, 1, 1] <-> Linear [C, C]
        else:
            assert l_shape == diffusers[d_name], d_name
        assert checkpoints.diffusers_to_ldm_name(d_name, 4) == l_name
    # older diffusers files: query/key/value/proj_attn name the same tensors as to_q/to_k/to_v/to_out.0
    for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")):
        name = f"decoder.mid_block.attentions.0.{new}.weight"
        assert checkpoints.diffusers_to_ldm_name(name.replace(new, old), 4) == checkpoints.diffusers_to_ldm_name(name, 4)


def test_exported_diffusers_state_dict_matches_fixture():
    with torch.device("meta"):
        vae = models.KLVAE_models["sd-vae"]()
    sd = checkpoints._ldm_to_diffusers_state_dict(vae.state_dict(), 4)
    assert {k: list(v.shape) for k, v in sd.items()} == _fixture("sd_vae_diffusers.json")["shapes"]


def test_tiny_config_is_f8_and_small():
    vae = models.KLVAE_models["tiny"]()
    assert 1e5 < sum(p.numel() for p in vae.parameters()) < 1e6
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        x_hat, posterior = vae(x)
    assert posterior.mean.shape == (2, 4, 8, 8) and x_hat.shape == x.shape
    assert vae.get_last_layer() is vae.decoder.conv_out.weight


def test_build_autoencoder_errors():
    with pytest.raises(KeyError, match="sd-vae"):
        models.build(models.KLVAE_models, "sd-vea")
    with pytest.raises(TypeError, match="chmult"):  # an unknown option of the constructor
        models.KLVAE(**dict(MICRO, chmult=[1, 2]))


# ----------------------------------------------------------------------------------------------------------------
# Building blocks vs closed forms
# ----------------------------------------------------------------------------------------------------------------

def test_downsample_pads_right_and_bottom():
    down = models.Downsample(1)
    x = torch.arange(36.0).view(1, 1, 6, 6)
    with torch.no_grad():
        down.conv.bias.zero_()
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # top-left tap reads x[2i, 2j]
        assert torch.equal(down(x)[0, 0], x[0, 0, 0::2, 0::2])
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 2, 2] = 1.0  # bottom-right tap reads x[2i + 2, 2j + 2], zero past the edge
        expected = torch.zeros(3, 3)
        expected[:2, :2] = x[0, 0, 2::2, 2::2]
        assert torch.equal(down(x)[0, 0], expected)


def test_upsample_is_nearest_then_conv():
    up = models.Upsample(1)
    x = torch.randn(1, 1, 3, 4)
    with torch.no_grad():
        up.conv.bias.zero_()
        up.conv.weight.zero_()
        up.conv.weight[0, 0, 1, 1] = 1.0  # identity kernel
        assert torch.equal(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = models.AttnBlock(32).eval()
    x = torch.randn(2, 32, 5, 3)
    with torch.no_grad():
        h = attn.norm(x)
        q, k, v = (F.conv2d(h, m.weight, m.bias).flatten(2) for m in (attn.q, attn.k, attn.v))  # (N, C, HW)
        w = torch.softmax(torch.einsum("nci,ncj->nij", q, k) / 32 ** 0.5, dim=-1)  # (N, HW_q, HW_k)
        out = torch.einsum("nij,ncj->nci", w, v).view_as(x)
        expected = x + F.conv2d(out, attn.proj_out.weight, attn.proj_out.bias)
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_posterior_matches_closed_forms():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    logvar[0, 0, 0, 0], logvar[0, 0, 0, 1] = -100.0, 100.0  # clamped to [-30, 20] as in LDM
    p = models.DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    clamped = logvar.clamp(-30, 20)
    assert p.logvar[0, 0, 0, 0] == -30 and p.logvar[0, 0, 0, 1] == 20
    torch.testing.assert_close(p.std, torch.exp(0.5 * clamped))
    torch.testing.assert_close(p.var, torch.exp(clamped))
    assert torch.equal(p.mode(), mean)
    q = torch.distributions.Normal(mean.double(), torch.exp(0.5 * clamped.double()))
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(dim=[1, 2, 3])
    torch.testing.assert_close(p.kl().double(), kl, rtol=1e-5, atol=1e-4)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(p.sample(torch.Generator().manual_seed(7)), mean + p.std * eps)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint round trips
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def micro():
    return _random_vae(), torch.rand(2, 3, 32, 32) * 2 - 1


def test_ldm_checkpoint_with_prefix_and_loss_keys(micro, tmp_path):
    vae, x = micro
    sd = {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    sd["loss.logvar"] = torch.zeros(())  # LDM training checkpoints: the loss module rides along
    sd["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)  # a whole SD checkpoint
    torch.save({"state_dict": sd, "global_step": 10, "epoch": 1}, tmp_path / "model.ckpt")
    loaded = checkpoints.load_autoencoder(str(tmp_path / "model.ckpt"))
    assert not loaded.training and loaded.config["ch_mult"] == [1, 2] and loaded.config["num_res_blocks"] == 1
    _assert_same_model(vae, loaded, x)


def test_plain_ldm_safetensors_with_vae_prefix(micro, tmp_path):
    vae, x = micro
    save_file({f"vae.{k}": v.contiguous() for k, v in vae.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    _assert_same_model(vae, checkpoints.load_autoencoder(str(tmp_path / "vae.safetensors")), x)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_save_ldm_round_trip(micro, tmp_path, suffix):
    vae, x = micro
    path = str(tmp_path / f"vae{suffix}")
    checkpoints.save_ldm(vae, path)
    if suffix == ".ckpt":
        assert set(torch.load(path, weights_only=True)["state_dict"]) == set(vae.state_dict())
    _assert_same_model(vae, checkpoints.load_autoencoder(path), x)


def test_tiny_preset_round_trips_with_its_config(tmp_path):
    # GroupNorm(8) cannot be read off tensor shapes: save_ldm and save_diffusers must carry it.
    vae, x = _random_vae("tiny"), torch.rand(1, 3, 64, 64) * 2 - 1
    checkpoints.save_ldm(vae, str(tmp_path / "tiny.safetensors"))
    checkpoints.save_diffusers(vae, str(tmp_path / "tiny_diffusers"))
    for path in ("tiny.safetensors", "tiny_diffusers"):
        loaded = checkpoints.load_autoencoder(str(tmp_path / path))
        assert loaded.config["norm_num_groups"] == 8
        _assert_same_model(vae, loaded, x)


def test_diffusers_folder_round_trip(micro, tmp_path):
    vae, x = micro
    folder = tmp_path / "vae_diffusers"
    checkpoints.save_diffusers(vae, str(folder))
    with open(folder / "config.json") as f:
        config = json.load(f)
    assert config["_class_name"] == "AutoencoderKL" and config["block_out_channels"] == [32, 64]
    assert config["layers_per_block"] == 1 and config["latent_channels"] == 4
    from safetensors.torch import load_file
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    # diffusers orders decoder levels coarse -> fine: up_blocks.0 is LDM's up.1 here, at the widest width (64).
    assert sd["decoder.up_blocks.0.upsamplers.0.conv.weight"].shape == (64, 64, 3, 3)
    assert torch.equal(sd["decoder.up_blocks.0.upsamplers.0.conv.weight"], vae.decoder.up[1].upsample.conv.weight)
    assert sd["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)
    _assert_same_model(vae, checkpoints.load_autoencoder(str(folder)), x)

    # The same folder with a .bin instead of .safetensors, and a scaling factor from config.json (eq-vae-ema: 0.0683).
    torch.save(sd, folder / "diffusion_pytorch_model.bin")
    os.remove(folder / "diffusion_pytorch_model.safetensors")
    config["scaling_factor"] = 0.0683
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    loaded = checkpoints.load_autoencoder(str(folder))
    assert loaded.scaling_factor == 0.0683
    for u, v in zip(_outputs(vae, x), _outputs(loaded, x)):
        assert torch.equal(u, v)


def test_single_diffusers_file_with_old_attention_names(micro, tmp_path):
    vae, x = micro
    folder = tmp_path / "d"
    checkpoints.save_diffusers(vae, str(folder))
    from safetensors.torch import load_file
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in sd.items():
        for new_name, old_name in old.items():
            k = k.replace(f".attentions.0.{new_name}.", f".attentions.0.{old_name}.")
        renamed[k] = v
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in renamed
    torch.save(renamed, tmp_path / "old_diffusers.bin")
    _assert_same_model(vae, checkpoints.load_autoencoder(str(tmp_path / "old_diffusers.bin")), x)
    save_file(sd, str(tmp_path / "new_diffusers.safetensors"))
    _assert_same_model(vae, checkpoints.load_autoencoder(str(tmp_path / "new_diffusers.safetensors")), x)


def test_own_checkpoints(micro, tmp_path):
    vae, x = micro
    # {"model", "config", ...}: the layout this project's scripts write
    torch.save({"model": vae.state_dict(), "config": vae.config, "step": 3}, tmp_path / "own.pt")
    _assert_same_model(vae, checkpoints.load_autoencoder(str(tmp_path / "own.pt")), x)
    # finetune checkpoint: "model" (+ "ema") and argparse "args", DDP-wrapped names; architecture from shapes
    ema = _random_vae(seed=1)
    args = argparse.Namespace(vae="sd-vae", lr=4.5e-6)
    torch.save({"model": {f"module.{k}": v for k, v in vae.state_dict().items()}, "ema": ema.state_dict(),
                "args": args, "step": 5}, tmp_path / "0000005.pt")
    _assert_same_model(vae, checkpoints.load_autoencoder(str(tmp_path / "0000005.pt")), x)
    _assert_same_model(ema, checkpoints.load_autoencoder(str(tmp_path / "0000005.pt"), ema=True), x)


# ----------------------------------------------------------------------------------------------------------------
# Loader errors
# ----------------------------------------------------------------------------------------------------------------

def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        checkpoints.load_autoencoder(str(tmp_path / "nowhere.ckpt"))
    (tmp_path / "vae.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        checkpoints.load_autoencoder(str(tmp_path / "vae.txt"))
    (tmp_path / "broken.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="broken.ckpt"):
        checkpoints.load_autoencoder(str(tmp_path / "broken.ckpt"))
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoints.load_autoencoder(str(tmp_path / "empty_folder"))
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an autoencoder"):
        checkpoints.load_autoencoder(str(tmp_path / "other.pt"))


def test_missing_and_unexpected_keys_are_named(micro, tmp_path):
    vae, _ = micro
    sd = dict(vae.state_dict())
    del sd["decoder.norm_out.bias"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    torch.save({"model": sd, "config": vae.config}, tmp_path / "bad.pt")
    with pytest.raises(KeyError) as e:
        checkpoints.load_autoencoder(str(tmp_path / "bad.pt"))
    assert "decoder.norm_out.bias" in str(e.value) and "decoder.extra.weight" in str(e.value)


def test_shape_mismatch_is_named(micro, tmp_path):
    vae, _ = micro
    sd = dict(vae.state_dict())
    sd["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    torch.save({"model": sd, "config": vae.config}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"quant_conv.weight.*\(8, 8, 3, 3\).*\(8, 8, 1, 1\)"):
        checkpoints.load_autoencoder(str(tmp_path / "bad.pt"))


def test_vq_checkpoints_go_to_the_vq_loader(micro, tmp_path, monkeypatch):
    vae, _ = micro
    sd = {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    sd["first_stage_model.quantize.embedding.weight"] = torch.zeros(16, 4)
    torch.save({"state_dict": sd}, tmp_path / "vq.ckpt")
    seen = {}

    def fake_loader(state_dict, source, **kwargs):
        seen["keys"], seen["source"] = set(state_dict), source
        return torch.nn.Identity()
    monkeypatch.setattr(checkpoints, "load_vqgan_from_state_dict", fake_loader)
    checkpoints.load_autoencoder(str(tmp_path / "vq.ckpt"))
    assert "quantize.embedding.weight" in seen["keys"] and seen["source"].endswith("vq.ckpt")


def test_maskgit_style_vqgan_folder_loads(tmp_path):
    """MaskGIT-pytorch ships its tokenizer as a folder with ckpts/last.ckpt and no config.json."""
    vq = models.VQGAN_models["tiny"]().eval()
    os.makedirs(tmp_path / "vqgan" / "ckpts")
    checkpoints.save_taming(vq, str(tmp_path / "vqgan" / "ckpts" / "last.ckpt"))
    loaded = checkpoints.load_autoencoder(str(tmp_path / "vqgan"))
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], vq(x)[0])


# ----------------------------------------------------------------------------------------------------------------
# PatchGAN discriminator
# ----------------------------------------------------------------------------------------------------------------

def test_discriminator_matches_taming_fixture():
    fixture = _fixture("patchgan_discriminator_taming.json")
    d = models.NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3)
    assert {k: list(v.shape) for k, v in d.state_dict().items()} == fixture["shapes"]
    # the fixture counts every state-dict element (BatchNorm running statistics included)
    assert sum(v.numel() for v in d.state_dict().values()) == fixture["num_params"]


def test_discriminator_output_shape_and_init():
    torch.manual_seed(0)
    d = models.NLayerDiscriminator().apply(models.weights_init)
    with torch.no_grad():
        # 256 -> 128 -> 64 -> 32 (k4 s2 p1), then two k4 s1 p1 convs: 31 -> 30, LDM's 30 x 30 patch logits
        assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
        assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    w = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, torch.nn.Conv2d)])
    bn = [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    g = torch.cat([m.weight for m in bn])
    assert abs(g.mean().item() - 1.0) < 5e-3 and abs(g.std().item() - 0.02) < 5e-3
    assert all(torch.all(m.bias == 0) for m in bn)


def test_hinge_d_loss_closed_form():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real): 0, 0.5, 2 -> mean 2.5 / 3
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake): 0, 1, 2 -> mean 1
    assert models.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))


# ----------------------------------------------------------------------------------------------------------------
# python checkpoints.py convert / inspect
# ----------------------------------------------------------------------------------------------------------------

def test_convert_ldm_to_diffusers_to_ldm_keeps_every_tensor(micro, tmp_path, capsys):
    vae, x = micro
    sd = {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    torch.save({"state_dict": {**sd, "loss.logvar": torch.zeros(())}}, tmp_path / "model.ckpt")
    checkpoints.main(["convert", str(tmp_path / "model.ckpt"), str(tmp_path / "diffusers"), "--to", "diffusers"])
    checkpoints.main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "back.ckpt"), "--to", "ldm"])
    back = torch.load(tmp_path / "back.ckpt", weights_only=True)["state_dict"]
    assert set(back) == set(vae.state_dict())  # LDM names again, without the loss.* tensors
    assert all(torch.equal(back[k], v) for k, v in vae.state_dict().items())
    with open(tmp_path / "diffusers" / "config.json") as f:
        assert json.load(f)["block_out_channels"] == [32, 64]
    capsys.readouterr()
    checkpoints.main(["inspect", str(tmp_path / "back.ckpt")])
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["family"] == "KLVAE" and info["format"] == "LDM / taming checkpoint"
    assert info["parameters"] == sum(p.numel() for p in vae.parameters())
    assert info["scaling_factor"] == 0.18215 and info["downsampling"] == 2 and info["latent_channels"] == 4


def test_convert_taming_vqgan_and_refuse_wrong_target(tmp_path, capsys):
    torch.manual_seed(0)
    vq = models.VQGAN_models["tiny"]().eval()
    torch.save({"state_dict": {**vq.state_dict(), "loss.discriminator.main.0.weight": torch.zeros(1)}},
               tmp_path / "last.ckpt")
    checkpoints.main(["convert", str(tmp_path / "last.ckpt"), str(tmp_path / "vq.ckpt"), "--to", "taming"])
    loaded = checkpoints.load_autoencoder(str(tmp_path / "vq.ckpt"))
    assert isinstance(loaded, models.VQGAN) and loaded.config == vq.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vq.state_dict().items())
    with pytest.raises(SystemExit, match="holds a VQGAN: convert it to taming, not diffusers"):
        checkpoints.main(["convert", str(tmp_path / "last.ckpt"), str(tmp_path / "d"), "--to", "diffusers"])
    with pytest.raises(SystemExit, match="no autoencoder checkpoint at"):
        checkpoints.main(["inspect", str(tmp_path / "missing.ckpt")])
    capsys.readouterr()
    checkpoints.main(["inspect", str(tmp_path / "vq.ckpt")])
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["family"] == "VQGAN" and info["codebook"] == "256 codes x 16" and info["downsampling"] == 8
