"""The quality benchmark: its report from runs with known values (interpolation at matched learning,
paired intervals, the claims it prints), and a tiny configuration end to end on the real model
(`pytest -m slow`)."""

from __future__ import annotations

import csv
import itertools
import json
import random
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import slimtune
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import quality  # noqa: E402
import quality_report  # noqa: E402

TASKS = ["swap", "facts", "place"]
PROBES = 120


def _fake_run(tmp_path: Path, method: str, seed: int, lr: float, learned: float, kept: float) -> quality.Run:
    """A finished run whose every new task scores `learned` after its own stage (the first task half
    of that at the end) and which keeps a share `kept` of the probes."""
    rng = random.Random(f"{method}{seed}{lr}")
    folder = tmp_path / f"{method}-{seed}-{lr}"
    last = folder / "stages" / "03-place"
    last.mkdir(parents=True)
    items = {
        t: [int(rng.random() < (learned / 2 if t == "swap" else learned)) for _ in range(64)] for t in TASKS
    }
    last.joinpath("result.json").write_text(
        json.dumps({"eval": {t: {"correct": c} for t, c in items.items()}})
    )
    accuracy = [[learned if j == i else 0.0 for i in range(3)] for j in range(3)]
    accuracy[-1] = [sum(items[t]) / 64 for t in TASKS[:2]] + [learned]
    metrics = {"tasks": TASKS, "stages": TASKS, "accuracy": accuracy}
    measures = {
        "probes": [int(rng.random() < kept) for _ in range(PROBES)],
        "probes_chosen": [int(rng.random() < (1 + kept) / 2) for _ in range(PROBES)],
        "probes_nll": 2.5,
        "text_nll": 2.0,
        "code_nll": 1.0,
        "replies_nll": 1.5,
        "wall_s": 1.0,
    }
    return quality.Run(
        method, seed, lr, folder, metrics, measures, {t: [float(x) for x in c] for t, c in items.items()}
    )


def _fake_runs(tmp_path: Path) -> list[quality.Run]:
    runs = []
    for seed in range(3):
        for lr, learned in ((1e-4, 0.5), (3e-4, 0.85), (1e-3, 0.95)):
            runs.append(_fake_run(tmp_path, "full", seed, lr, learned, 0.3))
            runs.append(_fake_run(tmp_path, "paca", seed, lr * 10, learned, 0.7))
    return runs


def test_the_report_compares_methods_at_matched_learning(tmp_path) -> None:
    runs = _fake_runs(tmp_path)
    base = {"probes": [1] * PROBES, "probes_nll": 2.0, "text_nll": 1.9, "code_nll": 1.0, "replies_nll": 1.0}
    base["probes_chosen"] = [1] * (PROBES - 20) + [0] * 20  # the base chose 100 of 120 right
    rows = quality_report.matched_all(runs, (0.8, 0.9), base)
    assert len(rows) == 2 * 3 * 2  # every method, seed and level bracketed
    at = next(m for m in rows if m.method == "paca" and m.seed == 0 and m.level == 0.9)
    assert (at.low_lr, at.high_lr) == pytest.approx((3e-3, 1e-2)) and at.lr == pytest.approx(
        3e-3 * (1e-2 / 3e-3) ** 0.5
    )
    assert at.own["facts"] == pytest.approx(0.9) and at.drift["text"] == pytest.approx(0.1)
    assert at.drift["probes"] == pytest.approx(0.5) and len(at.chosen) == PROBES - 20
    summary = quality_report.summary(rows, ["full", "paca"], 0.9, "swap")
    paca = summary[1]
    assert paca["seeds"] == 3 and paca["retention_vs"].excludes_zero
    assert 0.3 < paca["retention_vs"].difference < 0.5 and not paca["first_final_vs"].excludes_zero
    assert paca["chosen_seeds"] == 3 and 0.1 < paca["chosen_vs"].difference < 0.3  # 0.85 vs 0.65
    assert paca["chosen_vs"].excludes_zero and 0.75 < paca["chosen"].mean < 0.95
    claims = quality_report.claims(summary, "swap")
    assert any("paca vs full fine-tuning on general-knowledge probes: keeps more" in c for c in claims)
    assert any("paca vs full fine-tuning on the probes' 4-way choice: keeps more" in c for c in claims)
    del runs[0].measures["probes_chosen"]  # full seed 0's lowest run predates the measure
    summary = quality_report.summary(
        quality_report.matched_all(runs, (0.8, 0.9), base), ["full", "paca"], 0.9, "swap"
    )
    assert summary[1]["chosen_seeds"] == 3  # full's seed 0 at 90% is bracketed by its two higher runs
    early = quality_report.summary(
        quality_report.matched_all(runs, (0.8, 0.9), base), ["full", "paca"], 0.8, "swap"
    )
    assert early[1]["chosen_seeds"] == 2 and early[1]["paired_seeds"] == 3
    assert any("4-way choice: not claimed (2 paired seeds" in c for c in quality_report.claims(early, "swap"))
    assert any("on swap: no difference resolved" in c for c in claims)


