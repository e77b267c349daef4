"""DeepSpeed with 2 gloo processes on CPUs: ZeRO-2 trains every method exactly (the losses and the
trained tensors of one process); ZeRO-3 with its parameters really released (no persistence
threshold, no reuse) trains LoRA and Hydra exactly and refuses PaCA and S2FT at the first forward,
naming the engine, before any step."""

from __future__ import annotations

import os

import pytest
import slimtune
import torch
from tiny_models import free_port, make_batch, make_model, run_two_processes, sharded_steps, stepped_losses

METHODS = {
    "paca": slimtune.PaCAConfig(r=4),
    "s2ft": slimtune.S2FTConfig(heads=1, channels=8),
    "lora": slimtune.LoRAConfig(r=4, alpha=8),
    "hydra": slimtune.HydraConfig(2, 2, alpha=4),
}
CASES = [(2, m) for m in METHODS] + [(3, "lora"), (3, "hydra")]
REFUSED = [(3, "paca"), (3, "s2ft")]


def _config(stage: int, world: int) -> dict:
    release = {"stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0}
    return {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 4 // world,
        "zero_optimization": {"stage": stage, **(release if stage == 3 else {})},
    }


def _trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors, whole (ZeRO-3 gathers its partitions for the read)."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train(stage: int, method: str, rank: int, world: int) -> dict:
    import deepspeed

    torch.manual_seed(0)
    model = slimtune.apply(make_model("llama"), METHODS[method])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=params, config=_config(stage, world)
    )
    losses = stepped_losses(engine, engine.backward, engine.step, rank, world)
    return {"losses": losses, "trained": _trained(model)}


def _refusal(stage: int, method: str, world: int) -> str:
    import deepspeed

    model = slimtune.apply(make_model("llama"), METHODS[method])
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(params, lr=1e-2), model_parameters=params,
        config=_config(stage, world),
    )  # fmt: skip
    try:
        engine(input_ids=make_batch(batch=2, seq=10))
    except RuntimeError as err:
        return str(err)
    return ""


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
    )  # fmt: skip
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {f"{s}-{m}": _train(s, m, rank, world) for s, m in CASES}
    results |= {f"refused-{s}-{m}": _refusal(s, m, world) for s, m in REFUSED}
    if rank == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    return run_two_processes(_worker, tmp_path_factory.mktemp("deepspeed"), free_port())


@pytest.mark.parametrize("stage, method", CASES, ids=[f"zero{s}-{m}" for s, m in CASES])
def test_deepspeed_with_two_processes_takes_the_steps_of_one(stage, method, two_processes) -> None:
    torch.manual_seed(0)
    model = slimtune.apply(make_model("llama"), METHODS[method])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = sharded_steps(model, optimizer, 0, 1)
    two = two_processes[f"{stage}-{method}"]
    assert two["losses"] == pytest.approx(losses, rel=1e-6)
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert trained.keys() == two["trained"].keys()
    for name, value in trained.items():
        torch.testing.assert_close(two["trained"][name], value, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("stage, method", REFUSED, ids=[f"zero{s}-{m}" for s, m in REFUSED])
def test_deepspeed_zero3_refuses_in_place_methods_by_name(stage, method, two_processes) -> None:
    message = two_processes[f"refused-{stage}-{method}"]
    assert "DeepSpeed ZeRO-3" in message and "silently wrong" in message and "ZeRO-1/2" in message


def _accelerate_worker(rank: int, world: int, port: int, out: str) -> None:
    """accelerate's DeepSpeed plugin (ZeRO-2) around a PaCA model built and patched first."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", ACCELERATE_USE_DEEPSPEED="true",
    )  # fmt: skip
    from accelerate import Accelerator, DeepSpeedPlugin

    torch.manual_seed(0)
    model = slimtune.apply(make_model("llama"), METHODS["paca"])
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=1))
    accelerator.state.deepspeed_plugin.deepspeed_config.update(
        train_micro_batch_size_per_gpu=4 // world, train_batch_size=4
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, optimizer = accelerator.prepare(model, optimizer)

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad()

    losses = stepped_losses(engine, accelerator.backward, step, rank, world)
    if rank == 0:
        torch.save({"engine": type(engine).__name__, "losses": losses}, out)


def test_accelerate_s_deepspeed_plugin_trains_paca_exactly(tmp_path) -> None:
    two = run_two_processes(_accelerate_worker, tmp_path, free_port())
    torch.manual_seed(0)
    model = slimtune.apply(make_model("llama"), METHODS["paca"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert two["engine"] == "DeepSpeedEngine"
    assert two["losses"] == pytest.approx(sharded_steps(model, optimizer, 0, 1), rel=1e-6)


def test_a_model_built_inside_zero3_init_is_refused_by_name() -> None:
    """transformers builds inside deepspeed.zero.Init once ZeRO-3 is configured: the weights are
    empty partitions marked `ds_id`, and slimtune says how to order the calls."""
    from test_refusals import refused

    model = make_model("llama")
    for number, parameter in enumerate(model.parameters()):
        parameter.data = parameter.data.new_empty(0)
        parameter.ds_id = number
    refused(
        model, lambda: slimtune.apply(model, METHODS["lora"]), ValueError, "partitioned by DeepSpeed ZeRO-3"
    )
