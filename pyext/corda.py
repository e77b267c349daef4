"""CorDA: LoRA adapters built from the context of the data (Yang et al., "CorDA: Context-Oriented
Decomposition Adaptation of Large Language Models", NeurIPS 2024).

Each targeted linear's weight W is decomposed through the covariance C of its inputs on a few
samples: W C = U S V^T, so W = U S (V^T C^-1). The adapter takes r of those components, B0 = U_r
sqrt(S_r / s) and A0 = sqrt(S_r / s) V_r^T C^-1 (s = alpha / r), and the base weight becomes the
residual W - s B0 A0, so outputs at initialisation are unchanged.

- knowledge-preserved mode (`corda-kpm`): C comes from question-answer samples of what to keep;
  the r components with the *smallest* singular values train, the ones that carry that knowledge
  stay frozen in the residual;
- instruction-previewed mode (`corda-ipm`): C comes from the target task's data; the r *largest*
  components train.

The numbers follow PEFT's `preprocess_corda` (each sequence's input scaled by its maximum, the
mean over sequences, the doubling damping of C until its inverse is accurate), so both give the
same adapter for any batch shape (PEFT takes one sequence per call); departures: covariances
accumulate in float64 (PEFT: float32), the decomposition runs in float64, padding marked by an
attention mask is left out, the damping is bounded (PEFT's loop never ends on a NaN covariance),
and siblings that read the same input (q/k/v, gate/up) share one covariance (PEFT keeps one per
module).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import hf_model
from .config import LoRAConfig
from .methods.lora import check_dense_for_corda, residual
from .state import check_unpatched, commit, plan
from .targets import check_plain_linear, match_targets

MODES = {"corda-kpm": "smallest", "corda-ipm": "largest"}


class _Sums:
    """Per-module sums of X^T X over sequences, each X scaled by its own maximum (PEFT's hook runs
    on one sequence per call and scales by that call's maximum), and how many sequences they hold."""

    def __init__(self, offload: bool) -> None:
        self.offload = offload
        self.sums: dict[str, Tensor] = {}
        self.rows: dict[str, int] = {}

    def add(self, name: str, x: Tensor, keep: Tensor | None) -> None:
        """`x`: one sequence (tokens x features) or a batch of them; `keep`: the batch's attention
        mask flattened (padding is not context), or None."""
        rows = x.detach().reshape(-1, *x.shape[-2:]) if x.dim() >= 3 else x.detach().unsqueeze(0)
        rows = rows.double()
        kept = torch.ones(rows.shape[:2], dtype=torch.bool, device=rows.device)
        if keep is not None and keep.numel() == kept.numel():
            kept = keep.reshape(kept.shape).to(rows.device)
        if not torch.isfinite(rows[kept]).all():
            raise ValueError(f"CorDA: the input of {name} holds NaN or inf values; check the samples")
        present = kept.any(dim=1)  # a row of padding only is no sequence
        if not bool(present.any()):
            return
        rows, kept = rows[present], kept[present, :, None]
        peak = rows.masked_fill(~kept, -torch.inf).amax(dim=(1, 2)).abs()  # PEFT: max(x).abs()
        scaled = (rows / peak.clamp_min(torch.finfo(torch.float64).tiny)[:, None, None]).masked_fill(~kept, 0)
        flat = scaled.reshape(-1, scaled.shape[-1])
        product = flat.T @ flat
        if name not in self.sums:
            self.sums[name] = torch.zeros_like(product, device="cpu" if self.offload else product.device)
            self.rows[name] = 0
        self.sums[name] += product.to(self.sums[name].device)
        self.rows[name] += int(present.sum())

    def means(self) -> dict[str, Tensor]:
        return {name: total / self.rows[name] for name, total in self.sums.items()}


def _run(model: nn.Module, run: Iterable[Any] | Callable[[], None], keep: list[Tensor | None]) -> None:
    """Every batch through the model in eval mode; a dict batch's attention mask goes to `keep`."""
    was_training = model.training
    model.eval()
    try:
        for batch in [run] if callable(run) else run:
            if callable(batch):
                batch()
            elif isinstance(batch, dict):
                mask = batch.get("attention_mask")
                keep[0] = None if mask is None else mask.reshape(-1).bool()
                model(**batch)
            else:
                model(batch)
    finally:
        model.train(was_training)


@torch.no_grad()
def covariances(
    model: nn.Module,
    run: Iterable[Any] | Callable[[], None],
    target_modules: str | tuple[str, ...] | list[str] = "all-linear",
    offload: bool = False,
) -> dict[str, Tensor]:
    """The input covariance of every targeted linear, by module name (float64, in_features^2).

    `run` is an iterable of batches (a tensor of input ids, or a dict of model keyword arguments)
    or a callable that runs the model itself. Each sequence of a batch is scaled by its maximum and
    accumulated as X^T X; the result is the mean over sequences, so any batch shape gives PEFT's
    covariance (PEFT takes one sequence per call). Accumulators live beside the weights, or on the
    CPU with `offload` (slower; for a model whose covariances do not fit beside it: in_features^2 *
    8 bytes per distinct input). Padding tokens count as context unless a dict batch gives an
    `attention_mask`; a row of padding only counts as no sequence.
    """
    targets = [(name, check_plain_linear(name, m)) for name, m in match_targets(model, target_modules)]
    sums = _Sums(offload)
    shared: dict[str, str] = {}  # module -> the sibling whose accumulator holds its (identical) input
    keep: list[Tensor | None] = [None]  # the batch's attention mask, flattened to tokens
    last: list[Any] = [None, ""]  # the latest input and the module that counted it: siblings that
    # read one tensor (q/k/v, gate/up) run one after the other, and count it once

    def hook(name: str, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        if x is last[0]:
            if shared.setdefault(name, last[1]) != last[1]:
                raise RuntimeError(f"{name} read the input of {shared[name]} once and of {last[1]} later")
            return
        if name in shared:
            raise RuntimeError(f"{name} shared an input with {shared[name]} in one forward but not the next")
        last[:] = [x, name]
        sums.add(name, x, keep[0])

    handles = [m.register_forward_pre_hook(lambda m, a, n=n: hook(n, m, a)) for n, m in targets]
    try:
        _run(model, run, keep)
    finally:
        last[:] = [None, ""]
        for handle in handles:
            handle.remove()
    means = sums.means()
    missing = [name for name, _ in targets if shared.get(name, name) not in means]
    if missing:
        raise ValueError(
            f"CorDA: {missing[:4]} never ran on a sequence of the samples (none given, or all padding); "
            f"check target_modules and `run`"
        )
    return {name: means[shared.get(name, name)] for name, _ in targets}


MAX_DOUBLINGS = 40  # of the damping; PEFT's loop has no bound (a NaN covariance never ends it)


def check_covariance(covariance: Tensor) -> None:
    """Refuse a covariance no decomposition can use: NaN or inf entries, no positive variance."""
    if not torch.isfinite(covariance).all():
        raise ValueError("CorDA: the covariance holds NaN or inf values; collect it again from finite inputs")
    if not bool((covariance.diagonal() > 0).any()):
        raise ValueError(
            "CorDA: the covariance has no positive variance (every input feature was zero, or every "
            "token padding); collect it from samples that reach the module"
        )


def decompose(weight: Tensor, covariance: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, V) in float64 with W C = U S V'^T and V = C^-1 V' (so W = U diag(S) V^T); C is damped
    by a multiple of its mean diagonal, doubled until its inverse is accurate, as in PEFT."""
    w, c = weight.detach().double(), covariance.to(weight.device, torch.float64)
    check_covariance(c)
    eye = torch.eye(c.shape[0], dtype=torch.float64, device=c.device)
    for doubling in range(MAX_DOUBLINGS + 1):
        damped = c + eye * c.diagonal().mean() * (0.01 * 2**doubling)
        inverse, info = torch.linalg.inv_ex(damped)
        if info == 0 and torch.dist(damped @ inverse, eye) < 0.05:
            break
    else:  # damping at 2^40 times the mean variance still leaves no accurate inverse
        raise ValueError("CorDA: the covariance cannot be inverted accurately even heavily damped")
    u, s, vh = torch.linalg.svd(w @ damped, full_matrices=False)
    return u, s, (vh @ inverse).T


def factors(
    weight: Tensor, covariance: Tensor, rank: int, mode: str, scaling: float
) -> tuple[Tensor, Tensor]:
    """The initial (A0, B0), float64, of `mode` ("corda-kpm": the smallest components; "corda-ipm":
    the largest) with s * B0 @ A0 the chosen part of the weight."""
    u, s, v = decompose(weight, covariance)
    pick = slice(-rank, None) if MODES[mode] == "smallest" else slice(0, rank)
    root = (s[pick] / scaling).sqrt()
    return (v[:, pick] * root).T.contiguous(), (u[:, pick] * root).contiguous()


def check(model: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Linear]]:
    """Everything `apply` checks that needs no data (the config, every target, each rank against its
    module), model untouched; the targets. Run it before collecting covariances."""
    if not isinstance(config, LoRAConfig) or config.init not in MODES:
        raise ValueError(
            f"slimtune.corda.apply needs LoRAConfig(init= one of {sorted(MODES)}), got {config!r}"
        )
    check_unpatched(model)
    planned = plan(model, dataclasses.replace(config, init="random"))  # LoRA's own checks of the targets
    targets = [(r.name, model.get_submodule(r.name)) for r in planned.replacements]
    for name, linear in targets:
        check_dense_for_corda(name, linear, config.init)
        if config.r > min(linear.in_features, linear.out_features):
            raise ValueError(
                f"CorDA: rank {config.r} exceeds the rank of {name} ({tuple(linear.weight.shape)}); "
                f"use r <= {min(linear.in_features, linear.out_features)}"
            )
    return targets


def apply(model: nn.Module, config: LoRAConfig, covariance: dict[str, Tensor]) -> nn.Module:
    """`slimtune.apply` for a LoRA config with a CorDA `init`: the adapter of every target from its
    covariance, the base weight replaced by the residual (all checked first, in one transaction)."""
    saved: dict[str, Tensor] = {}
    for name, linear in check(model, config):
        c = covariance.get(name)
        if c is None:
            raise ValueError(f"CorDA: no covariance for {name}; collect it with slimtune.corda.covariances")
        if tuple(c.shape) != (linear.in_features,) * 2:
            raise ValueError(
                f"CorDA: the covariance of {name} is {tuple(c.shape)}, but the layer reads "
                f"{linear.in_features} features: it was collected on another model"
            )
        try:
            a0, b0 = factors(linear.weight, c, config.r, config.init, config.alpha / config.r)
        except ValueError as err:
            raise ValueError(f"{err} (module {name})") from None
        dtype = torch.float32 if config.fp32_master else linear.weight.dtype
        a0, b0 = a0.to(dtype).cpu(), b0.to(dtype).cpu()
        saved.update(
            {f"{name}.lora_A": a0, f"{name}.lora_B": b0, f"{name}.corda_A": a0, f"{name}.corda_B": b0}
        )
    return hf_model.install(commit(model, config, plan(model, config, saved)))


__all__ = ["MODES", "apply", "check", "check_covariance", "covariances", "decompose", "factors", "residual"]
