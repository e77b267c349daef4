"""Stage data: read sources, mix them by weight, tokenize with completion-only labels, pack rows.

Everything here runs before the first training step, so a missing file or a malformed record
stops the run before any compute is spent.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .schema import read_utf8
from .tasks import Example, chat, encode, generate
from .tokenizer import ChatError, Tokenizer


class DataError(ValueError):
    """A data problem; the recipe layer prefixes it with the recipe key that named the data."""


FIELDS = ("prompt", "completion", "text", "messages")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Form:
    """How records of a file read: `fields` maps slimtune's field names (prompt, completion, text,
    messages) to the file's own; `chat` wraps prompt/completion records in the chat template."""

    fields: tuple[tuple[str, str], ...] = ()
    chat: bool = False

    def key(self, name: str) -> str:
        return dict(self.fields).get(name, name)


@dataclass(frozen=True)
class Source:
    """One entry of a stage's `data`: a file or directory (`path`), a generated `task`, or an earlier
    `stage`'s data; `weight` scales its example count (0.5 = a random half, 2 = everything twice)."""

    path: Path | None = None
    task: str | None = None
    stage: str | None = None
    weight: float = 1.0
    n: int | None = None
    where: str = ""
    form: Form = field(default_factory=Form)


def _messages(turns: object, origin: str, key: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{origin}: {key!r} must be a non-empty list of {{role, content}} objects")
    out = []
    for i, turn in enumerate(turns):
        ok = isinstance(turn, dict) and turn.get("role") in ROLES and isinstance(turn.get("content"), str)
        if not ok:
            raise DataError(
                f"{origin}: {key}[{i}] must be an object with role ({', '.join(ROLES)}) and string content"
            )
        out.append((turn["role"], turn["content"]))
    if out[-1][0] != "assistant":
        raise DataError(f"{origin}: the last turn of {key!r} must be the assistant's (the answer)")
    return tuple(out)


def _record(record: object, origin: str, form: Form) -> tuple[Example, bool]:
    """A chat, a prompt/completion record (both have an answer) or a plain-text record."""
    if isinstance(record, dict):
        turns = form.key("messages")
        if turns in record:
            return Example("", "", _messages(record[turns], origin, turns)), True
        prompt, completion = record.get(form.key("prompt")), record.get(form.key("completion"))
        if isinstance(prompt, str) and isinstance(completion, str):
            return (chat(prompt, completion) if form.chat else Example(prompt, completion)), True
        if isinstance(record.get(form.key("text")), str):
            return Example("", record[form.key("text")]), False
    names = [form.key(f) for f in FIELDS]
    raise DataError(
        f"{origin}: expected an object with {names[3]!r} (chat turns), string {names[0]!r} and "
        f"{names[1]!r}, or {names[2]!r} (map other field names with `fields`)"
    )


def read_records(path: Path, n: int | None = None, form: Form = Form()) -> tuple[list[Example], bool]:
    """Examples from a JSONL file or a `datasets.save_to_disk` directory, and whether they have answers."""
    if path.is_dir():
        records = _dataset_rows(path)
    elif path.is_file():
        records = _jsonl_rows(path)
    else:
        raise DataError(f"{path} does not exist")
    parsed = [_record(record, origin, form) for origin, record in records[:n]]
    if not parsed:
        raise DataError(f"{path} holds no records")
    kinds = {answer for _, answer in parsed}
    if len(kinds) > 1:
        raise DataError(f"{path} mixes records with answers and plain-text records; use one kind per file")
    return [example for example, _ in parsed], kinds.pop()


def _dataset_rows(path: Path) -> list[tuple[str, Any]]:
    """(origin, row) of a `datasets.save_to_disk` directory (its train split, or its first)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a directory: reading it needs `pip install datasets`") from None
    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(
            f"{path} is a directory but not a dataset written by datasets.save_to_disk ({err}); "
            f"point the path at a JSONL file or such a dataset"
        ) from None
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    return [(f"{path} row {i}", row) for i, row in enumerate(data)]


def _jsonl_rows(path: Path) -> list[tuple[str, Any]]:
    """(FILE:LINE, record) of every non-blank line of a JSONL file."""
    records = []
    for number, line in enumerate(read_utf8(path, DataError).splitlines(), 1):
        if line.strip():
            try:
                records.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return records


def weighted(examples: list[Example], weight: float, rng: random.Random) -> list[Example]:
    """Every example floor(weight) times, plus a random share of the fraction (at least one example)."""
    whole, fraction = divmod(weight, 1.0)
    extra = rng.sample(examples, max(round(fraction * len(examples)), 1 if whole == 0 else 0))
    return examples * int(whole) + extra


@dataclass
class Packed:
    """Rows of `seq_len` tokens; labels are -100 outside completions and on padding."""

    ids: Tensor
    labels: Tensor
    mask: Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]


def pack(examples: list[Example], tokenizer: Tokenizer, seq_len: int) -> Packed:
    """Whole examples laid end to end into rows (a new row when the next one does not fit).

    Plain text longer than a row is cut into row-sized pieces; a longer prompt/completion example
    is refused rather than cut away from its answer.
    """
    rows: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        try:
            ex_ids, ex_labels = encode(example, tokenizer)
        except ChatError as err:
            raise DataError(str(err)) from None
        if len(ex_ids) > seq_len:
            if example.prompt or example.messages:
                raise DataError(
                    f"an example is {len(ex_ids)} tokens, longer than seq_len={seq_len}: raise seq_len "
                    f"(starting {(example.prompt or example.messages[0][1])[:40]!r})"
                )
            pieces = [
                (ex_ids[i : i + seq_len], ex_labels[i : i + seq_len]) for i in range(0, len(ex_ids), seq_len)
            ]
        else:
            pieces = [(ex_ids, ex_labels)]
        for piece_ids, piece_labels in pieces:
            if len(ids) + len(piece_ids) > seq_len:
                rows.append((ids, labels))
                ids, labels = [], []
            ids, labels = ids + piece_ids, labels + piece_labels
    rows.append((ids, labels))
    pad = [(seq_len - len(i)) for i, _ in rows]
    return Packed(
        ids=torch.tensor([i + [tokenizer.pad_id] * p for (i, _), p in zip(rows, pad, strict=True)]),
        labels=torch.tensor([lab + [-100] * p for (_, lab), p in zip(rows, pad, strict=True)]),
        mask=torch.tensor([[1] * len(i) + [0] * p for (i, _), p in zip(rows, pad, strict=True)]),
    )


def batch_order(rows: int, batch_size: int, steps: int, seed: int) -> Tensor:
    """Row indices for `steps` global batches: seeded shuffles of all rows (epochs) laid end to end."""
    generator = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch_size / rows)
    return torch.cat([torch.randperm(rows, generator=generator) for _ in range(epochs)])


def source_examples(source: Source, seed: int, earlier: dict[str, list[Example]]) -> list[Example]:
    """The examples a source names (before its weight)."""
    if source.task is not None:
        return as_form(generate(source.task, source.n or 2000, seed), source.form)
    if source.stage is not None:
        return earlier[source.stage]
    return read_records(source.path, source.n, source.form)[0]


def as_form(examples: list[Example], form: Form) -> list[Example]:
    """Generated examples wrapped in the chat template when the form asks for it."""
    return [chat(e.prompt, e.completion) for e in examples] if form.chat else examples


def mix(parts: list[tuple[list[Example], float]], seed: int) -> list[Example]:
    """A stage's training examples: each source's examples weighted, then all shuffled together."""
    rng = random.Random(seed)
    mixed = [e for examples, weight in parts for e in weighted(examples, weight, rng)]
    rng.shuffle(mixed)
    return mixed
