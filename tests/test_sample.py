"""sample.py for SiT, SiT + REPA and MaskGIT: family detection, published defaults, wiring, ADM .npz output."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import models
import sample
from helpers import perturb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup(family, args, vae, device):
    """A family's setup on the checkpoint args.ckpt names, read as sample.main reads it."""
    return family(args, vae, device, *sample.read_checkpoint(args.ckpt, args.weights))


def sample_args(**kw):
    """sample.py's options with everything a family may default left unset."""
    base = dict(ckpt=None, weights="ema", vae=None, image_size=64, num_classes=10, cfg_scale=None,
                cfg_all_channels=False, sampler=None, mode=None, num_sampling_steps=None, guidance_low=None,
                guidance_high=None, precision="fp32")
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return models.KLVAE_models["tiny"]().eval()


def test_sit_and_repa_are_told_apart_and_get_their_papers_defaults(tmp_path, tiny_vae):
    torch.manual_seed(1)
    sit = models.SiT_models["SiT-T/2"](input_size=8, num_classes=10)
    repa = models.SiT_models["SiT-T/2"](input_size=8, num_classes=10, encoder_depth=2, z_dims=[32], projector_dim=64)
    torch.save(sit.state_dict(), tmp_path / "sit.pt")    # official files are plain state dicts
    torch.save(repa.state_dict(), tmp_path / "repa.pt")

    a = sample_args(ckpt=str(tmp_path / "sit.pt"))
    setup(sample.setup_sit, a, tiny_vae, torch.device("cpu"))
    # SiT: dopri5 ODE (willisma/SiT train_utils.py parse_ode_args), cfg 1.5 (its README's FID 2.06).
    assert (a.mode, a.sampler, a.cfg_scale) == ("ode", "dopri5", 1.5)

    b = sample_args(ckpt=str(tmp_path / "repa.pt"))
    setup(sample.setup_sit, b, tiny_vae, torch.device("cpu"))
    # REPA: Euler-Maruyama SDE over 250 steps, cfg 1.8 inside the guidance interval t <= 0.7
    # (sihyun-yu/REPA generate.py and its README's evaluation command).
    assert (b.mode, b.num_sampling_steps, b.cfg_scale, b.guidance_high) == ("sde", 250, 1.8, 0.7)


def test_sit_generate_is_the_transport_sample_decoded(tmp_path, tiny_vae):
    """The images sample.py writes are D(x / scaling_factor) for the latents the REPA sampler integrates."""
    torch.manual_seed(2)
    repa = models.SiT_models["SiT-T/2"](input_size=8, num_classes=10, encoder_depth=2, z_dims=[32], projector_dim=64)
    perturb(repa, 0.02)  # the zero-initialised output layers would make every sample pure noise
    torch.save(repa.state_dict(), tmp_path / "repa.pt")
    args = sample_args(ckpt=str(tmp_path / "repa.pt"), num_sampling_steps=6, cfg_scale=2.0)
    generate = setup(sample.setup_sit, args, tiny_vae, torch.device("cpu"))
    labels = torch.tensor([3, 7])
    images = generate(labels, torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        x = models.sample_transport(repa.eval(), z, labels, family="repa", mode="sde", steps=6, cfg_scale=2.0,
                                    generator=g)
        expected = tiny_vae.decode(x / tiny_vae.scaling_factor)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)


def test_mismatched_autoencoder_is_named(tmp_path, tiny_vae):
    sit = models.SiT_models["SiT-T/2"](input_size=16, num_classes=10)  # trained for 128 px latents
    torch.save(sit.state_dict(), tmp_path / "sit.pt")
    with pytest.raises(ValueError, match="pass the autoencoder"):
        setup(sample.setup_sit, sample_args(ckpt=str(tmp_path / "sit.pt")), tiny_vae, torch.device("cpu"))


