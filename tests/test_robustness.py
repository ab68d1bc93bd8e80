"""Nothing silently wrong, nothing lost: each defect found by attacking the stages, reproduced on its real code path.
The training runs are tiny (a few steps of the tiny presets); each test fails on the code before the fix."""
import json
import os
import subprocess
import sys
import time
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import data
import models
import sample
import train_dit
import train_utils as tu
from helpers import ROOT, run_script

DIT = ["--preset", "tiny", "--num-images", "16", "--global-batch-size", "4", "--log-every", "1"]


def dit_run(results, *extra, exp="run"):
    """train_dit.py in this process (tiny, 16 images, batch 4); returns the run folder."""
    return train_dit.main(train_dit.get_args(DIT + ["--results-dir", str(results), "--exp-name", exp, *extra]))


@pytest.fixture(scope="module")
def dit_ckpt(tmp_path_factory):
    """A 2-step tiny DiT run: (run folder, its last checkpoint)."""
    folder = dit_run(tmp_path_factory.mktemp("dit"), "--max-steps", "2", "--ckpt-every", "2")
    return folder, os.path.join(folder, "checkpoints", "0000002.pt")


def sample_args(ckpt, out, *extra):
    return sample.get_args(["--preset", "tiny", "--ckpt", ckpt, "--sample-dir", str(out), "--num-samples", "2",
                            "--num-sampling-steps", "2", *extra])


# ------------------------------------------------------------------------------------------- silent wrong results

def test_1_sample_shards_are_reused_only_by_the_same_recipe(dit_ckpt, tmp_path):
    folder, ckpt = dit_ckpt
    # Run B: another run's checkpoint of the same name, sampled into the same folder.
    other = dit_run(tmp_path / "b", "--max-steps", "2", "--ckpt-every", "2", "--global-seed", "5")
    out_a = sample.main(sample_args(ckpt, tmp_path / "s"))
    out_b = sample.main(sample_args(os.path.join(other, "checkpoints", "0000002.pt"), tmp_path / "s"))
    assert out_a != out_b  # a folder per recipe: B never gets A's images
    a, b = (np.load(f"{o}.npz")["arr_0"] for o in (out_a, out_b))
    assert not np.array_equal(a, b)
    # A shard of another recipe under this recipe's name (a renamed folder, say) is refused, naming what differs.
    os.replace(os.path.join(out_b, "000000.npz"), os.path.join(out_a, "000000.npz"))
    with pytest.raises(ValueError, match="drawn with other settings.*ckpt"):
        sample.main(sample_args(ckpt, tmp_path / "s"))


def test_2_latent_cache_knows_the_dataset_that_built_it(tmp_path):
    vae = models.KLVAE_models["tiny"]().eval()
    synthetic = data.build_dataset("synthetic", 64, "center", num_images=4)
    data.build_latent_cache(vae, synthetic, str(tmp_path / "cache"), 64, shard_size=4)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):  # an ImageFolder of the same size
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    images = data.build_dataset(str(folder), 64, "center")
    with pytest.raises(ValueError, match="data_sha256"):
        data.build_latent_cache(vae, images, str(tmp_path / "cache"), 64, shard_size=4)


def test_3_sample_refuses_a_model_name_the_checkpoint_contradicts(dit_ckpt, tmp_path):
    _, ckpt = dit_ckpt
    with pytest.raises(ValueError, match="--model SiT-T/2, but .* was trained as DiT-T/2"):
        sample.main(sample_args(ckpt, tmp_path, "--model", "SiT-T/2"))
    # One factor given: the other keeps the value the model was trained with (not the file's), and the log says so.
    out = run_script(["sample.py", "--preset", "tiny", "--ckpt", ckpt, "--sample-dir", str(tmp_path / "s"),
                      "--num-samples", "2", "--num-sampling-steps", "2", "--shift-factor", "0"])
    said = out.stdout + out.stderr
    assert "Latent normalisation {'scaling_factor': 0.311" in said and "'shift_factor': 0.0" in said, said[-3000:]
    assert "not the {'scaling_factor': 0.311" in said and "'shift_factor': -0.319" in said


def test_4_resume_with_another_lr_applies_it_and_says_so(tmp_path, caplog):
    dit_run(tmp_path, "--max-steps", "2", "--ckpt-every", "2", "--lr", "1e-3")
    folder = dit_run(tmp_path, "--max-steps", "3", "--ckpt-every", "1", "--lr", "2e-4", "--resume", "auto")
    state = torch.load(os.path.join(folder, "checkpoints", "0000003.pt"), weights_only=True)
    assert {g["lr"] for g in state["opt"]["param_groups"]} == {2e-4}
    with open(os.path.join(folder, "log.txt")) as f:
        assert "Learning rate of opt: 0.001 in the checkpoint, 0.0002 from now on" in f.read()
    # Another latent normalisation would feed the model other inputs: refused, naming both.
    with pytest.raises(ValueError, match=r"its vae_norm is \{'scaling_factor': 0.311.* this run's is "
                                         r"\{'scaling_factor': 0.5"):
        dit_run(tmp_path, "--max-steps", "4", "--scaling-factor", "0.5", "--resume", "auto")


