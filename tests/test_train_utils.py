"""Shared plumbing: exact-resume data loading, atomic checkpoints, RNG state, EMA, loss checks, presets."""
import argparse
import os
import random

import numpy as np
import pytest
import torch

import train_utils as tu


class RandomItems(torch.utils.data.Dataset):
    """Item = (its index, a random draw): shows both the order and the per-sample randomness."""

    def __init__(self, n=23):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([i, torch.randint(0, 10**6, ()).item(), int(np.random.randint(10**6))])


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_loader_resume_mid_epoch_equals_straight_run():
    straight = take(tu.ResumableLoader(RandomItems(), 4, seed=3), 13)  # 5 batches/epoch: crosses two epochs
    first = tu.ResumableLoader(RandomItems(), 4, seed=3)
    part = take(first, 7)
    resumed = tu.ResumableLoader(RandomItems(), 4, seed=3)
    resumed.load_state_dict(first.state_dict())
    part += take(resumed, 6)
    assert first.state_dict() == {"epoch": 1, "batch": 2}
    assert all(torch.equal(a, b) for a, b in zip(straight, part))


def test_loader_epochs_are_permutations_and_reshuffled():
    loader = tu.ResumableLoader(RandomItems(20), 4, seed=0)
    e0 = torch.cat(take(loader, 5))[:, 0]
    e1 = torch.cat(take(loader, 5))[:, 0]
    assert sorted(e0.tolist()) == list(range(20)) and sorted(e1.tolist()) == list(range(20))
    assert not torch.equal(e0, e1)


def test_ranks_split_the_global_batch():
    """Two ranks with batch B/2 see exactly the samples (and random draws) of one rank with batch B."""
    one = take(tu.ResumableLoader(RandomItems(), 4, seed=5, rank=0, world_size=1), 3)
    r0 = take(tu.ResumableLoader(RandomItems(), 2, seed=5, rank=0, world_size=2), 3)
    r1 = take(tu.ResumableLoader(RandomItems(), 2, seed=5, rank=1, world_size=2), 3)
    for full, a, b in zip(one, r0, r1):
        assert torch.equal(full[0::2], a) and torch.equal(full[1::2], b)


def test_per_sample_randomness_independent_of_workers():
    a = take(tu.ResumableLoader(RandomItems(), 4, seed=1, num_workers=0), 3)
    b = take(tu.ResumableLoader(RandomItems(), 4, seed=1, num_workers=2), 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


class WorkerItems(RandomItems):
    """RandomItems plus the id of the process that made the item."""

    def __getitem__(self, i):
        return torch.cat([super().__getitem__(i), torch.tensor([os.getpid()])])


def test_loader_workers_persist_across_epochs_and_resume_exactly():
    """num_workers=2: the same two worker processes serve every epoch, and the batches (order and per-sample draws)
    equal those of num_workers=0, straight through, resumed in a new loader, or moved back mid-epoch."""
    straight = take(tu.ResumableLoader(RandomItems(), 4, seed=3), 13)           # 5 batches/epoch: 3 epochs
    loader = tu.ResumableLoader(WorkerItems(), 4, seed=3, num_workers=2)
    got = take(loader, 13)
    assert all(torch.equal(a, b[:, :3]) for a, b in zip(straight, got))
    pids = [set(b[:, 3].tolist()) for b in got]
    epochs = [set().union(*pids[0:5]), set().union(*pids[5:10]), set().union(*pids[10:13])]
    assert len(epochs[0]) == 2 and epochs[0] == epochs[1] == epochs[2] and os.getpid() not in epochs[0]
    # Resume mid-epoch in a new loader, and move this one back mid-epoch while batches are in flight.
    resumed = tu.ResumableLoader(WorkerItems(), 4, seed=3, num_workers=2)
    resumed.load_state_dict({"epoch": 1, "batch": 2})
    assert all(torch.equal(a, b[:, :3]) for a, b in zip(straight[7:13], take(resumed, 6)))
    loader.load_state_dict({"epoch": 0, "batch": 1})
    again = take(loader, 4)
    assert all(torch.equal(a, b[:, :3]) for a, b in zip(straight[1:5], again))
    assert set().union(*[set(b[:, 3].tolist()) for b in again]) == epochs[0]   # still the same workers


def test_loader_seeds_only_cpu_generators(monkeypatch):
    """Per-sample seeding must not reseed CUDA (torch.manual_seed does): with num_workers=0 on a GPU the training
    loop's CUDA stream would restart at every batch."""
    expected = take(tu.ResumableLoader(RandomItems(), 4, seed=1), 2)

    def forbidden(*args, **kwargs):
        raise AssertionError("the loader reseeded a CUDA generator")

    if torch.cuda.is_available():
        torch.cuda.manual_seed(0)
        cuda_expected = torch.rand(3, device="cuda")
        torch.cuda.manual_seed(0)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", forbidden)
    monkeypatch.setattr(torch.cuda, "manual_seed", forbidden)
    got = take(tu.ResumableLoader(RandomItems(), 4, seed=1), 2)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    if torch.cuda.is_available():
        assert torch.equal(torch.rand(3, device="cuda"), cuda_expected)


def test_loader_leaves_training_rng_alone():
    loader = tu.ResumableLoader(RandomItems(), 4, seed=1)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(loader)
    assert torch.equal(torch.rand(3), expected)


def test_loader_too_small_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="too few"):
        tu.ResumableLoader(RandomItems(3), 4)
    with pytest.raises(ValueError, match="empty"):
        tu.ResumableLoader(RandomItems(0), 4)


