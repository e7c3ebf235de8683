"""Progress lines of long stages: cadence, rate and ETA, by hand with a fake clock."""

from __future__ import annotations

import os

from lsvcr_dist.progress import PRINT_PATCH_ENV, Progress, format_eta, print_lines_once


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_line_at_most_every_30_s_with_rate_and_eta():
    clock, lines = Clock(), []
    p = Progress("finetune video epoch 1", total_steps=10, log=lines.append, clock=clock)
    printed = []
    for step, t in enumerate([10, 20, 29.9, 31, 45, 60.9, 61, 70, 95, 120], start=1):
        clock.t = 100 + t
        printed.append(p.update(1, 64))
    # first line at t >= 30 after the start, next at t >= 30 after that line (61), then 95 (>= 91)
    assert printed == [False, False, False, True, False, False, True, False, True, False]
    assert p.first_s == 10
    assert lines[0] == "finetune video epoch 1: step 4/10, 256 samples, 8.3 samples/s, ETA 0:00:46"
    assert lines[1] == "finetune video epoch 1: step 7/10, 448 samples, 7.3 samples/s, ETA 0:00:26"
    clock.t = 230
    assert p.done() == 130
    assert lines[-1] == "finetune video epoch 1: step 10/10, 640 samples, 4.9 samples/s, ETA 0:00:00 - done in 130.0s"


def test_eta_from_samples_when_steps_are_unknown():
    clock, lines = Clock(), []
    p = Progress("encode base", every_s=5, log=lines.append, clock=clock, unit="texts", total_samples=1000)
    clock.t = 110
    p.update(1, 250)
    assert lines == ["encode base: step 1, 250/1000 texts, 25.0 texts/s, ETA 0:00:30"]
    assert format_eta(3725) == "1:02:05" and format_eta(float("nan")) == "?"


def test_print_lines_once_turns_ray_trains_print_patch_off_unless_the_user_set_it(monkeypatch):
    """The driver's value is what Ray Train forwards to its workers; ``tests/test_local_ray.py`` checks a job's log."""
    monkeypatch.setenv(PRINT_PATCH_ENV, "")  # records the value to restore, then unset it
    monkeypatch.delenv(PRINT_PATCH_ENV)
    print_lines_once()
    assert os.environ[PRINT_PATCH_ENV] == "0"
    monkeypatch.setenv(PRINT_PATCH_ENV, "1")
    print_lines_once()
    assert os.environ[PRINT_PATCH_ENV] == "1"
