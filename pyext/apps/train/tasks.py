"""Generated tasks (for demos and tests) and evaluation: completion loss and greedy exact match.

Each generator draws one (prompt, completion) pair from a `random.Random`; a prefix names the
task, so a model can tell tasks apart and a later stage can overwrite what an earlier one taught.
"""

from __future__ import annotations

import inspect
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tokenizer import Tokenizer

LETTERS, DIGITS = "abcdefghij", "0123456789"
# Evaluation computes the loss on at most this many logits at once (rows x tokens x vocabulary): a
# real vocabulary (49k for SmolLM2) times a batch of 64 would need gigabytes in float32.
LOGITS_BUDGET = 2**24


@dataclass(frozen=True)
class Example:
    """A prompt and its completion; plain text is a completion with an empty prompt.

    A chat example holds `messages` ((role, content) pairs) instead, rendered with the tokenizer's
    chat template and trained on its assistant turns; its last turn is the assistant's answer, which
    evaluation compares with the model's greedy reply to the turns before it.
    """

    prompt: str
    completion: str
    messages: tuple[tuple[str, str], ...] = ()

    @property
    def answer(self) -> str:
        return self.messages[-1][1] if self.messages else self.completion


@dataclass(frozen=True)
class Match:
    """How a greedy answer is scored: `exact` (after stripping spaces), `contains` (the expected
    answer appears in the reply, case-insensitive), `word` (it appears as whole words,
    case-insensitive: "Rome" is not found in "Romeo", nor "O" in "Oslo"), `pattern` (a regex whose
    first group, or whole match, found in the reply must equal the expected answer), or `loss` (not
    at all: loss only)."""

    kind: str = "exact"
    pattern: str | None = None
    max_new_tokens: int | None = None  # the reply's budget (default: the expected answer's length + 1)

    @property
    def scores(self) -> bool:
        """False for `loss`: the task is scored by its loss only (no greedy replies)."""
        return self.kind != "loss"

    def __call__(self, reply: str, expected: str) -> bool:
        if self.pattern is not None:
            found = re.search(self.pattern, reply)
            if found is None:
                return False
            return (found.group(1) if found.groups() else found.group(0)).strip() == expected.strip()
        if self.kind == "contains":
            return expected.strip().lower() in reply.lower()
        if self.kind == "word":
            whole = rf"(?<!\w){re.escape(expected.strip())}(?!\w)"
            return re.search(whole, reply, re.IGNORECASE) is not None
        return reply.strip() == expected.strip()


def chat(prompt: str, completion: str) -> Example:
    """A prompt/completion pair as a one-turn chat (user, assistant)."""
    return Example("", "", (("user", prompt), ("assistant", completion)))


def _successor(alphabet: str) -> Callable[[str], str]:
    return lambda word: "".join(alphabet[(alphabet.index(c) + 1) % len(alphabet)] for c in word)


# (prefix, alphabet, answer): three-letter prefixes and four-symbol words put every answer at the
# same offsets, and keep each task learnable by a small model in minutes on a CPU.
WORD_TASKS: dict[str, tuple[str, str, Callable[[str], str]]] = {
    "copy": ("cpy", LETTERS + DIGITS, lambda w: w),
    "reverse": ("rev", LETTERS, lambda w: w[::-1]),
    "shift": ("inc", LETTERS, _successor(LETTERS)),
    "sort": ("srt", LETTERS, lambda w: "".join(sorted(w))),
    "upper": ("upc", LETTERS, str.upper),
    "digits": ("nxt", DIGITS, _successor(DIGITS)),
}
TASKS = sorted([*WORD_TASKS, "add"])


def _draw(task: str, rng: random.Random) -> Example:
    if task == "add":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return Example(f"add {a}+{b}=", str(a + b))
    prefix, alphabet, answer = WORD_TASKS[task]
    word = "".join(rng.choice(alphabet) for _ in range(4))
    return Example(f"{prefix} {word}=", answer(word))


def generate(task: str, n: int, seed: int, split: str = "train") -> list[Example]:
    """`n` examples of a generated task, a pure function of its arguments.

    A tenth of all prompts (by a hash of the prompt) belongs to the "eval" split and the rest to
    "train", so evaluation never scores a prompt the model trained on.
    """
    rng = random.Random(f"{task}:{seed}")
    examples: list[Example] = []
    while len(examples) < n:
        example = _draw(task, rng)
        if (zlib.crc32(example.prompt.encode()) % 10 == 0) == (split == "eval"):
            examples.append(example)
    return examples


