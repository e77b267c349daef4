"""Test setup: run Triton kernels in the interpreter when there is no GPU, skip GPU-only tests."""

import os

import pytest
import torch

# Must happen before any Triton kernel is defined (i.e. before test modules import them).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests without CUDA, or under the (too slow) interpreter."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (and TRITON_INTERPRET unset)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