def test_a_pair_asked_for_is_compared_like_a_method_against_full_fine_tuning(tmp_path) -> None:
    runs = _fake_runs(tmp_path)
    runs += [
        _fake_run(tmp_path, "lora", s, lr, x, 0.5) for s in range(3) for lr, x in ((1e-3, 0.6), (3e-3, 0.95))
    ]
    base = {"probes": [1] * PROBES, "probes_chosen": [1] * PROBES}
    rows = quality_report.matched_all(runs, (0.9,), base)
    against_full = quality_report.summary(rows, ["paca"], 0.9, "swap")[0]
    paca_full, paca_lora, lora_paca = quality_report.pairs(
        rows, [("paca", "full"), ("paca", "lora"), ("lora", "paca")], 0.9, "swap"
    )
    for key in ("retention_vs", "chosen_vs", "first_final_vs", "paired_seeds", "chosen_seeds"):
        assert paca_full[key] == against_full[key]  # the same comparison as the summary's
    assert paca_lora["against"] == "lora" and paca_lora["paired_seeds"] == 3
    assert 0.1 < paca_lora["retention_vs"].difference < 0.3  # kept 0.7 against 0.5
    assert lora_paca["retention_vs"].difference == pytest.approx(-paca_lora["retention_vs"].difference)
    said = quality_report.claims([paca_lora], "swap")
    assert any(
        "paca vs lora on general-knowledge probes: keeps more" in c and "3 paired seeds" in c for c in said
    )
    one_seed = quality_report.pairs(
        quality_report.matched_all([r for r in runs if r.seed == 0], (0.9,), base),
        [("paca", "lora")],
        0.9,
        "swap",
    )
    assert any("not claimed (1 paired seeds" in c for c in quality_report.claims(one_seed, "swap"))


def test_the_claims_table_lists_the_claims_by_p_and_marks_those_holm_keeps() -> None:
    from quality_stats import Interval

    def row(method: str, seeds: int, probes: Interval, chosen: Interval | None = None) -> dict:
        return {
            "method": method,
            "against": "full",
            "level": 0.7,
            "paired_seeds": seeds,
            "chosen_seeds": seeds,
            "retention_vs": probes,
            "chosen_vs": chosen,
            "first_final_vs": Interval(0.01, -0.1, 0.1, -0.2, 0.2, 0.9),
        }

    strong = Interval(0.3, 0.2, 0.4, 0.25, 0.35, 0.0004)
    found = [
        row("paca", 4, strong, Interval(-0.1, -0.2, -0.05, -0.19, -0.01, 0.03)),  # a claim Holm drops
        row("lora", 3, Interval(0.1, -0.1, 0.3, -0.2, 0.4, 0.3)),  # no claim
        row("s2ft", 2, strong, strong),  # too few seeds: neither a claim nor counted
        {**row("hft", 3, Interval(0.2, 0.1, 0.3, -0.1, 0.5, 0.06)), "against": "lora"},  # the bootstrap only
    ]
    lines = quality_report.claims_table(found, "swap")
    assert lines[0].endswith("| Holm (of 7) |") and len(lines) == 4  # paca's 3, lora's and hft's 2 each
    assert lines[2] == (
        "| 70% | paca vs full | probes in words | +0.300 | [+0.200, +0.400] | [+0.250, +0.350] | 0.0004 | 4 "
        "| survives |"
    )
    assert lines[3].startswith("| 70% | paca vs full | probes, 4-way choice | -0.100 |")
    assert lines[3].endswith("| 0.03 | 4 | - |")  # 0.03 > 0.05 / 6 after the first
    assert "Holm (of 0)" in quality_report.claims_table(found[2:3], "swap")[0]