def encode(example: Example, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels: -100 on bos and the prompt, so only the completion (and eos) is learned;
    for a chat, only the assistant turns."""
    if example.messages:
        return tokenizer.encode_chat(example.messages)
    prompt = prompt_ids(example, tokenizer)
    completion = [*tokenizer.encode(example.completion), tokenizer.eos_id]
    return prompt + completion, [-100] * len(prompt) + completion


def prompt_ids(example: Example, tokenizer: Tokenizer) -> list[int]:
    """What the model sees before its answer: bos + prompt, or the chat up to the last assistant turn
    with the template's generation prompt."""
    if example.messages:
        return tokenizer.chat_prompt(example.messages[:-1])
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(example.prompt)


def right_padded(
    encoded: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of `encode`d examples, right-padded to the longest: ids (padded with `pad_id`), labels
    (padded with -100, so padding is never scored) and the attention mask."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.tensor([i + [pad_id] * (width - len(i)) for i, _ in encoded], device=device)
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in encoded], device=device)
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in encoded], device=device)
    return ids, labels, mask


def token_loss_sum(
    model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions (callers divide by the token count)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: Tokenizer,
    examples: list[Example],
    answers: bool,
    batch_size: int = 64,
    match: Match = Match(),
    progress: Callable[[int], None] | None = None,
) -> dict[str, float | None]:
    """Mean completion loss per token and, for tasks with answers, greedy accuracy under `match`
    with each example's score in order (`correct`, 1 or 0: what a paired comparison of two models
    on the same items needs); `progress(n)` after each batch of n examples."""
    model.eval()
    device = next(model.parameters()).device
    total, count, correct = 0.0, 0, []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        ids, labels, mask = right_padded([encode(e, tokenizer) for e in batch], tokenizer.pad_id, device)
        rows = max(1, LOGITS_BUDGET // (ids.shape[1] * tokenizer.vocab_size))  # bounds the logits' memory
        for part in range(0, len(batch), rows):
            chunk = slice(part, part + rows)
            total += float(token_loss_sum(model, ids[chunk], labels[chunk], mask[chunk]))
        count += int((labels[:, 1:] != -100).sum())
        if answers and match.scores:
            replies = greedy(model, tokenizer, batch, match.max_new_tokens)
            correct += [int(match(p, e.answer)) for p, e in zip(replies, batch, strict=True)]
        if progress is not None:
            progress(len(batch))
    if not (answers and match.scores):
        return {"loss": total / max(count, 1), "accuracy": None}
    return {"loss": total / max(count, 1), "accuracy": sum(correct) / len(examples), "correct": correct}


def cache_keyword(model: nn.Module) -> str:
    """The key/value cache's keyword and output field: `cache` from transformers 5.25 on (where
    `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


@torch.no_grad()  # called on its own too: a graph kept across steps grows with every new token
def greedy(
    model: nn.Module, tokenizer: Tokenizer, batch: list[Example], max_new_tokens: int | None = None
) -> list[str]:
    """Greedy completions of the prompts, cut at eos (at most the expected answer's length + 1
    tokens, or `max_new_tokens`), without autograd.

    Left-padded; the prompts run once and each new token reads the key/value cache (only the last
    position's logits are computed), as `generate` does, without its per-call overhead. Rows stop
    mattering at their eos; the batch stops when every row has one.
    """
    device = next(model.parameters()).device
    prompts = [prompt_ids(e, tokenizer) for e in batch]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    steps = max_new_tokens or max(len(tokenizer.encode(e.answer)) for e in batch) + 1
    step_ids, cache = ids, None
    keyword = cache_keyword(model)
    done = torch.zeros(len(batch), dtype=torch.bool, device=device)
    for _ in range(steps):
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{keyword: cache},
        )
        cache, step_ids = getattr(out, keyword), out.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, step_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        done |= step_ids[:, 0] == tokenizer.eos_id
        if bool(done.all()):
            break
    texts = []
    for row in ids[:, width:].tolist():
        cut = row.index(tokenizer.eos_id) if tokenizer.eos_id in row else len(row)
        texts.append(tokenizer.decode(row[:cut]))
    return texts
