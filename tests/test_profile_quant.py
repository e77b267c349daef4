"""`slimtune profile --quant`: 4-bit bases accounted on the meta device. The meta 4-bit linears hold
exactly the tensors bitsandbytes' quantization makes, the accounted peak of a QPaCA/QLoRA step equals
the CPU allocator's measured one, and rows that need dense weights are refused before any work."""

from __future__ import annotations

import pytest
import slimtune
import torch
from slimtune.apps import accounting, quantize
from slimtune.apps.bench import build_model
from slimtune.apps.cli import main as cli_main
from slimtune.apps.profile import profile
from test_profile import SCALARS, measured_minus_accounted
from torch import nn


def _held(module: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    state = module.weight.quant_state
    tensors = {"weight": module.weight, "absmax": state.absmax, "code": state.code}
    if state.nested:
        nested = state.state2
        tensors |= {"offset": state.offset, "nested absmax": nested.absmax, "nested code": nested.code}
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


@pytest.mark.parametrize("fmt", quantize.FORMATS)
@pytest.mark.parametrize("shape", [(37, 100), (256, 128), (3, 5)])
def test_a_meta_4bit_linear_holds_what_bitsandbytes_quantization_makes(fmt: str, shape) -> None:
    dense = nn.Linear(shape[1], shape[0], dtype=torch.bfloat16)
    real = quantize.linear_4bit(dense, *quantize.FORMATS[fmt])
    with torch.device("meta"):
        empty = nn.Linear(shape[1], shape[0], dtype=torch.bfloat16)
    meta = quantize.linear_4bit(empty, *quantize.FORMATS[fmt])
    assert _held(meta) == _held(real)
    assert slimtune.quantized.describe(meta) == slimtune.quantized.describe(real)
    assert accounting.storage_bytes(accounting.model_tensors(meta)) == accounting.storage_bytes(
        accounting.model_tensors(real)
    )
    x = torch.empty(2, shape[1], dtype=torch.bfloat16, device="meta", requires_grad=True)
    assert slimtune.quantized.product(meta, x).shape == (2, shape[0])  # bitsandbytes' fake kernels


def test_quantize_leaves_the_lm_head_dense() -> None:
    model = quantize.quantize(build_model("tiny", torch.device("meta"), torch.bfloat16, 0))
    assert type(model.lm_head) is nn.Linear
    assert sum(slimtune.quantized.is_4bit(m) for m in model.modules()) == 7 * model.config.num_hidden_layers


@pytest.mark.parametrize(("fmt", "dtype"), [("nf4", "bf16"), ("fp4", "fp32")])
def test_cpu_measured_peak_equals_the_accounted_one_on_a_4bit_base(tmp_path, fmt: str, dtype: str) -> None:
    """As for dense models (test_profile): the same bytes, quantization state included, but for the
    scalar operands wrapped on the host. (At 32 tokens bitsandbytes' CPU kernels' own workspace, up to
    40 KB, rises above the step's tiny peak; at 128 it does not.)"""
    report = profile(model="tiny", batch=2, seq=64, dtype=dtype, methods=["floor", "paca", "lora", "hydra"],
                     device="cpu", out=tmp_path, warmup=1, steps=1, quant=fmt)  # fmt: skip
    for row in report["rows"]:
        assert row["error"] is None, row["error"]
        assert 0 <= measured_minus_accounted(row) <= SCALARS, row["label"]
    text = (tmp_path / "profile.md").read_text()
    assert f"--quant {fmt}" in text and "paca is QPaCA" in text


def _nf4_bytes(n: int) -> int:
    """Hand count of an NF4 weight of n entries with double quantization: 4 bits an entry, a uint8
    absmax a block of 64, a float32 absmax a group of 256 of those, the offset, and the 16-entry NF4
    and 256-entry nested code tables (float32)."""
    blocks = -(-n // 64)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4 + 16 * 4 + 256 * 4


def test_the_4bit_base_holds_its_hand_count_and_qpaca_its_columns(tmp_path) -> None:
    dense = profile(model="tiny", batch=1, seq=32, methods=["floor"], out=tmp_path / "d")["rows"][0]
    rows = profile(model="tiny", batch=1, seq=32, methods=["floor", "paca"], out=tmp_path / "q", quant="nf4")
    floor, paca = rows["rows"]
    model = build_model("tiny", torch.device("meta"), torch.bfloat16, 0)
    linears = [m for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    saved = sum(2 * m.weight.numel() - _nf4_bytes(m.weight.numel()) for m in linears)
    assert round((dense["weights"] - floor["weights"]) * 2**30) == saved
    # 64 columns a linear: float32 masters, their bf16 dequantized initial values (the correction's
    # Dq) and the int64 column index
    columns = sum(64 * m.out_features for m in linears)
    assert round((paca["weights"] - floor["weights"]) * 2**30) == columns * (4 + 2) + len(linears) * 64 * 8


def test_rows_that_need_dense_weights_and_unknown_formats_are_refused(capsys) -> None:
    with pytest.raises(ValueError, match=r"--quant nf4: \['full', 's2ft\+lean'\] need dense weights"):
        profile(model="tiny", methods=["paca", "hydra", "full", "s2ft+lean"], quant="nf4")
    with pytest.raises(ValueError, match="unknown --quant 'int3'"):
        profile(model="tiny", methods=["paca"], quant="int3")
    assert cli_main(["profile", "--model", "tiny", "--quant", "int3"]) == 2
    assert "unknown --quant 'int3'" in capsys.readouterr().err