def test_each_combination_is_paired_with_the_method_it_adds_to() -> None:
    methods = ["full", "paca", "lora", "full+lines", "paca+lines", "s2ft+lines", "paca+rehearsal"]
    assert quality.own_pairs(methods) == [("paca+lines", "paca"), ("paca+rehearsal", "paca")]
    asked = [("paca+lines", "paca")]  # asked for already: not twice
    assert quality.own_pairs(methods, asked) == [("paca+rehearsal", "paca")]


def test_figure_labels_are_moved_apart_within_the_axis() -> None:
    import quality_figures

    for heights in ([0.0, 0.01, 0.02, 0.5], [0.9, 0.97, 0.99, 1.0], [0.3]):
        placed = quality_figures._spread(heights, 0.05)
        assert all(b - a >= 0.05 - 1e-12 for a, b in itertools.pairwise(placed))
        assert placed[-1] <= 1.0 and all(abs(p - h) <= 0.15 for p, h in zip(placed, heights, strict=True))
    assert quality_figures._spread([0.1, 0.5], 0.05) == [0.1, 0.5]  # apart already: not moved


def test_each_combination_is_drawn_beside_its_own_method_in_distinct_colours() -> None:
    import quality_figures

    plain = ["full", "lora", "paca", "s2ft", "hft"]
    panels = quality_figures.groups([*plain, "full+lines", "corda-kpm", "paca+lines", "s2ft+rehearsal"])
    assert panels == [
        ("core methods", ["full", "lora", "paca", "s2ft", "hft"]),
        ("toolbox", ["full", "full+lines", "corda-kpm"]),
        ("combinations", ["paca", "s2ft", "paca+lines", "s2ft+rehearsal"]),
    ]
    palette = [f"c{i}" for i in range(10)]
    colors = quality_figures._colors(panels, palette)
    for (_, group), mine in zip(panels, colors, strict=True):
        assert set(mine) == set(group) and len(set(mine.values())) == len(group)
    core, _, combined = colors
    assert core["full"] == "c0" and combined["paca"] == core["paca"] and combined["s2ft"] == core["s2ft"]
    many = quality_figures._colors([("all", [f"m{i}" for i in range(12)])], palette)[0]
    assert len(many) == 12 and set(many.values()) == set(palette[1:])  # past nine, colours are taken again
    assert "c0" not in combined.values()  # full fine-tuning's colour, though it is not in that panel


def test_the_forgetting_figure_and_category_table_use_the_level_with_most_seeds(tmp_path) -> None:
    runs = _fake_runs(tmp_path)
    runs += [_fake_run(tmp_path, "paca", 0, 3e-2, 0.99, 0.1)]  # one more seed-level point does not matter
    rows = quality_report.matched_all(runs, (0.8, 0.9, 0.97), {"probes": [1] * PROBES})
    assert quality_report._widest((0.8, 0.9, 0.97), rows) == 0.9  # 0.8 and 0.9 tie (6 rows): the higher
    assert quality_report._widest((0.8, 0.9, 0.97), [m for m in rows if m.level != 0.9]) == 0.8


def test_the_command_refuses_a_pair_outside_its_methods(capsys) -> None:
    for pair, message in (("paca:nope", "give two different methods"), ("paca:paca", "give two different"),
                          ("paca:lora", "must be among --methods")):  # fmt: skip
        with pytest.raises(SystemExit):
            quality.main(["--preset", "tiny", "--methods", "full", "paca", "--pairs", pair])
        assert message in capsys.readouterr().err


