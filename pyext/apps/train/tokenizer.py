"""Tokenizers behind one interface: characters for built-in models, a local model's own otherwise."""

from __future__ import annotations

import string
import warnings
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    pad_id: int
    bos_id: int | None
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class CharTokenizer:
    """One id per printable ASCII character (and newline) after pad, bos, eos and unk.

    Built-in models are random-init, so any vocabulary works; characters keep generated tasks
    (arithmetic, string transformations) learnable position by position without a trained BPE.
    """

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    chars = string.printable[:95] + "\n"  # digits, letters, punctuation, space, newline

    def __init__(self) -> None:
        self._ids = {c: i + 4 for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars) + 4
        self._warned: set[str] = set()  # characters already warned about (once each)

    def encode(self, text: str) -> list[int]:
        ids = [self._ids.get(c, self.unk_id) for c in text]
        if self.unk_id in ids:
            new = sorted({c for c in text if c not in self._ids} - self._warned)
            if new:
                self._warned.update(new)
                warnings.warn(
                    f"the built-in character tokenizer cannot encode {''.join(new)!r} (printable ASCII and "
                    f"newline only); those characters become <unk>. Use a model with its own tokenizer "
                    f"(model: {{path: ...}} or a real built-in model) for such text",
                    stacklevel=2,
                )
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i - 4] for i in ids if i >= 4)


class HFTokenizer:
    """A local model's own tokenizer (`AutoTokenizer`), without special tokens in `encode`."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(path))
        if self._tok.eos_token_id is None:
            raise ValueError(
                f"the tokenizer of {path} has no eos token; the trainer ends every example with one"
            )
        self.eos_id = self._tok.eos_token_id
        self.bos_id = self._tok.bos_token_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
