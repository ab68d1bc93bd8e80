"""Shared by the tests: run a stage script as a user would, as one process or under torchrun (CPU, gloo)."""
import json
import os
import socket
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    """A free TCP port for torchrun's rendezvous (--standalone / port 0 can hang at gloo setup on some machines)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_script(args, nproc=1, cwd=ROOT, check=True, timeout=300, env=None):
    """`python SCRIPT ARGS` (nproc=1) or `torchrun --nproc_per_node=nproc SCRIPT ARGS`, one thread per process;
    args[0] is the script, relative to the repository root; env: extra environment variables. Returns the
    CompletedProcess; check=True raises with the end of its output when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT, **(env or {}))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    args = [os.path.join(ROOT, args[0]), *args[1:]]
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc_per_node={nproc}",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    out = subprocess.run(launcher + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def run_with_ema_probe(args, tmp_path, nproc=2, **kwargs):
    """run_script through tests/ema_probe.py; returns the CompletedProcess and, per rank, the probe's record of how
    far the EMA was from the weights DDP broadcast from rank 0 when it was first updated (0.0: it started there)."""
    probe = os.path.join(str(tmp_path), "ema-probe")
    os.makedirs(probe, exist_ok=True)
    old = os.environ.get("EQVAE_PROBE_DIR")
    os.environ["EQVAE_PROBE_DIR"] = probe
    try:
        out = run_script([os.path.join("tests", "ema_probe.py"), *args], nproc=nproc, **kwargs)
    finally:
        os.environ.pop("EQVAE_PROBE_DIR") if old is None else os.environ.__setitem__("EQVAE_PROBE_DIR", old)
    records = [json.load(open(os.path.join(probe, f"rank{r}.json"))) for r in range(nproc)]
    return out, records


def assert_ema_starts_at_rank0_model(records):
    """Every rank's EMA began as the model DDP synchronised from rank 0 (all parameters compared, all equal)."""
    assert all(r["compared"] > 0 and r["max_diff"] == 0.0 for r in records), records


@torch.no_grad()
def perturb(model, scale):
    """Add scale * N(0, 1) to every parameter: random weights without the zero-initialised layers of a fresh
    model (DiT's adaLN, LayerNorm affines, zero biases), so a mis-wired tensor shows in the outputs."""
    for p in model.parameters():
        p.add_(scale * torch.randn_like(p))
    return model