def test_the_report_writes_every_file_and_names_unbracketed_methods(tmp_path) -> None:
    runs = _fake_runs(tmp_path)
    runs += [_fake_run(tmp_path, "lora", 0, lr, 0.4, 0.5) for lr in (1e-4, 3e-4)]  # never reaches 0.8
    del runs[0].measures["probes_nll"]  # a run from before that measure was added
    info = {
        "base": {
            "probes": [1] * PROBES,
            "probes_nll": 2.0,
            "text_nll": 1.9,
            "code_nll": 1.0,
            "replies_nll": 1.0,
        },
        "probes": {"kept": PROBES, "candidates": 200},
        "categories": ["a", "b", "c"] * (PROBES // 3),
    }
    setup = {
        "preset": "test",
        "levels": (0.8, 0.9),
        "methods": {"full": {}, "paca": {}, "lora": {}},
        "steps": 2,
        "batch_size": 4,
        "seq_len": 64,
        "seeds": (0, 1, 2),
    }
    setup["pairs"] = [["paca", "lora"]]  # lora never reaches 0.8: the pair has no seeds
    quality_report.write(tmp_path / "results", runs, info, setup, "python benchmarks/quality.py", 60.0)
    files = {p.name for p in (tmp_path / "results").iterdir()}
    assert files == {
        "runs.csv",
        "matched.csv",
        "results.json",
        "quality.md",
        "tradeoff.png",
        "forgetting.png",
    }
    text = (tmp_path / "results" / "quality.md").read_text()
    assert "| lora | 0 (not bracketed) |" in text and "## Probes kept by category at 90% learned" in text
    assert "The claims, smallest p first:\n\n| level | A vs B | on |" in text
    assert "| 90% | paca vs full | probes in words | +0." in text  # fake paca keeps 0.7 against 0.3
    assert (
        "| paca vs lora | 0 | - | - | - |" in text
        and "Pairs (`--pairs`, and each combination against its method) at 80% learned" in text
    )
    saved = json.loads((tmp_path / "results" / "results.json").read_text())
    assert saved["pairs"]["0.8"][0]["against"] == "lora" and saved["pairs"]["0.8"][0]["paired_seeds"] == 0
    written = list(csv.DictReader((tmp_path / "results" / "runs.csv").open()))
    assert len(written) == len(runs)
    assert written[0]["probes_nll"] == "" and float(written[1]["probes_nll"]) == pytest.approx(2.5)


@pytest.mark.slow  # about 4 minutes idle; the report tests above are its short variant in the default run
@pytest.mark.skipif(
    not slimtune.models.is_available("smollm2-135m"),
    reason=f"needs the built-in model: {slimtune.models.INSTALL}",
)
def test_the_tiny_quality_benchmark_runs_end_to_end(tmp_path) -> None:
    out, results = tmp_path / "work", tmp_path / "results"
    command = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--preset", "tiny", "--workers", "1"]
    subprocess.run([*command, "--out", str(out), "--results", str(results)], check=True, timeout=900)
    rows = list(csv.DictReader((results / "runs.csv").open()))
    assert {r["method"] for r in rows} == {"full", "paca", "full+rehearsal"}
    assert {r["seed"] for r in rows} == {"0"}
    for row in rows:
        assert 0.0 <= float(row["probes_kept"]) <= 1.0 and 0.0 <= float(row["learned"]) <= 1.0
    assert len(list((results / "ledger").glob("*.json"))) == len(rows)  # every run kept in the ledger
    meta = json.loads((results / "results.json").read_text())["meta"]
    assert meta["versions"]["slimtune"] == slimtune.__version__ and meta["setup"]["preset"] == "tiny"
    prepared = json.loads((out / "data" / "prepared.json").read_text())
    assert prepared["probes"]["kept"] >= 4 and len(prepared["categories"]) == prepared["probes"]["kept"]
    evaluated = json.loads((out / "data" / "seed0" / "base.json").read_text())
    assert set(evaluated) == set(TASKS)
    _remeasured_runs_come_out_the_same(out)


def _remeasured_runs_come_out_the_same(out: Path) -> None:
    """A run from before a measure gets it from its restored model; a measure it had that the restored
    model does not reproduce is refused, its measures left as they were."""
    import quality_remeasure

    folder = sorted((out / "runs").iterdir())[0]
    path = folder / "measures.json"
    measured = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in measured.items() if k != "probes_chosen"}))
    assert quality_remeasure.lacking(out) == [folder]
    assert quality_remeasure.remeasure(folder, out, quality.PRESETS["tiny"]) == measured
    assert json.loads(path.read_text()) == measured and quality_remeasure.lacking(out) == []
    wrong = {k: v for k, v in measured.items() if k != "probes_chosen"} | {
        "text_nll": measured["text_nll"] + 1
    }
    path.write_text(json.dumps(wrong))
    with pytest.raises(RuntimeError, match="text_nll"):
        quality_remeasure.remeasure(folder, out, quality.PRESETS["tiny"])
    assert json.loads(path.read_text()) == wrong