def test_atomic_save_keeps_previous_checkpoint_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt" / "0000010.pt")
    tu.save_checkpoint({"model": {"w": torch.ones(2)}, "step": 10}, path)

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        tu.save_checkpoint({"model": {"w": torch.zeros(2)}, "step": 11}, path)
    monkeypatch.undo()
    assert tu.load_checkpoint(path)["step"] == 10
    assert os.listdir(tmp_path / "ckpt") == ["0000010.pt"]  # no temporary file left behind


def test_prune_and_resume_resolution(tmp_path):
    d = str(tmp_path)
    assert tu.resolve_resume("auto", d) is None
    for step in (5, 20, 10):
        tu.save_checkpoint({"model": {}, "step": step}, os.path.join(d, f"{step:07d}.pt"))
    assert tu.resolve_resume("auto", d).endswith("0000020.pt")
    tu.prune_checkpoints(d, keep=2)
    assert [os.path.basename(p) for p in tu.list_checkpoints(d)] == ["0000010.pt", "0000020.pt"]
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        tu.resolve_resume(os.path.join(d, "missing.pt"), d)


def test_load_checkpoint_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Could not read checkpoint .*bad.pt"):  # a user error: one line
        tu.load_checkpoint(str(bad))
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(KeyError, match="expected keys"):
        tu.load_checkpoint(str(other))


def test_check_resume_args_names_mismatch():
    with pytest.raises(ValueError, match="model: checkpoint 'DiT-B/2' vs now 'DiT-S/2'"):
        tu.check_resume_args({"model": "DiT-B/2", "lr": 1}, argparse.Namespace(model="DiT-S/2", lr=1), ["model", "lr"])


def test_rng_states_round_trip():
    states = tu.rng_states()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    tu.restore_rng_states(states)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_check_finite_names_the_first_bad_step_and_part(monkeypatch):
    """check_finite only records (no read from the device); raise_if_nonfinite names the first bad step and the
    parts bad there, however many steps later it is called, and the next run starts clean."""
    tu.reset_finite_checks()
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        def read(self, *a, _real=real, _name=name, **k):
            reads.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, read)
    for step in range(1, 10):
        kl = torch.tensor(float("nan") if step in (4, 6) else 2.0)
        rec = torch.tensor(float("inf") if step == 6 else 1.0)
        tu.check_finite(step, rec=rec, kl=kl, lr=1e-4)
    assert reads == []
    monkeypatch.undo()
    with pytest.raises(tu.NonFiniteLossError, match=r"step 4: kl on rank 0\. .*nothing after step 3 was saved"):
        tu.raise_if_nonfinite()
    tu.raise_if_nonfinite()  # the records went with the error
    tu.check_finite(2, rec=torch.tensor(1.0), lr=float("nan"))
    with pytest.raises(tu.NonFiniteLossError, match=r"step 2: lr "):
        tu.raise_if_nonfinite()
    tu.check_finite(1, rec=torch.tensor(1.0))
    tu.raise_if_nonfinite()
    tu.reset_finite_checks()


def test_update_ema_formula():
    """The foreach update equals DiT's per-parameter loop (mul_(decay).add_(p, alpha=1 - decay)) bit for bit, on
    every parameter, matched by name (ema built with another parameter order than the model's)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    ema = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    with torch.no_grad():
        for p in ema.parameters():
            p.normal_()
    before = {n: p.detach().clone() for n, p in ema.named_parameters()}
    source = dict(model.named_parameters())
    expected = {n: b.clone().mul_(0.9).add_(source[n].detach(), alpha=0.1) for n, b in before.items()}
    tu.update_ema(ema, model, decay=0.9)
    for n, p in ema.named_parameters():
        assert torch.equal(p, expected[n]), n
        assert torch.allclose(p, 0.9 * before[n] + 0.1 * source[n])  # the formula itself


def test_apply_preset_only_fills_defaults():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    presets = {"tiny": {"batch_size": 16, "lr": 1e-3}}
    argv = ["--preset", "tiny", "--batch-size", "8"]
    args = tu.apply_preset(parser.parse_args(argv), parser, presets, argv)
    assert args.batch_size == 8 and args.lr == 1e-3
    # Typing the default value explicitly still wins over the preset.
    argv = ["--preset", "tiny", "--batch-size", "256"]
    args = tu.apply_preset(parser.parse_args(argv), parser, presets, argv)
    assert args.batch_size == 256 and args.lr == 1e-3


def test_precision_resolution():
    assert tu.resolve_precision(None, "cpu") == "fp32"
    assert tu.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError):
        tu.resolve_precision("fp16", "cpu")
    assert not tu.make_scaler("bf16", "cpu").is_enabled()
