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
def chosen(model, tokenizer, probes: list[dict]) -> list[int]:
    """1 where a probe's own answer, after the probe's `prefix` (its base reply's frame), has the lowest
    summed NLL of its candidates (the assistant turn's tokens), else 0 (a tie counts as 0). The
    candidates of a probe share everything up to the answer, which is run once (`shared_nll`)."""
    from slimtune.apps.train.tasks import Example, encode

    model.eval()
    out = []
    for probe, options in zip(probes, candidates(probes), strict=True):
        turns = tuple((m["role"], m["content"]) for m in probe["messages"][:-1])
        encoded = [
            encode(Example("", "", (*turns, ("assistant", probe["prefix"] + c))), tokenizer) for c in options
        ]
        scores = shared_nll(model, encoded, tokenizer.pad_id)
        out.append(int(all(scores[0] < s for s in scores[1:])))
    return out


def shared_nll(model, encoded: list[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """Each sequence's summed next-token NLL over its labelled positions, for sequences that share a
    token prefix, with that prefix run once: its key-value cache is repeated for every sequence's own
    tokens. About four times fewer tokens for a probe's four candidates (system prompt, question and
    frame are most of each), and the shared part's NLL is the same number for every candidate, so only
    their own tokens decide between them."""
    from slimtune.apps.train.tasks import cache_keyword, right_padded

    ids, device = [i for i, _ in encoded], next(model.parameters()).device
    shared = max(1, _common(ids) - 1)  # every sequence keeps one token of its own at least
    if any(lab[:shared] != encoded[0][1][:shared] for _, lab in encoded):
        raise ValueError("shared_nll: the sequences label their shared tokens differently")
    labels = torch.tensor([encoded[0][1][:shared]], device=device)
    first = model(input_ids=torch.tensor([ids[0][:shared]], device=device), use_cache=True)
    head = F.cross_entropy(first.logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum")
    rest, rest_labels, mask = right_padded([(i[shared:], lab[shared:]) for i, lab in encoded], pad_id, device)
    keyword = cache_keyword(model)
    cache = getattr(first, keyword)
    cache.batch_repeat_interleave(len(encoded))
    attention = torch.cat([torch.ones(len(encoded), shared, dtype=mask.dtype, device=device), mask], dim=1)
    logits = model(input_ids=rest, attention_mask=attention, **{keyword: cache}).logits
    # each own token is predicted from the position before it: the shared part's last, then its own
    before = torch.cat([first.logits[:, -1:].expand(len(encoded), -1, -1), logits[:, :-1]], dim=1).float()
    own = F.cross_entropy(before.transpose(1, 2), rest_labels, ignore_index=-100, reduction="none").sum(1)
    return (own + head).tolist()


def _common(sequences: list[list[int]]) -> int:
    """The length of the sequences' longest common prefix."""
    n = 0
    for column in zip(*sequences, strict=False):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n