def test_a_remeasure_compares_the_measures_a_run_had() -> None:
    import quality_remeasure

    old = {"probes": [1, 0, 1], "text_nll": 2.0, "wall_s": 9.0}
    same = {"probes": [1, 0, 1], "text_nll": 2.0 + 1e-6, "probes_chosen": [1, 1, 0]}
    assert quality_remeasure.differences(old, same) == []
    flipped = {"probes": [1, 1, 1], "text_nll": 2.5}
    assert quality_remeasure.differences(old, flipped) == [
        "probes: 1 of 3 items",
        "text_nll: 2.000000 then 2.500000",
    ]


def test_a_remeasure_refuses_a_run_whose_stages_it_would_train(tmp_path) -> None:
    """A run folder that lost a stage's result (the resume would train it again) is refused, untouched."""
    import quality_remeasure
    import yaml

    stages = [{"name": n} for n in TASKS]
    (tmp_path / "paca-seed0-lr0.002.yaml").write_text(yaml.safe_dump({"stages": stages}))
    folder = tmp_path / "runs" / "paca-seed0-lr0.002"
    for i, name in enumerate(TASKS):
        (folder / "stages" / f"{i + 1:02d}-{name}").mkdir(parents=True)
        if name != "swap":
            (folder / "stages" / f"{i + 1:02d}-{name}" / "result.json").write_text("{}")
    (folder / "measures.json").write_text('{"probes": [1]}')
    assert quality_remeasure.unfinished_stages(folder, tmp_path) == ["swap"]
    with pytest.raises(RuntimeError, match="stages swap have no result"):
        quality_remeasure.remeasure(folder, tmp_path, quality.PRESETS["tiny"])
    assert not (folder / "train.log").exists() and (folder / "measures.json").read_text() == '{"probes": [1]}'


def test_a_work_folder_from_before_a_new_measure_measures_its_base_again(tmp_path, monkeypatch) -> None:
    """Older work folders lack the probes' answer NLL and 4-way choice, and their probes the frames of
    the base's replies: the base is measured again and the probes framed, the rest kept."""
    (tmp_path / "data").mkdir()
    base = {"probes": [1, 1], "text_nll": 2.0, "code_nll": 1.0, "replies_nll": 1.0}
    (tmp_path / "data" / "prepared.json").write_text(json.dumps({"probes": {"kept": 2}, "base": base}))
    probes = [
        {**quality.replies.chat(f"Capital {c}?", a), "category": "capitals"}
        for c, a in (("A", "Ax"), ("B", "By"))
    ]
    quality.data.write_jsonl(tmp_path / "data" / "probes.jsonl", probes)
    new = {**base, "probes_nll": 0.5, "probes_chosen": [1, 0]}
    monkeypatch.setattr(slimtune.models, "load", lambda name: ("model", None))
    monkeypatch.setattr(quality, "_tokenizer", lambda: None)
    monkeypatch.setattr(
        quality, "_replies", lambda model, tok, questions, budget: ["It is Ax.", "By, I think."]
    )
    monkeypatch.setattr(quality, "measure", lambda model, out, preset: new if model == "model" else None)
    info = quality.prepare(tmp_path, quality.PRESETS["tiny"])
    saved = json.loads((tmp_path / "data" / "prepared.json").read_text())
    assert info["base"] == new and saved["base"] == new
    framed = quality._read(tmp_path / "data" / "probes.jsonl")
    assert [p["prefix"] for p in framed] == ["It is ", ""] and framed[1]["messages"] == probes[1]["messages"]
    assert quality.prepare(tmp_path, quality.PRESETS["tiny"]) == info  # complete now: read as it is


