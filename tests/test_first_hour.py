"""A new user's first hour: the main job on the shipped base and its summary, the tiny chain finetune -> train_dit
-> sample -> evaluate, run folders that never collide, offline evaluation, the upstream option names, hub IDs from
the local cache, and one clean line for every user error."""
import glob
import json
import math
import os
import re

import numpy as np
import pytest
import torch

import checkpoints
import data
import evaluate
import finetune_eqvae as fe
import models
import sample
import train_dit
import train_sit
from helpers import run_script

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL_FT = ["--max-steps", "4", "--num-images", "64", "--global-batch-size", "4", "--val-images", "16",
            "--ckpt-every", "4", "--preview-every", "2", "--val-every", "4", "--log-every", "2"]


def psnr_by_hand(a, b):
    """Mean over images of 10 log10(255^2 / MSE) on uint8 (a, b in [-1, 1]), written out with numpy."""
    to8 = lambda t: np.clip(np.floor(t.numpy().astype(np.float64) * 127.5 + 128), 0, 255)  # data.to_uint8's rule
    mse = ((to8(a) - to8(b)) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(255.0 ** 2 / mse)))


def rotation_error_by_hand(vae, x):
    """App. C.3's rotation error with the posterior mean: mean over k = 1, 2, 3 quarter turns and images of
    ||rot_k E(x) - E(rot_k x)||^2 / ||E(rot_k x)||^2."""
    with torch.no_grad():
        ex = vae.encode(x).mean
        errs = []
        for k in (1, 2, 3):
            etx = vae.encode(torch.rot90(x, k, (2, 3))).mean
            errs.append(((torch.rot90(ex, k, (2, 3)) - etx) ** 2).flatten(1).sum(1) / (etx ** 2).flatten(1).sum(1))
    return float(torch.stack(errs).mean())


def test_main_job_fine_tunes_the_shipped_base_and_says_what_changed(tmp_path):
    """--preset tiny starts from assets/tiny-kl-f8 with its PatchGAN and ends with base vs fine-tuned equivariance
    error, PSNR and SSIM on held-out images, numbers that an independent computation reproduces."""
    out = run_script(["finetune_eqvae.py", "--preset", "tiny", "--results-dir", str(tmp_path), *SMALL_FT])
    log = out.stdout + out.stderr
    assert "discriminator: restored from the init file" in log
    assert "Loss: L1 + no LPIPS (--perceptual-weight 0) + KL x 1e-06 + no PatchGAN (--disc-weight 0)" in log  # says so
    run = tmp_path / "000-eqvae-tiny-kl-f8"
    summary = json.loads((run / "summary.json").read_text())
    line = next(ln for ln in log.splitlines() if "Summary on 16 held-out images (base -> fine-tuned)" in ln)
    b, a = summary["base"], summary["fine_tuned"]
    assert f"rotation {b['eq_err_rot']:.3f} -> {a['eq_err_rot']:.3f}" in line and f"PSNR {b['psnr']:.2f} -> " in line
    assert f"Previews: {run / 'previews'}" in line and f"summary.json: {run}" in line
    # The held-out images: synthetic seed 1, never trained on; the base file and the export, read back.
    held = data.build_dataset("synthetic", 64, "resize_center", num_images=16, seed=1)
    x = torch.stack([held[i][0] for i in range(16)])
    for key, path in (("base", checkpoints.TINY_BASE["kl"]), ("fine_tuned", str(run / "eqvae.ckpt"))):
        vae = checkpoints.load_autoencoder(path).eval()
        with torch.no_grad():
            recon = vae.decode(vae.encode(x).mean)
        assert math.isclose(summary[key]["psnr"], psnr_by_hand(recon, x), abs_tol=1e-3), key
        assert math.isclose(summary[key]["eq_err_rot"], rotation_error_by_hand(vae, x), rel_tol=1e-3), key
    assert a != b
    previews = sorted(os.listdir(run / "previews"))
    assert previews[0] == "0000000.png" and previews[-1] == "0000004.png"  # the base first, the same images


