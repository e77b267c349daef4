"""The base model's own chat replies, for two uses kept apart: the reply-drift set (what the base said,
whose NLL the benchmark measures after the sequence) and the rehearsal set (what the base said to
other prompts, mixed into each stage by the rehearsal patterns, as a user mixes general chat data
into a fine-tuning run to keep the model's ways).

Both come from the shipped generic prompts (`quality_data/prompts.jsonl`), greedy, kept only where
the reply ends at the base's end of turn within the budget (a reply the budget cut would teach a
false end). The rehearsal set never uses a prompt of the drift set, and keeps only chats that fit
one training row. Rehearsal adds rows to a stage, so its steps are raised in proportion: each stage
shows its task's rows as often as without rehearsal (`stage_steps`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from quality_data import tasks as data

REPLY_TOKENS = 160  # the budget of the base's replies (those it ends within it are kept)
BATCH = 16  # prompts per greedy batch (the drift set was made with these batches: keep them)


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def ended(model, tok, prompts: list[str], want: int, fits: Callable[[dict], bool]) -> list[dict]:
    """The first `want` chats of the base's greedy replies to `prompts` that end within `REPLY_TOKENS`
    and that `fits` accepts, in prompt order (batches are generated until there are enough)."""
    from slimtune.apps.train.tasks import chat as as_example
    from slimtune.apps.train.tasks import greedy

    kept: list[dict] = []
    for start in range(0, len(prompts), BATCH):
        if len(kept) >= want:
            break
        batch = prompts[start : start + BATCH]
        answers = greedy(model, tok, [as_example(p, "") for p in batch], REPLY_TOKENS)
        for prompt, answer in zip(batch, answers, strict=True):
            answer = answer.strip()
            record = chat(prompt, answer)
            # a margin of 2: the reply re-encoded can take a token more than it was generated in
            if answer and len(tok.encode(answer)) < REPLY_TOKENS - 2 and fits(record):
                kept.append(record)
    return kept[:want]


def drift_set(model, tok, prompts: int | None, want: int) -> list[dict]:
    """The reply-drift set: the base's replies to the first `prompts` shipped prompts."""
    shipped = [p["prompt"] for p in data.read_jsonl("prompts.jsonl")][:prompts]
    return ended(model, tok, shipped, want, lambda _: True)


def rehearsal_set(model, tok, drift: list[dict], want: int, seq_len: int) -> list[dict]:
    """The rehearsal set: the base's replies to the shipped prompts the drift set does not use, each
    chat (with the template) at most `seq_len` tokens, the length the trainer packs without cutting."""
    used = {c["messages"][0]["content"] for c in drift}
    prompts = [p["prompt"] for p in data.read_jsonl("prompts.jsonl") if p["prompt"] not in used]

    def fits(record: dict) -> bool:
        return len(tok.encode_chat(_messages(record))[0]) <= seq_len

    return ended(model, tok, prompts, want, fits)


def _messages(record: dict) -> tuple[tuple[str, str], ...]:
    return tuple((turn["role"], turn["content"]) for turn in record["messages"])


def rows(path: Path, tok, seq_len: int) -> int:
    """The training rows a data file packs into, as the trainer packs a stage of it alone."""
    from slimtune.apps.train.data import pack, read_records

    return len(pack(read_records(path)[0], tok, seq_len))


def stage_steps(task_rows: int, rehearsal_rows: int, steps: int) -> int:
    """A stage's steps with the rehearsal rows mixed in: `steps` raised by the rows rehearsal adds, so
    the task's rows are seen as often as in `steps` without it (rounded up)."""
    return -(-steps * (task_rows + rehearsal_rows) // task_rows)
