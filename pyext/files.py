"""Atomic file writes, and tensor reads that name a damaged file instead of raising deep inside.

A written file is either absent, the old version, or complete (never truncated): everything slimtune
writes (checkpoints, deltas, PEFT directories, the trainer's run folder) goes through these, so a
kill -9 mid-write cannot leave a file that a later load or `--resume` trips on. Tensor files carry a
SHA-256 of their tensors in the safetensors metadata, verified on read: a flipped bit in stored
values is refused instead of loading into a different model (files without one, e.g. PEFT's, load
as they are).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

CHECKSUM = "slimtune_sha256"  # metadata key of the checksum over a file's tensors
CONFIG_DIGEST = "slimtune_config_sha256"  # metadata key: the digest of the config saved beside them


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    partial = _partial(path)
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def hash_file(path: str | Path, hasher: Any = None) -> Any:
    """`hasher` (a new SHA-256 if None) fed with the file's bytes, read in 1 MiB blocks; returned."""
    hasher = hashlib.sha256() if hasher is None else hasher
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher


def digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (in name order)."""
    hasher = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        hasher.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        hasher.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return hasher.hexdigest()


def json_digest(value: Any) -> str:
    """SHA-256 of a JSON value in canonical form (sorted keys, no spaces): layout edits do not count."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_bound(config_path: Path, value: Any, metadata: dict[str, str], tensors_path: Path) -> None:
    """Refuse a config that is not the one its tensors were saved with (where they record it)."""
    if CONFIG_DIGEST in metadata and metadata[CONFIG_DIGEST] != json_digest(value):
        raise ValueError(
            f"{config_path} does not match {tensors_path.name} (it was edited or damaged since slimtune "
            f"wrote both): refusing to load the tensors under another config"
        )


def write_with(path: str | Path, writer: Callable[[Path], object]) -> Path:
    """Atomically: `writer(temporary_path)` writes the file (e.g. `figure.savefig`), then a rename."""
    path = Path(path)
    partial = _partial(path).with_suffix(path.suffix)  # writers pick the format from the suffix
    try:
        writer(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def write_together(writers: dict[Path, Callable[[Path], object]]) -> None:
    """Write several files as one: each `writer(staged_path)` writes its file beside its target,
    then all are renamed into place. After any failure every target is as it was before (a file
    that existed comes back from a hard link kept until the end), so a pair bound by a digest, such
    as a checkpoint's config and tensors, is never half old and half new."""
    staged = {path: path.with_name(f".{path.name}.staged-{os.getpid()}") for path in writers}
    previous = {path: path.with_name(f".{path.name}.previous-{os.getpid()}") for path in writers}
    replaced: list[Path] = []
    try:
        for path, writer in writers.items():
            writer(staged[path])  # a failure here (a full disk) has replaced nothing
        for path in writers:
            if path.exists():
                os.link(path, previous[path])
        for path in writers:
            os.replace(staged[path], path)
            replaced.append(path)
    except BaseException:
        for path in reversed(replaced):
            if previous[path].exists():
                os.replace(previous[path], path)
            else:
                path.unlink(missing_ok=True)
        raise
    finally:
        for path in [*staged.values(), *previous.values()]:
            path.unlink(missing_ok=True)


def save_tensors(
    tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """`safetensors.torch.save_file`, atomically, with a checksum that `read_tensors` verifies."""
    path = Path(path)
    partial = _partial(path)
    metadata = {**(metadata or {}), CHECKSUM: digest(tensors)}
    try:
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # gone after the rename; a failed write leaves nothing
    return path


def read_json(path: str | Path) -> Any:
    """The JSON value in `path`; ValueError naming the file for bytes that are not UTF-8 JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({type(err).__name__}: {err})") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file, without reading its tensors (ValueError as `read_tensors`)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types (and OSError) for a damaged file
        raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from None


def read_tensors(path: str | Path, max_bytes: int | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; ValueError naming the file for anything unreadable,
    or (before reading a byte of it) for a file larger than `max_bytes`."""
    size = Path(path).stat().st_size if max_bytes is not None and Path(path).is_file() else 0
    if max_bytes is not None and size > max_bytes:
        raise ValueError(
            f"{path} holds {size:,d} bytes, more than any checkpoint of this model can ({max_bytes:,d}: four "
            f"times its parameters): a damaged or foreign file, not read"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (no __iter__)
    except Exception as err:  # safetensors raises its own error types (and OSError) for a damaged file
        raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from None
    if CHECKSUM in metadata and metadata[CHECKSUM] != digest(tensors):
        raise ValueError(f"{path} is damaged: its tensors do not match the checksum written with them")
    _warn_non_finite(tensors, path)
    return tensors, metadata


def checkpoint_limit(model: torch.nn.Module) -> int:
    """The most bytes a checkpoint of `model` can hold: four times its parameters (float32 copies of a
    16-bit model's entries, adapters, indices), plus 1 MiB of headers."""
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters()) + 2**20


def _warn_non_finite(tensors: dict[str, Tensor], path: str | Path) -> None:
    """A loaded NaN or inf makes every output NaN: say which tensors hold them (PEFT loads silently)."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        warnings.warn(
            f"{path}: {len(bad)} tensor(s) hold NaN or inf values ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); a model loaded from it computes NaN or inf",
            stacklevel=3,
        )


def index_value_pairs(tensors: dict[str, Tensor], path: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
    """`NAME.index` / `NAME.values` tensors paired by NAME; ValueError for an unpaired or odd key."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, part = key.rpartition(".")
        if not name or part not in ("index", "values"):
            raise ValueError(f"{path}: tensor {key!r} is neither NAME.index nor NAME.values: a damaged diff")
        pairs.setdefault(name, {})[part] = tensor
    for name, parts in pairs.items():
        if len(parts) != 2:
            raise ValueError(f"{path}: {name!r} has {sorted(parts)}, needs index and values: a damaged diff")
    return {name: (parts["index"], parts["values"]) for name, parts in pairs.items()}
