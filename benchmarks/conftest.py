"""Benchmark-only pytest setup: a summary of each group with rates and speedups over its reference."""

from __future__ import annotations

import pytest


def _rate(info: dict, median: float) -> str:
    parts = []
    if info.get("bytes"):
        parts.append(f"{info['bytes'] / median / 1e9:8.2f} GB/s")
    if info.get("flops"):
        parts.append(f"{info['flops'] / median / 1e12:8.3f} TFLOP/s")
    return "  ".join(parts)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Per group: median per call, achieved rate, and speedup over the reference (torch / dense floor)."""
    session = getattr(config, "_benchmarksession", None)  # pytest-benchmark keeps its results there
    results = [b for b in getattr(session, "benchmarks", []) if b and "label" in b.extra_info]
    if not results:
        return
    groups: dict[str, list] = {}
    for result in results:
        groups.setdefault(result.group, []).append(result)
    terminalreporter.section("median per call, rate at the median, speedup over the group's reference")
    for group, members in groups.items():
        reference = next((b for b in members if b.extra_info["reference"]), None)
        terminalreporter.write_line(group)
        for b in members:
            median = b.stats.median
            speedup = f"{reference.stats.median / median:6.2f}x" if reference else ""
            rate = _rate(b.extra_info, median)
            terminalreporter.write_line(
                f"  {b.extra_info['label']:<18} {median * 1e6:11.1f} us  {speedup:>7}  {rate}"
            )