def test_tiny_chain_end_to_end_without_vae_at_sampling(tmp_path):
    """finetune -> train_dit on its export -> sample.py with only --ckpt (the autoencoder, the model and its
    latent normalisation come from the checkpoint) -> evaluate.py recon offline."""
    res = str(tmp_path / "results")
    run_script(["finetune_eqvae.py", "--preset", "tiny", "--results-dir", res, *SMALL_FT])
    export = os.path.join(res, "000-eqvae-tiny-kl-f8", "eqvae.ckpt")
    run_script(["train_dit.py", "--preset", "tiny", "--vae", export, "--results-dir", res, "--max-steps", "4",
                "--ckpt-every", "4", "--num-images", "32", "--global-batch-size", "8"])
    ckpt = os.path.join(res, "001-DiT-T-2", "checkpoints", "0000004.pt")
    common = ["--ckpt", ckpt, "--num-samples", "8", "--per-proc-batch-size", "8", "--num-sampling-steps", "2",
              "--image-size", "64", "--num-classes", "10"]
    own = sample.main(sample.get_args(common + ["--sample-dir", str(tmp_path / "own")]))
    same = sample.main(sample.get_args(common + ["--sample-dir", str(tmp_path / "same"), "--vae", export]))
    other = sample.main(sample.get_args(common + ["--sample-dir", str(tmp_path / "other"),
                                                  "--vae", checkpoints.TINY_BASE["kl"]]))
    load = lambda d: np.load(d + ".npz")["arr_0"]
    assert np.array_equal(load(own), load(same)) and not np.array_equal(load(own), load(other))
    # A --model that contradicts the checkpoint is refused rather than silently used.
    with pytest.raises(ValueError, match="DiT-T/2"):
        sample.main(sample.get_args(common + ["--model", "DiT-S/2", "--sample-dir", str(tmp_path / "bad")]))
    out = run_script(["evaluate.py", "recon", "--preset", "tiny", "--vae", export, "--num-images", "16"])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["psnr"] > 10 and result.get("rfid") is None and "skipped" in out.stderr


def test_two_runs_of_one_model_on_two_autoencoders(tmp_path):
    """results/NNN-name: a second DiT-T/2 run on another autoencoder gets its own folder; --resume auto continues
    the run made with the same autoencoder."""
    base = ["--preset", "tiny", "--results-dir", str(tmp_path), "--num-images", "16", "--global-batch-size", "4",
            "--max-steps", "2", "--ckpt-every", "2"]
    first = train_dit.main(train_dit.get_args(base + ["--vae", checkpoints.TINY_BASE["kl"]]))
    second = train_dit.main(train_dit.get_args(base + ["--vae", "tiny"]))       # random weights, another latent space
    assert os.path.basename(first) == "000-DiT-T-2" and os.path.basename(second) == "001-DiT-T-2"
    more = [a if a != "2" or base[i - 1] != "--max-steps" else "4" for i, a in enumerate(base)]
    again = train_dit.main(train_dit.get_args(more + ["--vae", checkpoints.TINY_BASE["kl"], "--resume", "auto"]))
    assert again == first and os.path.isfile(os.path.join(first, "checkpoints", "0000004.pt"))
    assert "Resumed from" in open(os.path.join(first, "log.txt")).read()


def test_every_evaluate_subcommand_runs_offline_with_preset_tiny(tmp_path, monkeypatch, capsys):
    """No weights on disk (an empty torch hub cache): metrics that need them are skipped with a note naming the
    file; everything else is computed."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vae = checkpoints.TINY_BASE["kl"]
    imgs = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=imgs)
    runs = {"fid": [str(tmp_path / "s.npz"), str(tmp_path / "s.npz")],
            "stats": [str(tmp_path / "s.npz"), "--out", str(tmp_path / "ref.npz")],
            "recon": ["--vae", vae], "equivariance": ["--vae", vae], "id": ["--vae", vae],
            "latents": ["--vae", vae, "--out", str(tmp_path / "lat")], "latent-stats": ["--vae", vae],
            "alignment": ["--vae", vae]}
    for cmd, extra in runs.items():
        evaluate.main([cmd, "--preset", "tiny", *extra] + (["--num-images", "32"] if "--vae" in extra else []))
        captured = capsys.readouterr()
        result = json.loads(captured.out.strip().splitlines()[-1])
        if cmd in ("fid", "stats"):
            assert "skipped" in captured.err and "pt_inception-2015-12-05" in captured.err, cmd
        elif cmd == "recon":
            assert result["psnr"] > 10 and result.get("rfid") is None and result.get("lpips") is None
            assert "vgg16-397923af.pth" in captured.err or "--lpips-vgg" in captured.err
        else:
            assert result, cmd
    # Without --preset the missing file is an error that names the flag supplying it.
    with pytest.raises(FileNotFoundError, match="--inception"):
        evaluate.main(["fid", str(tmp_path / "s.npz"), str(tmp_path / "s.npz")])


def test_upstream_spellings_parse_to_the_same_arguments():
    """DiT's / SiT's / REPA's option names mean ours."""
    same = lambda get, a, b: vars(get(["--preset", "tiny"] + a)) == vars(get(["--preset", "tiny"] + b))
    assert same(train_dit.get_args, ["--data-path", "/d"], ["--data", "/d"])
    assert same(train_sit.get_args, ["--data-dir", "/d"], ["--data", "/d"])
    assert same(train_dit.get_args, ["--mixed-precision", "bf16"], ["--precision", "bf16"])
    assert same(train_sit.get_args, ["--mixed-precision", "no"], ["--precision", "fp32"])
    assert same(train_sit.get_args, ["--path-type", "linear"], ["--path-type", "Linear"])
    assert same(train_sit.get_args, ["--enc-type", "dinov2-vit-b"], ["--dinov2-model", "dinov2_vitb14"])
    assert same(sample.get_args, ["--num-fid-samples", "100", "--ckpt", "x"], ["--num-samples", "100", "--ckpt", "x"])
    assert train_dit.get_args(["--preset", "tiny", "--epochs", "3"]).epochs == 3
    assert checkpoints.HUB_ALIASES["ema"] == "stabilityai/sd-vae-ft-ema"  # DiT's --vae ema / mse


