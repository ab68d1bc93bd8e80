"""The code paths CUDA takes, run on the CPU. Every stage at --precision bf16 through CPU autocast (the generators'
default on CUDA), each compared with the same run in fp32 (same seed, data and steps): bf16 must really be on (the
losses differ) and stay close (they agree to bf16's precision), with no non-finite value anywhere. And --compile of
SiT + REPA and MaskGIT against eager (DiT's and the fine-tune's are in their own test files)."""
import json
import math
import os

import numpy as np
import pytest
import torch

import checkpoints
import finetune_eqvae as fe
import train_dit
import train_maskgit
import train_sit
from helpers import run_script

STEPS = ["--max-steps", "2", "--log-every", "1", "--ckpt-every", "2", "--num-images", "8", "--global-batch-size", "4"]


def first_losses(folder, key):
    """The per-step values of `key` in a run's metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    return [r[key] for r in rows if key in r]


def both(run, tmp_path, key):
    """run(precision, results_dir) -> run folder, in fp32 and bf16: the two loss curves."""
    out = {p: first_losses(run(p, str(tmp_path / p)), key) for p in ("fp32", "bf16")}
    assert out["fp32"] and len(out["fp32"]) == len(out["bf16"]), out
    assert all(math.isfinite(v) for v in out["fp32"] + out["bf16"]), out
    return np.array(out["fp32"]), np.array(out["bf16"])


@pytest.mark.parametrize("stage", ["finetune", "dit", "sit-repa", "maskgit"])
def test_every_trainer_runs_bf16_autocast_on_the_cpu(stage, tmp_path):
    torch.manual_seed(0)
    if stage == "finetune":
        run, key = (lambda p, d: fe.main(fe.parse_args(["--preset", "tiny", "--precision", p, "--results-dir", d,
                                                        "--preview-every", "100", "--val-every", "100", *STEPS]))), \
            "loss"
    elif stage == "dit":
        run, key = (lambda p, d: train_dit.main(train_dit.get_args(["--preset", "tiny", "--precision", p,
                                                                    "--results-dir", d, *STEPS]))), "loss"
    elif stage == "sit-repa":
        run, key = (lambda p, d: train_sit.main(train_sit.get_args(["--preset", "tiny", "--repa", "--precision", p,
                                                                    "--results-dir", d, *STEPS]))), "proj_loss"
    else:
        run, key = (lambda p, d: train_maskgit.main(train_maskgit.parse_args(
            ["--preset", "tiny", "--precision", p, "--results-dir", d, *STEPS]))), "loss"
    fp32, bf16 = both(run, tmp_path, key)
    rel = np.abs(bf16 - fp32) / np.abs(fp32)
    assert rel.max() > 1e-6, (fp32, bf16)  # autocast was on: bf16 matmuls round differently
    assert rel.max() < 0.05, (fp32, bf16)  # ... and stay within bf16's precision of the fp32 run


def test_sampling_and_evaluation_run_bf16_on_the_cpu(tmp_path):
    folder = train_dit.main(train_dit.get_args(["--preset", "tiny", "--results-dir", str(tmp_path), *STEPS]))
    ckpt = os.path.join(folder, "checkpoints", "0000002.pt")
    grids = {}
    for p in ("fp32", "bf16"):
        run_script(["sample.py", "--preset", "tiny", "--ckpt", ckpt, "--num-samples", "4", "--num-sampling-steps", "4",
                    "--sample-dir", str(tmp_path / p), "--out", str(tmp_path / f"{p}.npz"), "--precision", p])
        grids[p] = np.load(tmp_path / f"{p}.npz")["arr_0"].astype(float)
    diff = np.abs(grids["bf16"] - grids["fp32"])
    assert diff.max() > 0 and diff.mean() < 8, diff.mean()  # bf16 on, images close to fp32's (uint8 levels)
    recon = {}
    for p in ("fp32", "bf16"):  # the tiny preset's autoencoder: the shipped tiny base
        out = run_script(["evaluate.py", "recon", "--preset", "tiny", "--vae", checkpoints.TINY_BASE["kl"],
                          "--precision", p, "--no-fid", "--no-lpips"])
        recon[p] = json.loads(out.stdout.strip().splitlines()[-1])
    assert math.isfinite(recon["bf16"]["psnr"]) and recon["bf16"]["psnr"] != recon["fp32"]["psnr"]
    assert abs(recon["bf16"]["psnr"] - recon["fp32"]["psnr"]) < 0.5, recon


@pytest.mark.parametrize("stage", ["sit-repa", "maskgit"])
def test_compile_keeps_the_eager_losses(stage, tmp_path, monkeypatch):
    """--compile of SiT + REPA and MaskGIT: torch.compile's graph capture (dynamo + AOT autograd; inductor's code
    generation is DiT's test, tests/test_dit.py) gives the eager losses and official checkpoint keys."""
    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real(self, backend="aot_eager"))
    torch._dynamo.reset()
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        argv = ["--preset", "tiny", "--results-dir", str(tmp_path / name), *STEPS, *extra]
        folder = (train_sit.main(train_sit.get_args(argv + ["--repa"])) if stage == "sit-repa" else
                  train_maskgit.main(train_maskgit.parse_args(argv)))
        rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
        keys = list(torch.load(os.path.join(folder, "checkpoints", "0000002.pt"), weights_only=True)["model"])
        runs[name] = ([r["loss"] for r in rows if "loss" in r], keys)
    torch._dynamo.reset()
    assert len(runs["eager"][0]) == 2 and runs["compiled"][0] == pytest.approx(runs["eager"][0], rel=1e-5)
    assert runs["compiled"][1] == runs["eager"][1]  # no _orig_mod. / module. prefixes
