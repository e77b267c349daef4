"""Test setup: run Triton kernels in the interpreter when there is no GPU, skip GPU-only tests."""

import os

import pytest
import torch

# Must happen before any Triton kernel is defined (i.e. before test modules import them).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def _share_the_cores() -> None:
    """In one of several test processes (pytest-xdist), torch takes its share of the cores this process
    may run on, and so do the processes it starts (OMP_NUM_THREADS): two workers with a thread per core
    each would fight over every core."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ and hasattr(os, "sched_getaffinity"):
        share = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


_share_the_cores()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests without CUDA, or under the (too slow) interpreter."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (and TRITON_INTERPRET unset)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
