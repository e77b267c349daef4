"""Progress of the commands' long phases: in place on a terminal, short lines otherwise.

tqdm's carriage-return frames would fill a log or CI output, so off a terminal a counted phase
prints a line at each tenth (once it has run `quiet_s` seconds: a phase that ends sooner prints
only its last line), and at the first update `EVERY_S` seconds after its last line however slowly it
goes (a loaded machine shows life at least that often); an uncounted phase prints a line when it
starts and one when it ends.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Protocol


class Bar(Protocol):
    def update(self, n: int = 1) -> None: ...

    def set_postfix_str(self, text: str) -> None: ...

    def close(self) -> None: ...


def interactive() -> bool:
    return sys.stderr.isatty()


def shown() -> bool:
    """Progress shows on the first process of a `torchrun` launch only."""
    return os.environ.get("RANK", "0") == "0"


class Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


EVERY_S = 30.0  # off a terminal, a counted phase prints at least this often (at its next update)


class Lines:
    """A counted phase off a terminal: a line at each tenth once `quiet_s` have passed, at the first
    update `EVERY_S` after the last line, and the last."""

    def __init__(self, total: int, desc: str, quiet_s: float = 0.0) -> None:
        self.total, self.desc, self.quiet_s = total, desc, quiet_s
        self.done, self.tenth, self.postfix = 0, 0, ""
        self.started = time.perf_counter()
        self.printed = self.started

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        tenth, seconds = self.done * 10 // max(self.total, 1), now - self.started
        new_tenth = tenth > self.tenth and seconds >= self.quiet_s
        if self.done >= self.total or new_tenth or now - self.printed >= EVERY_S:
            print(f"{self.desc}: {self.done}/{self.total} {self.postfix}".rstrip() + f" ({seconds:.1f} s)",
                  file=sys.stderr, flush=True)  # fmt: skip
            self.printed = now
        self.tenth = tenth

    def close(self) -> None:
        pass


def bar(total: int, desc: str, quiet_s: float = 0.0, leave: bool = True) -> Bar:
    """A progress bar on a terminal (tqdm; `leave`: kept when done), lines otherwise (see the module
    docstring)."""
    if not shown():
        return Silent()
    if not interactive():
        return Lines(total, desc, quiet_s)
    try:
        from tqdm import tqdm
    except ImportError:
        return Lines(total, desc, quiet_s)
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=leave)


@contextlib.contextmanager
def phase(desc: str) -> Iterator[None]:
    """An uncounted phase (loading a model, converting one): what it does, then how long it took; on a
    terminal both on one line."""
    if not shown():
        yield
        return
    started = time.perf_counter()
    print(f"{desc} ...", end="" if interactive() else "\n", file=sys.stderr, flush=True)
    outcome = "failed after "
    try:
        yield
        outcome = ""
    finally:
        seconds = time.perf_counter() - started
        start = "\r" if interactive() else ""
        print(f"{start}{desc}: {outcome}{seconds:.1f} s", file=sys.stderr, flush=True)