def test_5_16_bit_pngs_bad_counts_and_a_second_run_in_one_folder(tmp_path):
    # A 16-bit grayscale PNG (PIL mode I;16): scaled to 8 bits, not clipped at 255.
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "16bit.png")
    ds = data.ImageFolder(str(tmp_path), transform=None)
    got = np.asarray(ds[0][0])[..., 0].astype(int)
    np.testing.assert_array_equal(got, np.floor(ramp / 257 + 0.5).astype(int))
    assert (got == 255).mean() < 0.01  # PIL's own convert("RGB") saturates almost every pixel
    # --num-images 0 or -5 is a usage error (exit 2), not silently "all images".
    for bad in ("0", "-5"):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "train_dit.py"), *DIT, "--num-images", bad],
                             capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 2 and "must be at least 1" in out.stderr
    # Two runs in one run folder: the second is refused, naming the first.
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import train_utils; "
                               f"train_utils._lock_run_folder({str(tmp_path)!r}); print('locked', flush=True); "
                               f"import time; time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FileExistsError, match=rf"in use by pid {holder.pid} on"):
            tu._lock_run_folder(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    tu._lock_run_folder(str(tmp_path))  # the holder died: its lock is free again
    # Two runs starting at once on one new folder: the one that finds it locked leaves the other's folder alone.
    run = tmp_path / "results" / "race"
    holder = subprocess.Popen([sys.executable, "-c", f"import os, sys; sys.path.insert(0, {ROOT!r}); import "
                               f"train_utils; os.makedirs({str(run)!r}); train_utils._lock_run_folder({str(run)!r}); "
                               f"print('locked', flush=True); import time; time.sleep(30)"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        real_isdir = os.path.isdir
        os.path.isdir = lambda p: False if os.path.abspath(p) == str(run) else real_isdir(p)  # it looked first
        try:
            with pytest.raises(SystemExit, match="in use by"):
                tu.run_main(lambda a: tu.setup_experiment(str(run.parent), "x", None, tu.setup_distributed(), "fp32",
                                                          a), train_dit.get_args(DIT + ["--exp-name", "race"]))
        finally:
            os.path.isdir = real_isdir
        assert run.is_dir()  # the first run's folder is still there
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------------------------- lost or blocked work

def test_6_a_partial_metrics_line_is_dropped_with_a_warning(tmp_path):
    log = tu.MetricsLog(str(tmp_path / "metrics.jsonl"))
    log.write(1, loss=1.0)
    log.write(2, loss=0.5)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # the disk filled up mid-line
    with pytest.warns(UserWarning, match="not complete JSON"):
        log.truncate_after(2)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]


def test_7_resume_auto_falls_back_past_a_corrupt_newest_checkpoint(tmp_path):
    for step in (2, 4):
        torch.save({"model": {}, "step": step}, tmp_path / f"{step:07d}.pt")
    with open(tmp_path / "0000004.pt", "r+b") as f:
        f.truncate(100)  # a copy cut short, a disk error
    with pytest.warns(UserWarning, match=r"0000004.pt cannot be read .* resuming from the older .*0000002.pt"):
        assert tu.resolve_resume("auto", str(tmp_path)).endswith("0000002.pt")
    # A real run: it continues from step 2 (the newer, unreadable file is shelved) and its log.txt says why.
    folder = dit_run(tmp_path / "runs", "--max-steps", "4", "--ckpt-every", "2", "--keep-last", "0")
    with open(os.path.join(folder, "checkpoints", "0000004.pt"), "r+b") as f:
        f.truncate(100)
    dit_run(tmp_path / "runs", "--max-steps", "5", "--ckpt-every", "5", "--resume", "auto")
    log = open(os.path.join(folder, "log.txt")).read()
    assert "Warning: --resume auto: " in log and "Resumed from" in log and "0000002.pt at step 2" in log


def test_8_leftovers_of_a_killed_save_go_and_writes_are_synced_and_atomic(tmp_path, monkeypatch):
    ckpts, run = tmp_path / "run" / "checkpoints", tmp_path / "run"
    ckpts.mkdir(parents=True)
    (run / "ema").mkdir()
    (ckpts / "0000002.pt.tmp.99999").write_bytes(b"x" * 1000)  # kill -9 during torch.save
    (run / "ema" / "0000002.pt.tmp.99999").write_bytes(b"x" * 1000)  # ... during the EMA export
    (run / "diffusers.old.99999").mkdir()  # ... between atomic_folder's two renames: the old export moved aside,
    (run / "diffusers.old.99999" / "config.json").write_text("old")
    (run / "diffusers.tmp.99999").mkdir()  # the new one complete
    (run / "diffusers.tmp.99999" / "config.json").write_text("new")
    dist = tu.setup_distributed()
    tu.setup_experiment(str(tmp_path), "x", None, dist, "fp32", train_dit.get_args(DIT + ["--exp-name", "run"]))
    assert "Warning: removed what writes killed midway left behind" in (run / "log.txt").read_text()  # said there
    assert os.listdir(ckpts) == [] and os.listdir(run / "ema") == []
    assert (run / "diffusers" / "config.json").read_text() == "new" and not list(run.glob("diffusers.*"))
    (ckpts / "0000004.pt.tmp.99999").write_bytes(b"x")
    with pytest.warns(UserWarning, match="writes killed midway"):
        tu.prune_checkpoints(str(ckpts), 2)  # and on prune
    assert os.listdir(ckpts) == []
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    tu.save_checkpoint({"step": 1}, str(ckpts / "0000001.pt"))
    assert synced  # the data reach the disk before the rename makes them the checkpoint
    # An export that fails midway leaves the previous export whole.
    vae = models.KLVAE_models["tiny"]().eval()
    checkpoints.save_diffusers(vae, str(tmp_path / "export"))
    before = sorted(os.listdir(tmp_path / "export"))

    def broken(sd, path, metadata=None):
        open(path, "wb").write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="the disk is full|No space"):
        checkpoints.save_diffusers(vae, str(tmp_path / "export"))
    assert sorted(os.listdir(tmp_path / "export")) == before
    assert checkpoints.load_autoencoder(str(tmp_path / "export")) is not None


def test_9_a_rollback_keeps_what_it_saves_and_shelves_the_abandoned_branch(tmp_path):
    folder = dit_run(tmp_path, "--max-steps", "6", "--ckpt-every", "2", "--keep-last", "0")
    dit_run(tmp_path, "--max-steps", "3", "--ckpt-every", "1", "--keep-last", "1",
            "--resume", os.path.join(folder, "checkpoints", "0000002.pt"))
    ckpts = os.path.join(folder, "checkpoints")
    assert [os.path.basename(p) for p in tu.list_checkpoints(ckpts)] == ["0000003.pt"]
    (shelf,) = [d for d in os.listdir(ckpts) if d.startswith("abandoned-")]
    assert sorted(os.listdir(os.path.join(ckpts, shelf))) == ["0000004.pt", "0000006.pt", "ema"]
    # The abandoned steps' EMA exports (what sample.py and curves.py read) go with them:
    assert sorted(os.listdir(os.path.join(ckpts, shelf, "ema"))) == ["0000004.pt", "0000006.pt"]
    assert sorted(os.listdir(os.path.join(folder, "ema"))) == ["0000002.pt", "0000003.pt"]
    log = open(os.path.join(folder, "log.txt")).read()
    assert log.count("an abandoned branch") == 1
    dit_run(tmp_path, "--max-steps", "4", "--ckpt-every", "1", "--keep-last", "1", "--resume", "auto")
    assert open(os.path.join(folder, "log.txt")).read().count("an abandoned branch") == 1  # said once, when it moved


def test_10_and_11_checkpoints_open_weights_only_and_the_default_keeps_the_disk(dit_ckpt):
    folder, ckpt = dit_ckpt
    state = torch.load(ckpt, weights_only=True)  # as DiT's and REPA's own loading code opens it
    assert set(state) >= {"model", "ema", "opt", "rng", "loader", "args", "vae", "vae_norm"}
    assert train_dit.get_args(DIT).keep_last == 2  # full checkpoints (10.8 GB each at XL/2) kept: 2
    ema = torch.load(os.path.join(folder, "ema", "0000002.pt"), weights_only=True)  # ... and every EMA export
    assert set(ema) == {"ema", "args", "step", "vae", "vae_norm"}
    assert all(torch.equal(ema["ema"][k], v) for k, v in state["ema"].items())
    weights, recorded = sample.read_checkpoint(os.path.join(folder, "ema", "0000002.pt"), "ema")
    assert recorded["model"] == "DiT-T/2" and set(weights) == set(state["ema"])


# ------------------------------------------------------------------------------------------------ unclear messages

def test_disk_full_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "0000001.pt")
    tu.save_checkpoint({"step": 1}, path)

    def full(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 1234")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"could not write .*0000001.pt: the disk is full; the previous file is intact"):
        tu.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True)["step"] == 1 and os.listdir(tmp_path) == ["0000001.pt"]
    # A new step's file: the message names the newest checkpoint a resume continues from.
    with pytest.raises(OSError, match=r"0000002.pt: the disk is full; nothing was written. .* The run's newest "
                                      r"checkpoint, .*0000001.pt, is intact"):
        tu.save_training_checkpoint(str(tmp_path), 2, model={})
    with pytest.raises(OSError, match=r"could not append to .*metrics.jsonl"):
        log = tu.MetricsLog(str(tmp_path / "metrics.jsonl"))
        os.makedirs(log.path)  # (a path that cannot be appended to)
        log.write(1, loss=1.0)


