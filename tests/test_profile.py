"""`slimtune profile`: the meta-device accounting against hand-counted bytes and FLOPs, its
calibration against the H200 anchors, and the command's outputs."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import slimtune
import torch
import transformers
from slimtune.apps import accounting
from slimtune.apps.bench import build_model
from slimtune.apps.cli import main as cli_main
from slimtune.apps.profile import ALLOWANCE_GIB, Setup, account, model_config, profile, table
from torch import nn

N, K, M, R = 64, 48, 40, 4  # tokens, in, out, rank/columns
F32 = 4


class OneLinear(nn.Module):
    """One linear layer as a 'model': loss = sum of its outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(K, M, bias=False, device="meta")

    def forward(self, x: torch.Tensor):
        return type("Out", (), {"loss": self.proj(x).sum()})()


def account_linear(config, trainable_input: bool = True) -> accounting.StepAccount:
    model = OneLinear()
    model.requires_grad_(config == "full")
    if config not in ("floor", "full"):
        with slimtune.on_meta():
            slimtune.apply(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3) if params else None
    x = torch.empty(N, K, device="meta", requires_grad=trainable_input)
    return accounting.account_step(model, optimizer, {"x": x})


# method -> (saved bytes, forward FLOPs, backward FLOPs), counted by hand for y = x W^T (N x K -> M)
HAND = {
    # frozen weight, input gradient only: nothing saved but the weight itself (a parameter)
    "floor": (0, 2 * N * K * M, 2 * N * K * M),
    # x kept for dW; backward computes dx and dW
    "full": (N * K * F32, 2 * N * K * M, 4 * N * K * M),
    # the r compact input columns; backward: dx and dy^T x[:, idx]
    "paca": (N * R * F32, 2 * N * K * M, 2 * N * K * M + 2 * N * M * R),
    # x (for dA), u = x A^T (for dB) and the scaled B (s B, M x r: built per forward); forward adds
    # x A^T and u B^T; backward: g = dy B, dB = dy^T u, dA = g^T x, dx = dy W + g A
    "lora": (
        (N * K + N * R + M * R) * F32,
        2 * N * K * M + 2 * N * K * R + 2 * N * R * M,
        2 * N * K * M + 2 * N * M * R * 2 + 2 * N * R * K * 2,
    ),
    # Hydra (rp = rs = 2, r = 4): a = [Ap; As W0] and b = [sp Bp, ss Bs] are built per forward and
    # kept, with x and u; forward adds As W0; backward adds dAs = d(As W0) W0^T.
    "hydra": (
        (N * K + N * R + R * K + M * R) * F32,
        2 * N * K * M + 2 * (R // 2) * M * K + 2 * N * K * R + 2 * N * R * M,
        2 * N * K * M + 2 * N * M * R * 2 + 2 * N * R * K * 2 + 2 * (R // 2) * K * M,
    ),
}
CONFIGS = {
    "floor": "floor",
    "full": "full",
    "paca": slimtune.PaCAConfig(r=R, target_modules=["proj"]),
    "lora": slimtune.LoRAConfig(r=R, alpha=2 * R, target_modules=["proj"]),
    "hydra": slimtune.HydraConfig(R // 2, R // 2, alpha=R, target_modules=["proj"]),
}


@pytest.mark.parametrize("method", HAND)
def test_one_linear_matches_the_hand_count(method: str) -> None:
    saved, forward, backward = HAND[method]
    step = account_linear(CONFIGS[method])
    assert step.saved_total == saved
    assert step.forward_flops == forward
    assert step.backward_flops == backward
    trained = {"floor": 0, "full": K * M, "paca": M * R, "lora": R * (K + M), "hydra": R // 2 * (K + 3 * M)}[
        method
    ]
    assert step.trainable_count == trained
    # Hydra's parallel_A gradient is a view of the (r x in) gradient of a = [Ap; As W0]: it keeps that
    # storage alive, rs x in floats more than its own size (accounted, as on a card).
    held = (R // 2) * K if method == "hydra" else 0
    assert step.gradients == (trained + held) * F32
    tensors = {"floor": 0, "full": 1, "paca": 1, "lora": 2, "hydra": 4}[method]
    assert step.optimizer == 2 * trained * F32 + 4 * tensors  # exp_avg, exp_avg_sq; a float32 step each


def tiny_block_setup(**kw) -> Setup:
    return Setup(model="tiny", batch=2, seq=16, dtype="fp32", device="meta", card="h100", **kw)


def test_one_block_paca_adds_exactly_its_compact_columns() -> None:
    """Per block, PaCA keeps r input columns of each of the 7 projections on top of the floor."""
    setup = tiny_block_setup()
    config = model_config("tiny")
    floor, paca = account("floor", setup, config), account("paca", setup, config)
    tokens, blocks, r = 2 * 16, config.num_hidden_layers, setup.options.paca_r
    columns = 7 * blocks * tokens * r * F32
    assert paca.saved["adapters and trained entries"] * 2**30 == pytest.approx(columns)
    # Everything else PaCA keeps, the floor keeps too (the floor keeps more: its embedding output
    # needs a gradient, so the first norm saves its input).
    assert paca.saved_total - paca.saved["adapters and trained entries"] <= floor.saved_total
    # The forward is the floor's dense forward; backward adds each layer's dy^T x[:, idx].
    assert paca.forward_tflop == pytest.approx(floor.forward_tflop)
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    outs = 2 * hidden + 2 * kv + 2 * inter + hidden  # q, o, k, v, gate, up, down output sizes
    grads = 2 * tokens * r * outs * blocks
    # ... and skips the input gradient of block 0's q/k/v (nothing before them trains; the floor's
    # embedding output needs a gradient).
    skipped = 2 * tokens * hidden * (hidden + 2 * kv)
    assert (paca.backward_tflop - floor.backward_tflop) * 1e12 == pytest.approx(grads - skipped)


CALIBRATION = {"floor": 29.12, "full": 42.57, "peft-lora": 53.29}  # measured on an H200 (anchors)


@pytest.mark.parametrize("method", CALIBRATION)
def test_calibration_against_the_h200_anchors(method: str) -> None:
    """TinyLlama-1.1B, 8 x 2048, bf16: the accounted peaks fall within 3% of the measured ones."""
    setup = Setup(model="tinyllama-1.1b", batch=8, seq=2048, dtype="bf16", device="meta", card="h200")
    row = account(method, setup, model_config("tinyllama-1.1b"))
    assert row.peak_card == pytest.approx(CALIBRATION[method], rel=0.03)
    assert row.peak_exact + ALLOWANCE_GIB["hf"] == pytest.approx(row.peak_card)


LIGER_FLOOR = 15.86  # GiB, the anchors' Liger-patched floor on the H200


def test_fused_allowance_is_the_liger_anchor_s_gap(monkeypatch) -> None:
    """Liger's floor keeps lean mode's tensors and forms the gated MLP's product whole: lean mode with
    unbounded token chunks is that program; its exact peak plus the fused allowance is the measured
    15.86 GiB (to the anchors' 0.01), and lean mode's own rows get the fused allowance."""
    import slimtune.layers.lean as lean_layers

    setup = Setup(model="tinyllama-1.1b", batch=8, seq=2048, dtype="bf16", device="meta", card="h200")
    config = model_config("tinyllama-1.1b")
    chunked = account("floor+lean", setup, config)
    assert chunked.peak_card == pytest.approx(chunked.peak_exact + ALLOWANCE_GIB["fused"])
    monkeypatch.setattr(lean_layers, "BACKWARD_CHUNK", 1 << 40)
    whole = account("floor+lean", setup, config)
    assert whole.peak_exact + ALLOWANCE_GIB["fused"] == pytest.approx(LIGER_FLOOR, abs=0.01)
    assert whole.peak_exact > chunked.peak_exact  # lean's chunks keep its own peak below Liger's


def test_cli_writes_table_csv_json_and_plot(tmp_path, capsys) -> None:
    out = tmp_path / "profile"
    code = cli_main(
        ["profile", "--model", "tiny", "--batch", "2", "--seq", "16", "--dtype", "fp32",
         "--methods", "floor,paca,lora,full", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"profile.md", "profile.csv", "report.json", "profile.png"}
    rows = list(csv.DictReader((out / "profile.csv").open()))
    assert [r["method"] for r in rows] == ["floor", "paca", "lora", "full"]
    report = json.loads((out / "report.json").read_text())
    assert report["rows"][0]["ratios"]["floor"]["peak"] == 1.0
    assert "a model, not a measurement" in (out / "profile.md").read_text()
    assert "modelled ms" in capsys.readouterr().out


def test_cpu_device_measures_beside_the_model(tmp_path) -> None:
    report = profile(model="tiny", batch=2, seq=16, dtype="fp32", methods=["floor", "paca"], device="cpu",
                     out=tmp_path, warmup=1, steps=3)  # fmt: skip
    for row in report["rows"]:
        assert row["error"] is None
        times = row["measured_ms"]
        assert 0 < times["min"] <= times["median"] <= times["max"]


def test_model_from_directory_and_config_json(tmp_path) -> None:
    sizes = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2}
    config = transformers.Qwen2Config(vocab_size=64, num_hidden_layers=1, **sizes)
    config.save_pretrained(tmp_path)
    for spec in (str(tmp_path), str(tmp_path / "config.json")):
        report = profile(
            model=spec, batch=1, seq=8, dtype="fp32", methods=["floor", "s2ft"], out=tmp_path / "o"
        )
        assert [r["error"] for r in report["rows"]] == [None, None]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        profile(model="tiny", methods=["nope"])
    with pytest.raises(ValueError, match="neither a preset"):
        profile(model="/no/such/model")
    assert cli_main(["profile", "--model", "/no/such/model"]) == 2


def test_lean_rows_keep_less_and_longest_sequence_bisects(tmp_path) -> None:
    setup = tiny_block_setup()
    config = model_config("tiny")
    for method in ("floor", "paca", "s2ft"):
        plain, lean = account(method, setup, config), account(f"{method}+lean", setup, config)
        assert lean.error is None and lean.saved_total < plain.saved_total
        assert lean.peak_exact <= plain.peak_exact
        # The same work in total (the chunked loss forms its gradient in the forward, so the split moves).
        total = plain.forward_tflop + plain.backward_tflop
        assert lean.forward_tflop + lean.backward_tflop == pytest.approx(total, rel=1e-6)
    from slimtune.apps.profile import longest_sequence

    one = Setup(model="tiny", batch=1, seq=4096, dtype="fp32", device="meta", card="h100")
    budget = account("floor", one, config).peak_card
    tokens = longest_sequence("floor", "tiny", "fp32", budget, limit=8192)
    assert 4096 - 128 <= tokens <= 4096 + 128  # the budget of 4096 tokens gives back about 4096
    assert longest_sequence("floor+lean", "tiny", "fp32", budget, limit=8192) > tokens
    assert cli_main(["profile", "--model", "tiny", "--dtype", "fp32", "--longest", "1.05", "--methods",
                     "floor", "--out", str(tmp_path)]) == 0  # fmt: skip
    assert "| floor |" in (tmp_path / "longest.md").read_text()


RNG_STATE = 5056  # bytes of the CPU generator's state, which checkpointing keeps per block on the host
SCALARS = (
    256  # bytes: Python numbers that PyTorch wraps as 0-dim CPU tensors inside ops (host memory on a card)
)


def measured_minus_accounted(row: dict) -> int:
    return round(row["measured_peak"] * 2**30) - round(row["peak_exact"] * 2**30)


@pytest.mark.parametrize(
    "method", ["floor", "floor+lean", "paca", "paca-partial-adamw", "s2ft", "lora", "hydra", "full"]
)
def test_cpu_measured_peak_equals_the_accounted_one(tmp_path, method: str) -> None:
    """The CPU allocator's peak (torch.profiler's allocation events) against the meta accounting: the
    same bytes but for the 4- and 8-byte scalar operands wrapped on the host, which a dispatch mode does
    not see and which a card does not hold."""
    report = profile(model="tiny", batch=2, seq=16, dtype="fp32", methods=[method], device="cpu",
                     out=tmp_path, warmup=1, steps=1)  # fmt: skip
    (row,) = report["rows"]
    assert 0 <= measured_minus_accounted(row) <= SCALARS
    assert "measured peak" in (tmp_path / "profile.md").read_text()


def test_cpu_measured_peak_with_checkpointing_differs_by_the_host_rng_states(tmp_path) -> None:
    """Checkpointing keeps the CPU generator's state (5056 bytes) per block, and forks it again for each
    recomputation: host memory beside a card's, live beside the step on a CPU (with a few KB of other
    host allocations for PaCA; benchmarks/results/cpu-measured-peak-2026-12-05)."""
    report = profile(model="tiny", batch=2, seq=64, dtype="fp32", methods=["floor", "paca", "s2ft"],
                     device="cpu", out=tmp_path, warmup=1, steps=1,
                     checkpointing=["reentrant", "non-reentrant"])  # fmt: skip
    for row in report["rows"]:
        extra = measured_minus_accounted(row)
        assert 0 <= extra <= 4 * model_config("tiny").num_hidden_layers * RNG_STATE + SCALARS, (
            row["label"],
            extra,
        )
        assert extra < 0.01 * row["peak_exact"] * 2**30


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_gradient_checkpointing_is_accounted_on_meta(mode: str) -> None:
    """HF gradient checkpointing on the meta device: every kind of row accounts, keeps less for
    backward and peaks lower, and recomputes forward work in backward."""
    setup = Setup(model="tiny", batch=2, seq=256, dtype="fp32", device="meta", card="h100")
    config = model_config("tiny")
    for method in ("floor", "floor+lean", "paca", "s2ft", "lora", "hydra", "peft-lora", "full", "full-mixed"):
        plain = account(method, setup, config)
        checkpointed = account(method, dataclasses.replace(setup, checkpointing=mode), config)
        assert checkpointed.error is None and checkpointed.label == f"{method} (gc {mode})"
        assert checkpointed.saved_total < plain.saved_total, method
        assert checkpointed.peak_exact < plain.peak_exact, method
        assert checkpointed.backward_tflop > plain.backward_tflop, method
        assert sum(checkpointed.peak_parts.values()) == pytest.approx(checkpointed.peak_exact, rel=1e-12)


def test_full_rows_say_their_precision() -> None:
    """`full` keeps bf16 weights, gradients and moments (8 bytes a parameter); `full-mixed` float32
    masters and moments beside the bf16 weight and gradient (16 bytes a parameter)."""
    setup = Setup(model="tiny", batch=1, seq=16, dtype="bf16", device="meta", card="h100")
    config = model_config("tiny")
    pure, mixed = account("full", setup, config), account("full-mixed", setup, config)
    n = pure.trainable_params * 2**-30
    steps = 4 * 2**-30 * len(list(build_model(config, torch.device("meta"), torch.bfloat16, 0).parameters()))
    model = build_model(config, torch.device("meta"), torch.bfloat16, 0)
    buffers = sum(b.nbytes for b in model.buffers()) * 2**-30
    assert pure.weights == pytest.approx(2 * n + buffers) and pure.gradients == pytest.approx(2 * n)
    assert pure.optimizer == pytest.approx(4 * n + steps)
    assert mixed.weights + mixed.gradients + mixed.optimizer == pytest.approx(16 * n + buffers + steps)
    assert mixed.peak_parts["optimizer state"] == pytest.approx(mixed.optimizer)
    text = table([pure, mixed], setup)
    assert "pure in the model's dtype" in text and "float32 masters and AdamW moments" in text


def test_the_time_model_bounds_each_kernel_by_its_slower_side() -> None:
    """max(FLOPs / peak, bytes / bandwidth) per kernel: a skinny product is paid at its traffic."""
    card = accounting.CARDS["h100"]
    work = {(True, 2 * 10**12, 10**9): 1, (True, 10**9, 4 * 10**9): 3, (False, 67 * 10**9, 0): 2}
    step = accounting.StepAccount(0, 0, 0, 0, 0, 0, {}, 0, {}, 0.0, 0.0, 0, work)
    expected = 2 / 989 + 3 * 4e9 / 3.35e12 + 2 * 67e9 / 67e12
    assert accounting.modelled_ms(step, card) == pytest.approx(expected * 1e3)
    # PaCA's column gradients (dy^T x[:, idx]: few FLOPs, the whole dy read) cost more than their FLOPs.
    setup = Setup(model="tinyllama-1.1b", batch=8, seq=2048, dtype="bf16", device="meta", card="h100")
    config = model_config("tinyllama-1.1b")
    floor, paca = account("floor", setup, config), account("paca", setup, config)
    extra_flops = (
        paca.forward_tflop + paca.backward_tflop - floor.forward_tflop - floor.backward_tflop
    ) * 1e12
    assert paca.modelled_ms - floor.modelled_ms > 1.5 * extra_flops / (card.tflops_16bit * 1e12) * 1e3


def test_rows_are_written_as_they_finish(tmp_path, monkeypatch) -> None:
    """A run cut short (a time box's SIGINT) keeps every finished row in its table, CSV and JSON."""
    from slimtune.apps import profile as module

    real = module.account

    def account_then_stop(method, setup, config):
        if method == "lora":
            raise KeyboardInterrupt
        return real(method, setup, config)

    monkeypatch.setattr(module, "account", account_then_stop)
    with pytest.raises(KeyboardInterrupt):
        profile(model="tiny", batch=1, seq=8, dtype="fp32", methods=["floor", "paca", "lora"], out=tmp_path)
    assert [r["method"] for r in json.loads((tmp_path / "report.json").read_text())["rows"]] == [
        "floor",
        "paca",
    ]
    assert [r["method"] for r in csv.DictReader((tmp_path / "profile.csv").open())] == ["floor", "paca"]
    assert "| paca |" in (tmp_path / "profile.md").read_text()


def test_plot_stacks_equal_the_table_and_name_no_path(tmp_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from slimtune.apps.profile import _memory_panel, _model_name

    setup = Setup(model="tinyllama-1.1b", batch=8, seq=2048, dtype="bf16", device="meta", card="h100")
    config = model_config("tinyllama-1.1b")
    rows = [account(m, setup, config) for m in ("floor", "full")]
    fig, ax = plt.subplots()
    _memory_panel(ax, rows)
    tops = {}
    for bar in ax.patches:
        tops[bar.get_x()] = max(tops.get(bar.get_x(), 0.0), bar.get_y() + bar.get_height())
    assert sorted(tops.values()) == pytest.approx(sorted(r.peak_card for r in rows))
    assert ax.get_ylim()[1] >= max(r.peak_card for r in rows)
    assert [line.get_ydata()[0] for line in ax.get_lines()] == [80.0]  # A100 and H100 share one line
    labels = ax.get_legend_handles_labels()[1]
    assert "batch" in labels and "gradients" not in labels  # nothing live at these peaks is a gradient
    plt.close(fig)
    assert _model_name(str(tmp_path / "my-model" / "config.json")) == "my-model"
    assert _model_name(str(tmp_path / "my-model")) == "my-model"


@pytest.mark.parametrize("card", [True, False], ids=["card", "cpu"])
def test_a_fused_kernel_counts_its_outputs_on_a_card_and_its_reference_s_temporaries_on_a_cpu(card) -> None:
    """glu_backward on a card writes dgate and dup from registers; the CPU runs its reference, whose
    float32 act, act' and products are real allocations. Both count the kernel's FLOPs and traffic."""
    n, i = 64, 48
    gate, up, dh = (torch.empty(n, i, device="meta", dtype=torch.bfloat16) for _ in range(3))
    dgate, dup = torch.empty_like(gate), torch.empty_like(gate)
    counter = accounting.StepCounter(card=card)
    counter.adopt([gate, up, dh, dgate, dup], "temporaries")
    counter.restart()
    with accounting._Dispatch(counter), accounting.fused_kernels(counter):
        h = slimtune.ops.glu_backward.run(dh, gate, up, "silu", dgate, dup)
    extra = counter.peak - counter.live
    assert h.shape == (n, i) and len(counter.work) == 1  # one kernel
    if card:
        assert extra == 0  # h is live at the end; nothing else was
    else:
        assert extra >= 3 * n * i * 4  # at least the float32 act, act' and a product