def test_each_probe_is_offered_its_answer_and_three_others_of_its_category() -> None:
    import quality_choice

    answers = {"capitals": ["Paris", "Rome", "Oslo", "Lima", "paris"], "numbers": ["seven", "two"]}
    probes = [
        {**quality.replies.chat(f"q{i}", a), "category": c}
        for c, group in answers.items()
        for i, a in enumerate(group)
    ]
    sets = quality_choice.candidates(probes)
    assert sets == quality_choice.candidates(probes)  # seeded: the base and every run see the same
    for probe, options in zip(probes, sets, strict=True):
        own = probe["messages"][-1]["content"]
        others = {a.lower() for a in answers[probe["category"]]} - {own.lower()}
        assert options[0] == own and len(options) == 1 + min(3, len(others))
        assert {o.lower() for o in options[1:]} <= others and len({o.lower() for o in options}) == len(
            options
        )
    assert quality_choice.frame("Well, the capital is Paris.", "paris") == "Well, the capital is "
    assert quality_choice.frame("Parisian food", "Paris") == ""  # whole words only


def _summed_nll(model, encoded: list[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """The plain reference: each sequence's summed next-token NLL over its labelled positions, from one
    right-padded batch."""
    from slimtune.apps.train.tasks import right_padded

    ids, labels, mask = right_padded(encoded, pad_id, "cpu")
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    )
    return loss.sum(1).tolist()


def test_candidates_sharing_a_prefix_score_as_when_run_whole() -> None:
    """The prefix run once with its cache repeated gives each sequence's summed NLL as a plain padded
    batch does: own parts of different lengths, one a prefix of another, labels starting inside the
    shared part or after it, and the shortest shared part (one token)."""
    import quality_choice
    from slimtune.apps.train.models import ModelSpec, build

    model, _ = build(ModelSpec(builtin="tiny-llama"), seed=5)
    model.eval()
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 60, (9,), generator=g).tolist()
    for shared, starts in ((prefix, 4), (prefix, 9), (prefix[:1], 0)):
        owns = [[7, 8], [7, 8, 9, 10, 11], [12], [7]]
        encoded = [(shared + own, [-100] * starts + (shared + own)[starts:]) for own in owns]
        with torch.no_grad():
            cached = quality_choice.shared_nll(model, encoded, pad_id=0)
            whole = _summed_nll(model, encoded, pad_id=0)
        assert cached == pytest.approx(whole, rel=1e-5, abs=1e-5)
        assert len(set(round(x, 4) for x in whole)) == len(owns)  # distinct: a wrong offset would show


@pytest.mark.skipif(
    not slimtune.models.is_available("smollm2-135m"),
    reason=f"needs the built-in model: {slimtune.models.INSTALL}",
)
def test_the_base_chooses_the_answers_it_gives_in_its_own_sentences() -> None:
    """In the frame of its own reply the base prefers its answer over others of the category; the
    same candidates as bare replies do not show it (the reason for the frames)."""
    import quality_choice

    model, _ = slimtune.models.load("smollm2-135m")
    questions = [f"What is the capital of {c}?" for c in ("France", "Japan", "Germany", "Egypt")]
    answers = ["Paris", "Tokyo", "Berlin", "Cairo"]
    tok = quality._tokenizer()
    replies = quality._replies(model, tok, questions, 12)
    probes = [
        quality._probe(q, a, "capitals", r) for q, a, r in zip(questions, answers, replies, strict=True)
    ]
    assert all(p["prefix"] for p in probes), replies  # the base names each answer in its reply
    assert quality_choice.chosen(model, tok, probes) == [1, 1, 1, 1]
    bare = [{**p, "prefix": ""} for p in probes]
    assert quality_choice.chosen(model, tok, bare) != [1, 1, 1, 1]


