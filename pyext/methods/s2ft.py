"""S2FT: select heads and FFN channels per block, co-permute coupled weights, train dense blocks.

Co-permutation reorders attention heads (q rows, k/v rows, o columns) and FFN channels (gate/up
rows, down columns) so that the selected units come first: the model computes the same function,
and the trained entries of `o_proj`/`down_proj` (and optionally `v_proj`, `gate_proj`/`up_proj`)
become one contiguous block. Grouped-query attention constrains the head order: a q head must stay
with its k/v head, so kv groups move as a whole and heads move freely only inside their group.
Heads are therefore selected group by group (a random, or weight-ranked, order of groups; heads
inside each group likewise), filling one group before the next, which makes the selection a
prefix of the permuted order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from .. import seeding
from ..architectures import BlockLayout, architecture, block_layout, block_stacks, head_geometry
from ..config import S2FTConfig, master_dtype
from ..layers.partial import COLUMNS, ROWS
from ..layers.s2ft import S2FTLinear
from ..ops import check_index
from ..registry import IN_PLACE, MERGE, SPARSE_DELTA, MethodInfo, register
from ..targets import check_plain_linear, check_untied
from ..transaction import Transaction
from .base import Method, Plan, Replacement, Step


@dataclass(frozen=True)
class Permutation:
    """new = old.index_select(dim, order) for one parameter: how co-permutation moves a tensor."""

    module: str
    param: str
    dim: int
    order: Tensor

    def apply(self, model: nn.Module, inverse: bool = False) -> None:
        """Permute the tensor in place (a Step's `do`): the one write is the last torch call, so a
        failure anywhere before it leaves the tensor as it was."""
        tensor = getattr(model.get_submodule(self.module), self.param)
        order = (torch.argsort(self.order) if inverse else self.order).to(tensor.device)
        moved = tensor.detach().index_select(self.dim, order)
        tensor.detach().copy_(moved)  # a detached view: no autograd state to restore after the write


def _units(amount: int | float, available: int, what: str, where: str) -> int:
    if isinstance(amount, float):
        return max(1, round(amount * available)) if amount > 0 else 0
    if amount > available:
        raise ValueError(
            f"S2FTConfig asks for {amount} {what} but {where} has {available}; use at most {available}"
        )
    return amount


def _expand(units: Tensor, size: int) -> Tensor:
    """Unit order -> element order for units of `size` consecutive rows/columns."""
    return (units[:, None] * size + torch.arange(size)).reshape(-1)


@dataclass
class S2FTRecord:
    """What S2FT's plan did: the co-permutations it applied (undone in reverse by `unpatch`) and
    the selected heads and channels of every block (saved in checkpoints)."""

    permutations: list[Permutation]
    selections: dict[str, Tensor]


class S2FTMethod(Method):
    name = "s2ft"

    def plan(self, model: nn.Module, config: S2FTConfig, saved: dict[str, Tensor] | None = None) -> Plan:
        geometry = _geometry(model)
        stacks = block_stacks(model)
        if not stacks:
            raise ValueError(f"S2FT found no transformer block list in {type(model).__name__}")
        replacements: list[Replacement] = []
        permutations: list[Permutation] = []
        selections: dict[str, Tensor] = {}
        for prefix, stack in stacks:
            for i, block in enumerate(stack):
                layout = _layout(model, f"{prefix}.{i}", block, config)
                generator = seeding.generator(config.seed, layout.name)
                if config.heads:
                    heads = self._heads(model, layout, geometry, config, generator, saved)
                    selections[f"{layout.name}.heads"] = heads
                    self._plan_heads(
                        model, layout, geometry, config, heads, permutations, replacements, saved
                    )
                if config.channels:
                    channels = self._channels(model, layout, config, generator, saved)
                    selections[f"{layout.name}.channels"] = channels
                    self._plan_channels(model, layout, config, channels, permutations, replacements, saved)

        check_untied(model, [r.name for r in replacements], "S2FT")
        steps = [Step(partial(p.apply, model), partial(p.apply, model, inverse=True)) for p in permutations]
        return Plan(replacements, steps, S2FTRecord(permutations, selections))

    # ---- selection ------------------------------------------------------------------------------

    def _heads(self, model, layout, geometry, config, generator, saved) -> Tensor:
        n_heads, n_kv, head_dim = geometry
        group = n_heads // n_kv
        key = f"{layout.name}.heads"
        if saved is not None:
            return _saved_units(saved, key, n_heads)
        count = _units(config.heads, n_heads, "heads", f"block {layout.name!r}")
        if config.selection == "random":
            group_order = torch.randperm(n_kv, generator=generator)
            within = [torch.randperm(group, generator=generator) for _ in range(n_kv)]
        else:  # weight-norm: rank heads by the norm of their o_proj columns
            o_weight = model.get_submodule(layout.o).weight.detach().float()
            score = (
                o_weight.reshape(o_weight.shape[0], n_heads, head_dim).norm(dim=(0, 2)).reshape(n_kv, group)
            )
            group_order = torch.argsort(score.max(dim=1).values, descending=True, stable=True)
            within = [torch.argsort(score[g], descending=True, stable=True) for g in range(n_kv)]
        chosen = []
        for g in group_order.tolist():
            take = min(group, count - len(chosen))
            chosen.extend((g * group + within[g][:take]).tolist())
            if len(chosen) == count:
                break
        return torch.tensor(chosen, dtype=torch.long)

    def _channels(self, model, layout, config, generator, saved) -> Tensor:
        down = model.get_submodule(layout.down)
        key = f"{layout.name}.channels"
        if saved is not None:
            return _saved_units(saved, key, down.in_features)
        count = _units(config.channels, down.in_features, "FFN channels", f"block {layout.name!r}")
        if config.selection == "random":
            return torch.randperm(down.in_features, generator=generator)[:count]
        score = down.weight.detach().float().norm(dim=0)
        return torch.argsort(score, descending=True, stable=True)[:count]

    # ---- co-permutation and layers --------------------------------------------------------------

    def _plan_heads(self, model, layout, geometry, config, heads, permutations, replacements, saved) -> None:
        n_heads, n_kv, head_dim = geometry
        group = n_heads // n_kv
        _check_head_shapes(model, layout, geometry)
        used_groups = list(dict.fromkeys((heads // group).tolist()))
        group_order = torch.tensor(used_groups + [g for g in range(n_kv) if g not in used_groups])
        chosen = set(heads.tolist())
        q_order = []
        for g in group_order.tolist():
            members = range(g * group, (g + 1) * group)
            q_order += [h for h in heads.tolist() if h // group == g] + [
                h for h in members if h not in chosen
            ]
        q_rows = _expand(torch.tensor(q_order), head_dim)
        kv_rows = _expand(group_order, head_dim)
        if layout.qkv:
            q_size, kv_size = n_heads * head_dim, n_kv * head_dim
            rows = torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows])
            permutations += _permute(model, layout.qkv, rows, dim=0)
        else:
            permutations += _permute(model, layout.q, q_rows, dim=0)
            permutations += _permute(model, layout.k, kv_rows, dim=0)
            permutations += _permute(model, layout.v, kv_rows, dim=0)
        permutations += _permute(model, layout.o, q_rows, dim=1)
        trained = torch.arange(len(heads) * head_dim)
        replacements.append(_replacement(model, layout.o, trained, COLUMNS, saved, config.fp32_master))
        if config.train_v_rows:
            v_rows = torch.arange(len(used_groups) * head_dim)
            if layout.qkv:
                v_offset = (n_heads + n_kv) * head_dim
                replacements.append(
                    _replacement(model, layout.qkv, v_offset + v_rows, ROWS, saved, config.fp32_master)
                )
            else:
                replacements.append(_replacement(model, layout.v, v_rows, ROWS, saved, config.fp32_master))

    def _plan_channels(self, model, layout, config, channels, permutations, replacements, saved) -> None:
        down = model.get_submodule(layout.down)
        size = down.in_features
        chosen = set(channels.tolist())
        order = torch.cat(
            [channels, torch.tensor([c for c in range(size) if c not in chosen], dtype=torch.long)]
        )
        trained = torch.arange(len(channels))
        if layout.gate_up:
            permutations += _permute(model, layout.gate_up, torch.cat([order, size + order]), dim=0)
        else:
            for name in (layout.gate, layout.up):
                if name:
                    permutations += _permute(model, name, order, dim=0)
        permutations += _permute(model, layout.down, order, dim=1)
        replacements.append(_replacement(model, layout.down, trained, COLUMNS, saved, config.fp32_master))
        if config.train_gate_up_rows:
            if layout.gate_up:
                replacements.append(
                    _replacement(
                        model,
                        layout.gate_up,
                        torch.cat([trained, size + trained]),
                        ROWS,
                        saved,
                        config.fp32_master,
                    )
                )
            else:
                for name in (layout.gate, layout.up):
                    if name:
                        replacements.append(
                            _replacement(model, name, trained, ROWS, saved, config.fp32_master)
                        )

    # ---- checkpoints and merge ------------------------------------------------------------------

    def checkpoint_tensors(self, layers: dict[str, nn.Module], extra: S2FTRecord) -> dict[str, Tensor]:
        tensors = super().checkpoint_tensors(layers, extra)
        tensors.update(extra.selections)
        return tensors

    def unpatch(
        self, model: nn.Module, layers: dict[str, nn.Module], extra: S2FTRecord, transaction: Transaction
    ) -> None:
        super().unpatch(model, layers, extra, transaction)
        for permutation in reversed(extra.permutations):
            permutation.apply(model, inverse=True)
            transaction.on_rollback(partial(permutation.apply, model))

    def original_index(self, name: str, layer: S2FTLinear, extra: S2FTRecord) -> Tensor:
        """Where the trained entries of `name` sit in the original (unpermuted) layout."""
        index = layer.index.cpu()
        for permutation in extra.permutations:
            if permutation.module == name and permutation.param == "weight" and permutation.dim == layer.axis:
                index = permutation.order[index]
        return index


def _check_head_shapes(model: nn.Module, layout: BlockLayout, geometry: tuple[int, int, int]) -> None:
    """The projections must have the sizes the config's heads imply, or co-permutation breaks the model."""
    n_heads, n_kv, head_dim = geometry
    expected = {layout.o: ("in_features", n_heads * head_dim)}
    if layout.qkv:
        expected[layout.qkv] = ("out_features", (n_heads + 2 * n_kv) * head_dim)
    else:
        expected.update({layout.q: ("out_features", n_heads * head_dim)})
        expected.update({name: ("out_features", n_kv * head_dim) for name in (layout.k, layout.v)})
    for name, (attribute, size) in expected.items():
        actual = getattr(model.get_submodule(name), attribute)
        if actual != size:
            raise ValueError(
                f"{name!r} has {attribute}={actual} but the config's {n_heads} heads, {n_kv} kv heads and "
                f"head_dim {head_dim} imply {size}; S2FT heads cannot co-permute this attention (set heads=0)"
            )


def _saved_units(saved: dict[str, Tensor], key: str, available: int) -> Tensor:
    if key not in saved:
        raise ValueError(f"checkpoint has no selection {key!r}: it was saved from another model or config")
    units = saved[key]
    try:
        check_index(units, available, f"checkpoint selection {key!r}", distinct=True)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{err}: the checkpoint belongs to another model, or is damaged") from None
    return units


def _permute(model: nn.Module, name: str, order: Tensor, dim: int) -> list[Permutation]:
    module = model.get_submodule(name)
    perms = [Permutation(name, "weight", dim, order)]
    if dim == 0 and module.bias is not None:
        perms.append(Permutation(name, "bias", 0, order))
    return perms


def _replacement(
    model: nn.Module, name: str, index: Tensor, axis: int, saved, fp32_master: bool
) -> Replacement:
    linear = check_plain_linear(name, model.get_submodule(name))
    block = None
    if saved is not None:
        block = saved.get(f"{name}.trained")
        expected = (linear.out_features, len(index)) if axis == COLUMNS else (len(index), linear.in_features)
        if block is None or tuple(block.shape) != expected:
            raise ValueError(
                f"checkpoint block of {name!r} is missing or not {expected}: another model or config"
            )
        if not block.is_floating_point():
            raise TypeError(f"checkpoint block of {name!r} holds {block.dtype} values; expected floats")
        stored = saved.get(f"{name}.index")  # redundant with the selection: must agree with it
        if stored is not None and not torch.equal(stored, index):
            raise ValueError(f"checkpoint index of {name!r} disagrees with its block's selection: damaged")

    def build() -> S2FTLinear:
        module = model.get_submodule(name)
        layer = S2FTLinear(module, index, axis, master_dtype(fp32_master, module.weight.dtype))
        if block is not None:
            with torch.no_grad():
                layer.s2ft_block.copy_(block)
            layer.sync_()
        return layer

    return Replacement(name, build, None if block is None else (index, axis))


def _geometry(model: nn.Module) -> tuple[int, int, int]:
    """(heads, kv heads, head_dim), from the architecture registry."""
    try:
        g = head_geometry(model)
    except ValueError as err:
        raise ValueError(f"S2FT heads: {err}") from None
    return g.heads, g.kv_heads, g.head_dim


def _layout(model: nn.Module, name: str, block: nn.Module, config: S2FTConfig) -> BlockLayout:
    """The attention and MLP projections of a block, refusing layouts S2FT cannot co-permute."""
    layout = block_layout(name, block, architecture(model))
    if config.heads and layout.o is None:
        raise ValueError(
            f"S2FT heads: block {name!r} has no attention module with q_proj/k_proj/v_proj (or qkv_proj) "
            f"and o_proj; set heads=0, or add its layout to slimtune.architectures"
        )
    if config.channels and layout.down is None:
        what = (
            f"its MLP is a mixture of experts held as fused tensors ({layout.experts[0]!r}), not nn.Linear"
            if layout.experts
            else "it has no gated MLP with gate_proj/up_proj (or gate_up_proj) and down_proj"
        )
        raise ValueError(
            f"S2FT channels: block {name!r} cannot co-permute FFN channels: {what}; set channels=0 "
            f"(heads still train), or add its layout to slimtune.architectures"
        )
    for module_name in layout.projections():
        check_plain_linear(module_name, model.get_submodule(module_name))
    return layout


register(
    MethodInfo(
        name="s2ft",
        config=S2FTConfig,
        glue=S2FTMethod(),
        layers=(S2FTLinear,),
        capabilities=frozenset({IN_PLACE, MERGE, SPARSE_DELTA}),
        summary="a few co-permuted attention heads and FFN channels per block, trained in place",
        sized=lambda budget, seed: S2FTConfig(heads=0.05, channels=0.03, seed=seed),
        lr=2e-2,
    )
)
