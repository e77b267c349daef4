"""The quality benchmark's data: two new tasks, general-knowledge probes, generic prompts, text.

Everything is generated or shipped, deterministic given the seed, and offline:
- `swap` and `code` are new tasks (the base model scores about 0 on both): `swap` answers
  "zq: w1 w2 w3" with "w3 w1" (from `words.txt`), `code` answers "Code 4729" with every digit
  plus one, mod 10 ("5830"). Held-out prompts never appear in training (split by a hash).
- `probes.jsonl` (shipped): general questions with a short expected answer; the benchmark keeps
  those the base model answers correctly (its greedy reply contains the answer).
- `prompts.jsonl` (shipped): generic instructions; the base model's own greedy replies to them
  are what drift measure (c) scores.
- `text.jsonl` (shipped): English prose from the docstrings of Python's standard library (PSF
  licence), cut into passages; drift measure (b) is the per-token NLL change on it.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = "Follow the rule."  # a short system turn for the new tasks (the template's default is long)

WORDS = (HERE / "words.txt").read_text().split()  # common nouns, each one token for SmolLM2


def _split(prompt: str, split: str) -> bool:
    return (zlib.crc32(prompt.encode()) % 5 == 0) == (split == "eval")


def _swap(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 3)
    return f"zq: {' '.join(words)}", f"{words[2]} {words[0]}"


def _code(rng: random.Random) -> tuple[str, str]:
    digits = [rng.randrange(10) for _ in range(4)]
    return f"Code {''.join(map(str, digits))}", "".join(str((d + 1) % 10) for d in digits)


TASKS = {"swap": _swap, "code": _code}


def task_records(task: str, n: int, seed: int, split: str) -> list[dict]:
    """`n` chat records of a new task (system, user, assistant), a pure function of the arguments."""
    rng, records, seen = random.Random(f"{task}:{seed}"), [], set()
    while len(records) < n:
        prompt, answer = TASKS[task](rng)
        if _split(prompt, split) and prompt not in seen:
            seen.add(prompt)
            records.append(
                {
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
    return records


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