def test_a_search_starts_from_every_finished_run_of_its_chains(tmp_path) -> None:
    """Runs an earlier search chose (other levels, other rules) are points on the same curve: read,
    never run again, and reported; a folder without results (a run in progress) is not read."""
    preset = replace(quality.PRESETS["tiny"], levels=(0.7, 0.8), max_runs=10)
    rates = {2e-4: 0.83, 6.67e-5: 0.72, 3.46e-4: 0.81, 6e-4: 0.79, 2.22e-5: 0.46}
    for lr, learned in rates.items():
        run = _fake_run(tmp_path, "full", 0, lr, learned, 0.3)
        folder = tmp_path / "runs" / f"full-seed0-lr{lr:.3g}"
        folder.parent.mkdir(exist_ok=True)
        run.folder.rename(folder)
        (folder / "metrics.json").write_text(json.dumps(run.metrics))
        (folder / "measures.json").write_text(json.dumps(run.measures))
    (tmp_path / "runs" / "full-seed0-lr1e-05").mkdir()  # started, unfinished
    found = quality.Search(tmp_path, replace(preset, methods=("full",)), "tiny", 1, launch=False).run()
    assert sorted(r.lr for r in found) == sorted(float(f"{lr:.3g}") for lr in rates)
    assert {round(r.learned, 2) for r in found} == set(rates.values())


def test_rates_asked_for_are_run_in_their_order_past_the_search_and_its_run_limit(tmp_path) -> None:
    """`--lr`: a point a reader wants (out of the search's order, or past its end) is run by command,
    once; rates already run (as their names round them) are not run again."""
    preset = replace(quality.PRESETS["cpu"], max_runs=2)
    chain = quality.Chain(quality.METHODS["full"], 0)
    chain.runs = [_fake_run(tmp_path, "full", 0, lr, 0.6, 0.3) for lr in (1e-4, 3e-4)]
    assert chain.next(preset) is None  # the search is done: its run limit
    asked = replace(preset, rates=(1.0001e-4, 3.333e-5, 5e-4))
    assert chain.next(asked) == 3.333e-5
    chain.runs.append(_fake_run(tmp_path, "full", 0, 3.33e-5, 0.5, 0.3))
    assert chain.next(asked) == 5e-4
    chain.runs.append(_fake_run(tmp_path, "full", 0, 5e-4, 0.5, 0.3))
    assert chain.next(asked) is None


def _paths(spec: dict) -> list[str]:
    """Every data file a benchmark recipe names."""
    found = [t["path"] for t in spec["tasks"]]
    for stage in spec["stages"]:
        found += [s["path"] for s in stage["data"] + stage.get("corda", {}).get("data", [])]
    return found


@pytest.mark.parametrize("method", quality.METHODS)
def test_every_method_of_the_benchmark_is_a_recipe_the_trainer_reads(tmp_path, method) -> None:
    """Each row's recipe passes the trainer's checks; FPF's control runs FPF's step over every
    module, FPF over the 4 that drifted most, both after the last stage only."""
    from slimtune.apps.train.recipe import load_recipe

    raised = quality.METHODS[method].pattern in quality.RAISED
    steps = dict(zip(quality.NEW_TASKS, (23, 30, 22), strict=True)) if raised else None
    spec = quality.recipe(quality.METHODS[method], 1e-4, 0, quality.PRESETS["cpu"], steps)
    for path in _paths(spec):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    stages = load_recipe(tmp_path / "recipe.yaml").stages
    tops = [[getattr(op, "top", None) for op in stage.post] for stage in stages]
    expected = {"full+fpf": 4, "full+fpf-all": 10**6}.get(method)
    if expected is not None:
        assert tops == [[], [], [expected]]


def test_the_command_refuses_a_rate_that_is_not_positive(capsys) -> None:
    with pytest.raises(SystemExit):
        quality.main(["--preset", "tiny", "--lr", "1e-4", "0"])
    assert "--lr takes positive learning rates" in capsys.readouterr().err


