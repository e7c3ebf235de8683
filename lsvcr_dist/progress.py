"""Progress lines for long stages: step, samples/s and ETA at most every ``every_s`` seconds.

A stage that prints nothing for minutes cannot be told apart from a hung one, so the fine-tune epochs and the text
encoding report through ``Progress``. The clock is injectable (tests drive it by hand). A line is printed by the
first ``update`` that comes ``every_s`` or more after the previous line (or the start), so the gap between lines is
at most ``every_s`` plus one step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"


def emit(line: str) -> None:
    """Print and flush: a Ray worker's stdout is a file, block-buffered, so an unflushed line can sit for minutes."""
    print(line, flush=True)


def print_lines_once() -> None:
    """Make every ``print`` of a Ray Train worker reach the job's log once, not twice.

    Ray Train 2.60 replaces a worker's ``print`` with one that logs the line through Train's logger and, because a
    Ray worker's ``sys.stdout`` is a wrapper rather than ``sys.__stdout__``, also prints it: each progress and metric
    line showed up twice in the driver's output. Setting ``RAY_TRAIN_ENABLE_PRINT_PATCH=0`` in the driver (Ray Train
    forwards it to the workers it starts) leaves workers' plain ``print``, which Ray forwards once. A value the user
    set is kept. Call before the trainer is built.
    """
    os.environ.setdefault(PRINT_PATCH_ENV, "0")


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` of a non-negative number of seconds (``?`` when unknown)."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):  # NaN, negative or unbounded
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Throttled progress printer.

    Args:
        name: what runs (``"finetune video epoch 2"``), the start of every line.
        total_steps: steps expected (0 = unknown).
        total_samples: samples expected (0 = unknown); the ETA comes from the steps when both are known, none when
            neither is.
        every_s: seconds between lines at most (plus one step).
        log: line printer.
        clock: monotonic seconds.
        unit: what ``samples`` counts (``samples``, ``texts``).
    """

    def __init__(self, name: str, total_steps: int = 0, every_s: float = 30.0, log: Callable[[str], None] = emit,
                 clock: Callable[[], float] = time.monotonic, unit: str = "samples", total_samples: int = 0):
        self.name, self.total, self.every_s, self.log, self.clock, self.unit = (
            name, int(total_steps), float(every_s), log, clock, unit)
        self.total_samples = int(total_samples)
        self.t0 = self.last = clock()
        self.step = self.samples = 0
        self.first_s: float | None = None
        """Seconds to the end of the first step (a data pipeline's start-up shows here)."""

    def line(self) -> str:
        """The current progress line: ``name: step s/T, n samples, r samples/s, ETA h:mm:ss``."""
        dt = max(self.clock() - self.t0, 1e-9)
        rate = self.samples / dt
        steps = f"{self.step}/{self.total}" if self.total else f"{self.step}"
        eta, nan = "", float("nan")
        if self.total:
            eta = f", ETA {format_eta((self.total - self.step) * dt / self.step if self.step else nan)}"
        elif self.total_samples:
            eta = f", ETA {format_eta((self.total_samples - self.samples) / rate if self.samples else nan)}"
        done = f"{self.samples}/{self.total_samples}" if self.total_samples else f"{self.samples}"
        return f"{self.name}: step {steps}, {done} {self.unit}, {rate:.1f} {self.unit}/s{eta}"

    def update(self, steps: int = 1, samples: int = 0) -> bool:
        """Count ``steps`` more steps of ``samples`` more samples; print when ``every_s`` has passed. Returns whether
        it printed."""
        self.step += int(steps)
        self.samples += int(samples)
        now = self.clock()
        if self.first_s is None:
            self.first_s = now - self.t0
        if now - self.last < self.every_s:
            return False
        self.last = now
        self.log(self.line())
        return True

    def done(self) -> float:
        """Print the final line (``... done in Xs``); returns the seconds since the start."""
        secs = self.clock() - self.t0
        self.log(f"{self.line()} - done in {secs:.1f}s")
        return secs
