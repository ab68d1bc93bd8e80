"""Shared test setup: import the flat project modules from the repo root, keep CPU threads modest."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# CI has 2 cores; torchrun tests start 2 processes, so one thread each keeps them from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("EQVAE_TEST_THREADS", "2")))


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """In-process training tests on tiny networks: one intra-op thread (two thrash on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