def test_symlink_loops_corrupt_files_and_bad_options_are_named(tmp_path):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a" / "x.png")
    os.symlink("loop", tmp_path / "imgs" / "loop")                # ELOOP
    os.symlink("..", tmp_path / "imgs" / "a" / "up")               # a cycle
    with pytest.warns(UserWarning, match="skipping .*loop"):
        assert len(data.ImageFolder(str(tmp_path / "imgs"))) == 1
    (tmp_path / "imgs" / "b").mkdir()  # a second class: the cycle through the root must not list b's image under a
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "b" / "y.png")
    with pytest.warns(UserWarning, match="up: it leads to the dataset root or another class folder"):
        ds = data.ImageFolder(str(tmp_path / "imgs"))
    assert [(os.path.relpath(p, ds.root), label) for p, label in ds.samples] == [("a/x.png", 0), ("b/y.png", 1)]
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="bad.pt"):
        tu.load_checkpoint(str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="bad.pt"):
        checkpoints.load_autoencoder(str(tmp_path / "bad.pt"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    import evaluate
    with pytest.raises(ValueError, match="bad.npz is not an .npz archive"):
        data.open_images(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(3), sigma=np.eye(3))
    with open(tmp_path / "ref.npz", "r+b") as f:
        f.truncate(50)  # a download cut short
    for path in ("bad.npz", "ref.npz"):
        with pytest.raises(ValueError, match=f"{path} cannot be read as a numpy"):
            evaluate.read_reference(str(tmp_path / path))
    vae = models.KLVAE_models["tiny"]()
    with pytest.raises(ValueError, match="--image-size 60 is not a multiple of 8 .*use 56 or 64"):
        tu.check_resolution(60, vae)


@pytest.mark.parametrize("argv, code, says", [
    (["train_dit.py", "--preset", "tiny", "--ckpt-every", "0"], 2, "--ckpt-every: must be at least 1"),
    (["sample.py", "--ckpt", "/no/such.pt"], 1, "error: --ckpt /no/such.pt: no such file"),
    (["finetune_eqvae.py", "--preset", "tiny", "--resolution", "60", "--max-steps", "1"], 1,
     "--resolution 60 is not a multiple of 8"),
    (["evaluate.py", "recon", "--preset", "tiny", "--vae", "VAE", "--precision", "fp16", "--no-fid", "--no-lpips"],
     1, "--precision fp16 needs a CUDA device"),
])
def test_user_errors_are_one_line(argv, code, says, tmp_path):
    checkpoints.save_ldm(models.KLVAE_models["tiny"](), str(tmp_path / "vae.ckpt"))
    argv = [a.replace("VAE", str(tmp_path / "vae.ckpt")) for a in argv] + (["--results-dir", str(tmp_path)] if
                                                                           argv[0] != "evaluate.py" and argv[0] != "sample.py" else [])
    out = run_script(argv, check=False, env={"CUDA_VISIBLE_DEVICES": ""})  # the CPU's answers on any machine
    assert out.returncode == code, out.stderr[-2000:]
    assert says in out.stderr and "Traceback" not in out.stderr


def test_nan_message_says_whether_the_last_checkpoint_is_sound(tmp_path):
    with pytest.raises(tu.NonFiniteLossError, match=r"largest weight is .* \(diverged already: resume from an older"):
        dit_run(tmp_path, "--max-steps", "5", "--ckpt-every", "1", "--lr", "1e30")
    # The message speaks of this run's checkpoints only: not another run's, and a resumed one's counts.
    ok = dit_run(tmp_path, "--max-steps", "2", "--ckpt-every", "2", exp="ok")
    with pytest.raises(tu.NonFiniteLossError, match="no checkpoint was saved by this run"):
        dit_run(tmp_path, "--max-steps", "5", "--ckpt-every", "100", "--lr", "1e30", exp="other")
    with pytest.raises(tu.NonFiniteLossError, match=r"the last checkpoint, .*ok/checkpoints/0000002.pt \(step 2\), "
                                                    r"is untouched; its largest weight is [0-9.]+\)"):
        dit_run(tmp_path, "--max-steps", "5", "--ckpt-every", "100", "--lr", "1e30", "--resume", "auto", exp="ok")
    assert ok
