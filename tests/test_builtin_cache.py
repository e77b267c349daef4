"""The built-in model's cache: stamped by the GGUF's content and by every file it holds, so the same
wheel in two environments shares one cache and a damaged cache is rebuilt, never loaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import slimtune

NAME = "smollm2-135m"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fake GGUF source and a fake conversion that counts its calls."""
    source = tmp_path / "wheel" / "model.gguf"
    source.parent.mkdir()
    source.write_bytes(b"gguf" * 1000)
    builds: list[Path] = []

    def dequantise(src: Path, folder: Path) -> None:
        builds.append(folder)
        (folder / "config.json").write_text('{"layers": 2}')
        (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(slimtune.models, "gguf_file", lambda name: source)
    monkeypatch.setattr(slimtune.models, "_dequantise", dequantise)
    monkeypatch.setattr(slimtune.models, "HASHED_BYTES", 1024)  # the weights file is not hashed
    return source, builds


def test_a_built_cache_is_reused(cache) -> None:
    _, builds = cache
    folder = slimtune.models.path(NAME)
    assert slimtune.models.is_built(NAME) and slimtune.models.path(NAME) == folder and len(builds) == 1


@pytest.mark.parametrize(
    "damage", ["edit the config", "overwrite weights", "truncate", "delete", "add a file"]
)
def test_a_damaged_cache_is_rebuilt(cache, damage) -> None:
    _, builds = cache
    folder = slimtune.models.path(NAME)
    weights = folder / "model.safetensors"
    if damage == "edit the config":  # same size, same mtime: caught by its SHA-256
        stat = (folder / "config.json").stat()
        (folder / "config.json").write_text('{"layers": 9}')
        os.utime(folder / "config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    elif damage == "overwrite weights":  # 64 bytes zeroed in place: a new modification time
        with weights.open("r+b") as handle:
            handle.write(bytes(64))
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "delete":
        weights.unlink()
    else:
        (folder / "extra.bin").write_bytes(b"x")
    assert not slimtune.models.is_built(NAME)
    slimtune.models.path(NAME)
    assert len(builds) == 2 and slimtune.models.is_built(NAME)
    assert (folder / "config.json").read_text() == '{"layers": 2}'


def test_the_same_wheel_elsewhere_shares_the_cache_and_another_wheel_rebuilds_it(cache) -> None:
    source, builds = cache
    slimtune.models.path(NAME)
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # installed later, same bytes
    assert slimtune.models.is_built(NAME)
    source.write_bytes(b"GGUF" * 1000)  # another release of the same size
    assert not slimtune.models.is_built(NAME)
    slimtune.models.path(NAME)
    assert len(builds) == 2
