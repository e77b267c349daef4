"""Tokenizers behind one interface: characters for built-in models, a local model's own otherwise."""

from __future__ import annotations

import string
import warnings
from pathlib import Path
from typing import Protocol

Messages = tuple[tuple[str, str], ...]  # (role, content) turns


class ChatError(ValueError):
    """A chat that the tokenizer cannot render (no template, or one that is not prefix-stable)."""


class Tokenizer(Protocol):
    pad_id: int
    bos_id: int | None
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_chat(self, messages: Messages) -> tuple[list[int], list[int]]: ...

    def chat_prompt(self, messages: Messages) -> list[int]: ...


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

    def encode_chat(self, messages: Messages) -> tuple[list[int], list[int]]:
        raise ChatError(self._no_template)

    def chat_prompt(self, messages: Messages) -> list[int]:
        raise ChatError(self._no_template)

    _no_template = (
        "the built-in character tokenizer has no chat template: chat data needs a model with its own "
        "tokenizer (model: {builtin: smollm2-135m} or {path: ...})"
    )


class HFTokenizer:
    """A local model's own tokenizer (`AutoTokenizer`), without special tokens in `encode`."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self.path = path
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

    def save(self, folder: Path) -> None:
        self._tok.save_pretrained(str(folder))

    def _render(self, messages: Messages, generation_prompt: bool) -> list[int]:
        if not getattr(self._tok, "chat_template", None):
            raise ChatError(f"the tokenizer of {self.path} has no chat template; use prompt/completion data")
        turns = [{"role": role, "content": content} for role, content in messages]
        return list(
            self._tok.apply_chat_template(
                turns, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
            )
        )

    def chat_prompt(self, messages: Messages) -> list[int]:
        return self._render(messages, generation_prompt=True)

    def encode_chat(self, messages: Messages) -> tuple[list[int], list[int]]:
        """The rendered chat and labels on its assistant turns only (each up to its eos).

        An assistant turn's tokens are those the template adds after the generation prompt of the
        turns before it; templates whose rendering of a prefix is not a prefix are refused.
        """
        ids = self._render(messages, generation_prompt=False)
        labels = [-100] * len(ids)
        for i, (role, _) in enumerate(messages):
            if role != "assistant":
                continue
            prompt = self.chat_prompt(messages[:i])
            start, end = len(prompt), len(self._render(messages[: i + 1], False))
            if prompt != ids[:start] or end > len(ids):
                raise ChatError(
                    f"the chat template of {self.path} renders a conversation's start differently from "
                    f"the conversation: assistant turns cannot be located; use prompt/completion data"
                )
            span = ids[start:end]
            if self.eos_id in span:
                span = span[: span.index(self.eos_id) + 1]
            labels[start : start + len(span)] = span
        if all(label == -100 for label in labels):
            raise ChatError("a chat record has no assistant turn to learn from")
        return ids, labels
