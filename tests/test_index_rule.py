"""One rule and one message for a bad index, whichever backend would run the kernel."""

from __future__ import annotations

import pytest
import torch
from slimtune import ops
from slimtune.layers import PaCALinear

BACKENDS = ["torch", "cpp", "triton"]  # triton runs under TRITON_INTERPRET=1 on CPU (conftest)

OUT = r"gather_columns: index value {} is out of range \[0, 6\); indices are not wrapped"
DTYPE = r"gather_columns: the index must be a 1-D int64 tensor, got {}"
BAD = [
    (torch.tensor([0, 9]), ValueError, OUT.format(9)),
    (torch.tensor([-1, 2]), ValueError, OUT.format(-1)),
    (torch.tensor([0.0, 2.0]), TypeError, DTYPE.format("torch.float32")),
    (torch.tensor([[0, 2]]), TypeError, DTYPE.format(r"torch.int64 of shape \(1, 2\)")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("index", "error", "match"), BAD)
def test_gather_refuses_bad_indices_alike(backend, index, error, match):
    x = torch.randn(4, 6)
    with ops.use_backend("gather_columns", backend), pytest.raises(error, match=match):
        ops.gather_columns(x, index)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_refuses_repeated_and_out_of_range_alike(backend):
    weight = torch.randn(3, 6)
    before = weight.clone()
    with ops.use_backend("scatter_columns", backend):
        with pytest.raises(ValueError, match="scatter_columns: the index holds a value twice"):
            ops.scatter_columns(weight, torch.tensor([1, 1]), torch.randn(3, 2))
        with pytest.raises(ValueError, match=r"scatter_columns: index value 6 is out of range \[0, 6\)"):
            ops.scatter_columns(weight, torch.tensor([0, 6]), torch.randn(3, 2))
    assert torch.equal(weight, before)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_partial_adamw_refuses_bad_index_alike(backend):
    cols, grad = torch.randn(3, 2), torch.randn(3, 2)
    moments = torch.zeros(3, 2), torch.zeros(3, 2)
    weight = torch.randn(3, 5)
    hyper = ops.AdamWStep(step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with (
        ops.use_backend("partial_adamw", backend),
        pytest.raises(ValueError, match="partial_adamw: index value 7"),
    ):
        ops.partial_adamw(cols, grad, *moments, weight, torch.tensor([0, 7]), hyper=hyper)


@pytest.mark.parametrize(
    ("index", "error", "match"),
    [
        (torch.tensor([0, 0]), ValueError, "PaCALinear .columns.: the index holds a value twice"),
        (torch.tensor([0, 8]), ValueError, r"PaCALinear .columns.: index value 8 is out of range \[0, 8\)"),
        (torch.tensor([0.5]), TypeError, "PaCALinear .columns.: the index must be a 1-D int64 tensor"),
    ],
)
def test_layers_check_their_index_once_at_construction(index, error, match):
    with pytest.raises(error, match=match):
        PaCALinear(torch.nn.Linear(8, 4), index)