def test_hub_id_resolved_from_a_local_cache(tmp_path, monkeypatch):
    """models--org--name/refs/main + snapshots/<rev>/, as huggingface_hub lays out its cache; DiT's alias 'ema';
    an ID that is not there is a message saying where it was looked for and what to do."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    vae = models.KLVAE_models["tiny"]()
    for repo in ("zelaki--eq-vae", "stabilityai--sd-vae-ft-ema"):
        (cache / f"models--{repo}" / "refs").mkdir(parents=True)
        (cache / f"models--{repo}" / "refs" / "main").write_text("0123abcd\n")
        checkpoints.save_diffusers(vae, str(cache / f"models--{repo}" / "snapshots" / "0123abcd"))
    for spec in ("zelaki/eq-vae", "ema"):
        got = checkpoints.load_autoencoder(spec)
        assert all(torch.equal(v, got.state_dict()[k]) for k, v in vae.state_dict().items()), spec
    with pytest.raises(FileNotFoundError) as e:
        checkpoints.load_autoencoder("zelaki/not-there")
    assert str(cache / "models--zelaki--not-there") in str(e.value) and "huggingface-cli download" in str(e.value)


@pytest.mark.parametrize("argv, status, says", [
    (["train_dit.py", "--preset", "tiny", "--vae", "zelaki/not-there"], 1, "--vae zelaki/not-there"),
    (["finetune_eqvae.py", "--preset", "tiny", "--init", "/nope/model.ckpt"], 1, "/nope/model.ckpt"),
    (["sample.py", "--ckpt", "/nope/0000100.pt"], 1, "/nope/0000100.pt"),
    (["evaluate.py", "recon", "--vae", "/nope/vae", "--data", "synthetic"], 1, "/nope/vae"),
    (["train_maskgit.py", "--preset", "tiny", "--vqgan", "/nope/vqgan.ckpt"], 1, "/nope/vqgan.ckpt"),
    (["train_sit.py", "--preset", "tiny", "--path-type", "spiral"], 2, "--path-type"),
])
def test_a_user_error_is_one_clean_line_and_leaves_no_run_folder(tmp_path, argv, status, says):
    env_dir = ["--results-dir", str(tmp_path)] if argv[0] != "evaluate.py" and argv[0] != "sample.py" else []
    out = run_script(argv + env_dir, check=False)
    err = out.stderr.strip().splitlines()
    assert out.returncode == status, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and says in err[-1], out.stderr[-2000:]
    if status == 1:
        assert err[-1].startswith("error: ")
    assert not glob.glob(str(tmp_path / "[0-9][0-9][0-9]-*")), os.listdir(tmp_path)


def test_every_option_of_every_script_has_help(monkeypatch, capsys):
    """--help of each stage script and tool: every option says what it does (presets say what they set)."""
    import argparse
    import curves
    import demo
    import train_maskgit
    seen = []
    real = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, args=None, namespace=None: seen.append(self) or real(self, args, namespace))
    for call in (fe.parse_args, train_dit.get_args, train_sit.get_args, train_maskgit.parse_args, sample.get_args,
                 evaluate.main, curves.get_args, demo.main, checkpoints.main):
        with pytest.raises(SystemExit):
            call(["--help"])
    capsys.readouterr()

    def undocumented(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from (f"{name} {flag}" for flag in undocumented(sub))
            elif action.option_strings and not action.help and "-h" not in action.option_strings:
                yield action.option_strings[0]
    assert len(seen) == 9
    missing = [f"{p.prog}: {flag}" for p in seen for flag in undocumented(p)]
    assert not missing, missing
    text = " ".join(fe.get_parser().format_help().split())
    assert "tiny: --data synthetic" in text and "--init assets/tiny-kl-f8.safetensors" in text and "--max-steps 400" in text
