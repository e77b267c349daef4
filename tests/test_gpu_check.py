"""benchmarks/gpu_check.sh in its CPU dry run: what the device runner brings back (only files directly
under $OUT, at most 8) holds the step benchmark and the profile, every phase keeps its time box, the
plan fits the budget, and a run killed part-way keeps the rows it finished."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ["versions", "build", "gpu-tests", "step-benchmark", "profile", "backend-lora_linear",
          "backend-lora_input_grad", "backend-column_grad", "prefer", "kernel-microbenchmarks",
          "gpu-tests-cpp"]  # fmt: skip
SUMMARIES = {"bench.md", "profile.md", "prefer.md", "gpu-tests.txt", "phases.tsv", "log-tail.txt"}
ARCHIVE = "gpu-check-run.tar.gz"


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    # not a test worker's identity either: pytest-benchmark turns itself off under PYTEST_XDIST_WORKER
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_")}
    paths = {"OUT": str(tmp_path / "out"), "DRY_RESULTS": str(tmp_path / "res")}
    return env | paths | {"PYTHON": sys.executable, **extra}


def dry_run(tmp_path: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run"],
        cwd=ROOT, env=environment(tmp_path, **extra), capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def archived(out: Path) -> dict[str, str]:
    """The run folder inside the archive: relative path -> text."""
    with tarfile.open(out / ARCHIVE) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        return {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode(errors="replace") for m in members}


def phases(text: str) -> dict[str, dict[str, str]]:
    return {row["phase"]: row for row in csv.DictReader(io.StringIO(text), delimiter="\t")}


def row_saved(out: Path) -> bool:
    """The first benchmark row is in both the flat bench.md and the archive. One save writes the
    archive before the flat copies, so a row can reach bench.md a save before it reaches the archive."""
    bench = out / "bench.md"
    if not (bench.exists() and (out / ARCHIVE).exists()) or "| floor |" not in bench.read_text():
        return False
    return any(name.startswith("bench-tiny-") and "| floor |" in text for name, text in archived(out).items())


def test_dry_run_leaves_what_the_device_brings_back(tmp_path: Path) -> None:
    run = dry_run(tmp_path)
    assert run.returncode == 0, run.stdout[-3000:]
    out = tmp_path / "out"
    entries = list(out.iterdir())
    assert all(p.is_file() for p in entries) and len(entries) <= 8, entries
    assert {p.name for p in entries} == SUMMARIES | {ARCHIVE}
    done = phases((out / "phases.tsv").read_text())
    assert list(done) == PHASES
    assert all(row["rc"] == "0" for row in done.values()), done
    assert all(int(row["predicted"]) < int(row["limit"]) for row in done.values())
    assert "PLAN: time boxes add up to" in run.stdout and "PLAN CHECK FAILED" not in run.stdout
    assert "| floor |" in (out / "bench.md").read_text() and "| s2ft+lean |" in (out / "bench.md").read_text()
    assert "| full-mixed |" in (out / "profile.md").read_text()
    assert "| lora_linear |" in (out / "prefer.md").read_text()
    assert "test_gpu_up_proj_shapes" in (out / "gpu-tests.txt").read_text()
    assert "test_gpu_bf16_matches_peft_bf16" in (out / "gpu-tests.txt").read_text()
    inside = archived(out)
    assert "DRY_RUN" in inside and "profile/profile.csv" in inside and "profile/profile.png" in inside
    assert any(name.startswith("bench-tiny-") and name.endswith(".json") for name in inside)


def test_a_spent_budget_skips_the_rest_and_keeps_what_finished(tmp_path: Path) -> None:
    run = dry_run(tmp_path, BUDGET="12")  # versions fits; the tests (about 20 s on a CPU) get no box
    assert run.returncode == 0, run.stdout[-3000:]
    done = phases((tmp_path / "out" / "phases.tsv").read_text())
    assert list(done) == PHASES
    assert done["versions"]["rc"] == "0"
    assert "skipped" in {row["rc"] for row in done.values()}
    assert "budget is spent" in run.stdout
    assert "versions.log" in archived(tmp_path / "out")


def test_a_run_killed_part_way_keeps_its_finished_rows(tmp_path: Path) -> None:
    """The device kills a command at its limit: what was saved by then comes back. The step benchmark
    is slowed down (many steps per method) and the whole script killed once its first row is saved."""
    process = subprocess.Popen(
        ["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run"], cwd=ROOT,
        env=environment(tmp_path, SAVE_EVERY="1", BENCH_STEPS="400"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    out = tmp_path / "out"
    try:
        deadline = time.monotonic() + 300
        while not row_saved(out):
            assert time.monotonic() < deadline, "no benchmark row was saved in 300 s"
            assert process.poll() is None, "the dry run ended before its first benchmark row was saved"
            time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert len(list(out.iterdir())) <= 8
    assert row_saved(out)  # in bench.md and in the archive, after the kill
    done = phases(archived(out)["phases.tsv"])
    assert done["gpu-tests"]["rc"] == "0" and "step-benchmark" not in done  # killed inside the benchmark