def _work_folder(tmp_path: Path, preset: quality.Preset, rates: dict[float, float]) -> Path:
    """A work folder holding finished full fine-tuning runs of seed 0 (made with the preset's recipes)
    and its prepared data."""
    out = tmp_path / "work"
    (out / "data" / "seed0").mkdir(parents=True)
    for name in ("probes", "text", "swap-train"):
        where = out / "data" / ("seed0" if "-" in name else "") / f"{name}.jsonl"
        where.write_text(json.dumps({"name": name}) + "\n")
    for lr, learned in rates.items():
        run = _fake_run(tmp_path, "full", 0, lr, learned, 0.3)
        tag = f"full-seed0-lr{lr:.3g}"
        (out / "runs").mkdir(exist_ok=True)
        run.folder.rename(out / "runs" / tag)
        (out / "runs" / tag / "metrics.json").write_text(json.dumps(run.metrics))
        (out / "runs" / tag / "measures.json").write_text(json.dumps(run.measures))
        spec = quality.recipe(quality.METHODS["full"], float(f"{lr:.3g}"), 0, preset)
        (out / f"{tag}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def _search(out: Path, preset: quality.Preset, kept: Path) -> list[quality.Run]:
    return quality.Search(out, replace(preset, methods=("full",)), "tiny", 1, False, kept).run()


def _as_records(runs: list[quality.Run]) -> list[tuple]:
    return [(r.method, r.seed, r.lr, r.metrics, r.measures, r.finals) for r in runs]


def test_the_ledger_keeps_every_finished_run_of_a_lost_work_folder(tmp_path) -> None:
    """Finished runs go into the results folder's ledger; a search on a fresh work folder (the same
    prepared data) reads them back whole and runs none of them again."""
    preset = replace(quality.PRESETS["tiny"], levels=(0.7, 0.8), max_runs=10)
    out = _work_folder(tmp_path, preset, {6.67e-5: 0.72, 2e-4: 0.83, 2.22e-5: 0.46})
    kept = tmp_path / "results" / "ledger"
    first = _search(out, preset, kept)
    assert sorted(p.name for p in kept.iterdir()) == sorted(f"{r.folder.name}.json" for r in first)
    shutil.rmtree(out / "runs")
    for recipe_file in out.glob("*.yaml"):
        recipe_file.unlink()
    again = _search(out, preset, kept)
    assert _as_records(again) == _as_records(first) and all(not r.folder.exists() for r in again)
    base = {"probes": [1] * PROBES}
    matched = quality_report.matched_all(again, (0.7, 0.8), base)
    assert len(matched) == 2 and matched == quality_report.matched_all(first, (0.7, 0.8), base)


def test_the_ledger_refuses_a_record_of_another_recipe_or_data(tmp_path) -> None:
    preset = replace(quality.PRESETS["tiny"], levels=(0.7, 0.8), max_runs=10)
    out = _work_folder(tmp_path, preset, {6.67e-5: 0.72})
    kept = tmp_path / "results" / "ledger"
    _search(out, preset, kept)
    shutil.rmtree(out / "runs")
    record = kept / "full-seed0-lr6.67e-05.json"
    before = record.read_text()
    refused = r"full-seed0-lr6.67e-05.json: not made with this benchmark's recipe"
    with pytest.raises(SystemExit, match=refused):
        _search(out, replace(preset, steps=preset.steps + 1), kept)
    (out / "data" / "seed0" / "swap-train.jsonl").write_text("{}\n")  # the seed's data drawn otherwise
    with pytest.raises(SystemExit, match=r"not made with this benchmark's prepared data"):
        _search(out, preset, kept)
    assert record.read_text() == before


def test_a_finished_run_made_with_another_recipe_is_refused_before_it_reaches_the_ledger(tmp_path) -> None:
    preset = replace(quality.PRESETS["tiny"], levels=(0.7, 0.8), max_runs=10)
    out = _work_folder(tmp_path, preset, {6.67e-5: 0.72})
    kept = tmp_path / "results" / "ledger"
    refused = r"full-seed0-lr6.67e-05.yaml: not made with this benchmark's recipe"
    with pytest.raises(SystemExit, match=refused):
        _search(out, replace(preset, batch_size=preset.batch_size + 1), kept)
    assert not kept.exists()
