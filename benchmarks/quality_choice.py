"""Knowledge read without generating: for each probe, is its own answer the likeliest of four answers
of its category, each put where the base's own reply put the answer ("The capital of Germany is
{Berlin, Moscow, ...}")? A stage that teaches one-word or one-digit replies changes how a model answers
in words (the word-match probes) and how likely bare answers are (the answer NLL), but it moves the
four candidates of a probe alike, so the choice between them still says what the model knows. (Bare
answers make a poor frame: the base, which answers in sentences, chose its own answer for 45 of 64
probes that way, and for 48 of 48 in its own sentences.)
"""

from __future__ import annotations

import random
import re

import torch
import torch.nn.functional as F

CANDIDATES = 4  # the probe's answer and three others of its category


def candidates(probes: list[dict], k: int = CANDIDATES) -> list[list[str]]:
    """Per probe (chat records with a `category`): its answer first, then up to k - 1 other answers of
    its category (distinct from it and each other, drawn with the probe's index as seed)."""
    answers = [p["messages"][-1]["content"] for p in probes]
    by_category: dict[str, set[str]] = {}
    for probe, answer in zip(probes, answers, strict=True):
        by_category.setdefault(probe["category"], set()).add(answer)
    out = []
    for i, (probe, answer) in enumerate(zip(probes, answers, strict=True)):
        others = sorted(
            a for a in by_category[probe["category"]] if a.strip().lower() != answer.strip().lower()
        )
        out.append([answer, *random.Random(i).sample(others, min(k - 1, len(others)))])
    return out


def frame(reply: str, answer: str) -> str:
    """The base's reply up to the answer's first whole-word occurrence (the trainer's `word` match);
    empty where the reply lacks it."""
    found = re.search(rf"(?<!\w){re.escape(answer.strip())}(?!\w)", reply, re.IGNORECASE)
    return reply[: found.start()] if found else ""


@torch.no_grad()
def chosen(model, tokenizer, probes: list[dict], batch_size: int = 32) -> list[int]:
    """1 where a probe's own answer, after the probe's `prefix` (its base reply's frame), has the lowest
    summed NLL of its candidates (the assistant turn's tokens), else 0 (a tie counts as 0)."""
    from slimtune.apps.train.tasks import Example, encode

    model.eval()
    sets = candidates(probes)
    examples = [
        Example(
            "", "", (*((m["role"], m["content"]) for m in p["messages"][:-1]), ("assistant", p["prefix"] + c))
        )
        for p, options in zip(probes, sets, strict=True)
        for c in options
    ]
    nll = [summed_nll(model, [encode(e, tokenizer) for e in examples[i : i + batch_size]], tokenizer.pad_id)
           for i in range(0, len(examples), batch_size)]  # fmt: skip
    flat = [x for part in nll for x in part]
    out, start = [], 0
    for options in sets:
        scores = flat[start : start + len(options)]
        start += len(options)
        out.append(int(all(scores[0] < s for s in scores[1:])))
    return out


def summed_nll(model, encoded: list[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """Each sequence's summed next-token NLL over its labelled positions (right-padded batch)."""
    from slimtune.apps.train.tasks import right_padded

    ids, labels, mask = right_padded(encoded, pad_id, next(model.parameters()).device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    loss = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    return loss.sum(1).tolist()
