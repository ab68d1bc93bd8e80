"""
The steady-state training loop of every stage makes no blocking host-device transfer between log steps: no read of
a device value on the host (.item(), float(), bool(), .tolist(), .numpy(), .cpu()) and no tensor made from host
data (torch.tensor, torch.as_tensor, torch.from_numpy), each of which makes the host wait for the GPU's queue.
(Log steps, checkpoints and the fine-tune's validation, once an epoch, read values back by design.)

On the CPU (CI) these calls are counted when the project's own code makes them (torch's internals read CPU-resident
counters such as Adam's step, which costs nothing on a GPU), outside the data loader (whose batches arrive by
non-blocking copies from pinned memory), over steps 2-4 of a 4-step run whose only log and checkpoint step is the
last (step 1 fills caches). With CUDA, torch.cuda.set_sync_debug_mode also reports every synchronising CUDA call
made in those steps, torch's included.
"""
import os
import sys
from contextlib import contextmanager

import pytest
import torch

import train_utils as tu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READS = ["item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"]
MAKERS = ["tensor", "as_tensor", "from_numpy"]


def _ours(frame):
    """Whether the frame that made the call is the project's code: a module at the top of the repository (not
    torch's, even from a virtual environment inside the checkout, and not the tests')."""
    return os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == ROOT


@contextmanager
def count_syncs(monkeypatch):
    """Yields (events, state): events lists (step, call, file:line) for every host-device sync point the project's
    code makes from step 2 on (steps are delimited by TrainingMeter.update, called once per optimiser step)."""
    events, state = [], {"updates": 0, "paused": False}

    def record(what):
        frame = sys._getframe(2)
        if state["updates"] >= 1 and not state["paused"] and _ours(frame):
            events.append((state["updates"] + 1, what, f"{os.path.basename(frame.f_code.co_filename)}:"
                                                        f"{frame.f_lineno}"))

    for name in READS:
        real = getattr(torch.Tensor, name)

        def read(self, *a, _real=real, _name=name, **k):
            record(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, read)
    for name in MAKERS:
        real = getattr(torch, name)

        def make(data, *a, _real=real, _name=name, **k):
            if not torch.is_tensor(data):
                record(f"torch.{_name}")
            return _real(data, *a, **k)
        monkeypatch.setattr(torch, name, make)

    real_update, real_next = tu.TrainingMeter.update, tu.ResumableLoader.__next__

    def cuda_watch():
        # CUDA: any synchronising call in steps 2-4 (outside the loader) raises, with the culprit in its traceback.
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("error" if 1 <= state["updates"] <= 3 and not state["paused"] else 0)

    def update(self, **values):
        real_update(self, **values)
        state["updates"] += 1
        cuda_watch()

    def next_batch(self):
        state["paused"] = True
        cuda_watch()
        try:
            return real_next(self)
        finally:
            state["paused"] = False
            cuda_watch()
    monkeypatch.setattr(tu.TrainingMeter, "update", update)
    monkeypatch.setattr(tu.ResumableLoader, "__next__", next_batch)
    try:
        yield events, state
    finally:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0)


STEPS = ["--max-steps", "4", "--log-every", "1000", "--ckpt-every", "1000", "--num-workers", "0"]


def _dit(tmp):
    import train_dit
    return train_dit.main, train_dit.get_args(["--preset", "tiny", "--num-images", "16", "--global-batch-size", "4",
                                               "--results-dir", str(tmp)] + STEPS)


def _sit(tmp):
    import train_sit
    return train_sit.main, train_sit.get_args(["--preset", "tiny", "--repa", "--num-images", "16",
                                               "--global-batch-size", "4", "--results-dir", str(tmp)] + STEPS)


def _maskgit(tmp):
    import train_maskgit
    return train_maskgit.main, train_maskgit.parse_args(["--preset", "tiny", "--num-images", "16",
                                                         "--global-batch-size", "4", "--results-dir", str(tmp)] + STEPS)


def _finetune(tmp):
    import finetune_eqvae as fe
    # A small random autoencoder (--init none), the GAN on (the tiny preset switches it off).
    return fe.main, fe.parse_args(["--preset", "tiny", "--init", "none", "--disc-weight", "0.5", "--num-images", "16",
                                   "--global-batch-size", "4", "--grad-accum", "2", "--preview-every", "1000", "--config",
                                   '{"ch": 8, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "resolution": 64, '
                                   '"norm_num_groups": 8}', "--disc-ndf", "8", "--val-every", "1000",  # no validation
                                   "--results-dir", str(tmp)] + STEPS)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("stage", [_finetune, _dit, _sit, _maskgit], ids=["finetune", "dit", "sit-repa", "maskgit"])
def test_no_host_device_sync_between_log_steps(stage, tmp_path, monkeypatch):
    main, args = stage(tmp_path)
    with count_syncs(monkeypatch) as (events, state):
        main(args)
    assert state["updates"] == 4
    assert [e for e in events if e[0] <= 4] == []