def test_maskgit_defaults_and_cfg_mapping(tmp_path, monkeypatch):
    torch.manual_seed(3)
    vq = models.VQGAN_models["tiny"]().eval()
    tm = models.build(models.MaskGIT_models, "maskgit-tiny", input_size=8, codebook_size=vq.quantize.n_embed, num_classes=10)
    torch.save({"model": tm.state_dict(), "ema": tm.state_dict(), "config": tm.config, "vqgan": None},
               tmp_path / "mg.pt")
    seen = {}

    def spy(model, y, **kw):
        seen.update(kw)
        return torch.zeros(len(y), 8, 8, dtype=torch.long)
    monkeypatch.setattr(models, "maskgit_sample", spy)
    args = sample_args(ckpt=str(tmp_path / "mg.pt"))
    generate = setup(sample.setup_maskgit, args, vq, torch.device("cpu"))
    images = generate(torch.tensor([0, 1]), torch.Generator())
    # Maskgit-pytorch's evaluation: 8 steps, guidance w = 3, i.e. (1 + w) c - w u = cfg scale 4.
    assert (args.sampler, args.num_sampling_steps, args.cfg_scale) == ("pytorch", 8, 4.0)
    assert seen["cfg_w"] == 3.0 and seen["steps"] == 8 and seen["variant"] == "pytorch"
    with torch.no_grad():
        torch.testing.assert_close(images, vq.decode_indices(torch.zeros(2, 8, 8, dtype=torch.long)))
    with pytest.raises(ValueError, match="VQ-GAN"):
        setup(sample.setup_maskgit, sample_args(ckpt=str(tmp_path / "mg.pt")), models.KLVAE_models["tiny"](),
                             torch.device("cpu"))


def test_maskgit_end_to_end_npz(tmp_path):
    """sample.py as a user runs it: N images in the ADM layout, the VQ-GAN found through the checkpoint."""
    torch.manual_seed(4)
    vq = models.VQGAN_models["tiny"]().eval()
    checkpoints.save_taming(vq, str(tmp_path / "vq.ckpt"))
    tm = models.build(models.MaskGIT_models, "maskgit-tiny", input_size=8, codebook_size=vq.quantize.n_embed, num_classes=10)
    torch.save({"model": tm.state_dict(), "ema": tm.state_dict(), "config": tm.config,
                "vqgan": str(tmp_path / "vq.ckpt")}, tmp_path / "mg.pt")
    cmd = [sys.executable, "sample.py", "--model", "maskgit-tiny", "--ckpt", str(tmp_path / "mg.pt"),
           "--image-size", "64", "--num-classes", "10", "--num-samples", "3", "--per-proc-batch-size", "2",
           "--num-sampling-steps", "3", "--sample-dir", str(tmp_path / "s")]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    (npz,) = [p for p in os.listdir(tmp_path / "s") if p.endswith(".npz")]
    out = np.load(tmp_path / "s" / npz)
    assert out["arr_0"].shape == (3, 64, 64, 3) and out["arr_0"].dtype == np.uint8 and out["arr_1"].max() < 10
    assert os.path.exists(tmp_path / "s" / (npz[:-4] + ".png"))
    # --out names the .npz (the grid goes beside it); --save-png also writes the images as a folder of PNGs, the
    # same pixels, for pytorch-fid / clean-fid / torch-fidelity. The shards are reused: nothing is sampled again.
    subprocess.run(cmd + ["--out", str(tmp_path / "named" / "samples.npz"), "--save-png", str(tmp_path / "png")],
                   cwd=ROOT, check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    named = np.load(tmp_path / "named" / "samples.npz")
    np.testing.assert_array_equal(named["arr_0"], out["arr_0"])
    assert os.path.exists(tmp_path / "named" / "samples.png")
    assert sorted(os.listdir(tmp_path / "png")) == ["000000.png", "000001.png", "000002.png"]
    pngs = np.stack([np.asarray(Image.open(tmp_path / "png" / f"{i:06d}.png")) for i in range(3)])
    np.testing.assert_array_equal(pngs, out["arr_0"])
