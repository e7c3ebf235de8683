"""Failure budget that resets after checkpoint progress, and the retrying ``fit()`` built on it (no Ray needed)."""

from __future__ import annotations

import pytest

from lsvcr_dist.train.retry import FailureBudget, RetryingTrainer


class WorkerLost(RuntimeError):
    """Stands in for Ray Train's ``WorkerGroupError``."""


def test_budget_counts_only_failures_without_progress_between():
    b = FailureBudget(1, start_step=-1)
    assert b.failed(-1)          # spurious health-check failure at start, before any checkpoint: 1 of 1
    assert b.failed(6)           # a real worker loss after the step-6 checkpoint: progress, the count restarts
    assert not b.failed(6)       # a second failure with no checkpoint since: 2 of 1 -> give up
    b = FailureBudget(2, start_step=3)
    assert [b.failed(3), b.failed(3), b.failed(3)] == [True, True, False]
    b = FailureBudget(0)
    assert not b.failed(10)      # 0 = no retry at all, progress or not
    b = FailureBudget(-1)
    assert all(b.failed(1) for _ in range(50))  # -1 = unlimited
    with pytest.raises(ValueError, match="max_failures"):
        FailureBudget(-2)


class _Result:
    error = None


class _Trainer:
    def __init__(self, outcome):
        self.outcome = outcome

    def fit(self):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def _run(outcomes, steps, max_failures, resume_from=None):
    """RetryingTrainer over scripted attempts: ``outcomes[i]`` is attempt i's result or exception, ``steps[i]`` the
    newest checkpoint step after attempt i (``steps[0]``: before the first attempt)."""
    calls, log, it = [], [], iter(steps)

    def make(resume):
        calls.append(resume)
        return _Trainer(outcomes[len(calls) - 1])

    def progress():
        s = next(it)
        return (None if s < 0 else f"ckpt/step_{s}", s)

    t = RetryingTrainer(make, progress, max_failures, resume_from=resume_from, retry_on=(WorkerLost,), log=log.append)
    return t, calls, log


def test_spurious_start_failure_then_real_loss_finishes():
    ok = _Result()
    t, calls, log = _run([WorkerLost("health check"), WorkerLost("node died"), ok], [-1, -1, 6], max_failures=1)
    assert t.fit() is ok
    # first attempt from scratch, retry from scratch (no checkpoint yet), third from the step-6 checkpoint
    assert calls == [None, None, "ckpt/step_6"] and t.attempts == 3
    assert len(log) == 2 and "1 failure(s) since the newest complete checkpoint (step 6), 1 allowed" in log[1]


def test_failures_without_progress_exhaust_the_budget_and_reraise_the_last():
    last = WorkerLost("again")
    t, calls, _ = _run([WorkerLost("first"), last, _Result()], [4, 4, 4], max_failures=1, resume_from="old/step_4")
    with pytest.raises(WorkerLost) as e:
        t.fit()
    assert e.value is last and calls == ["old/step_4", "ckpt/step_4"]


def test_other_errors_are_not_retried():
    t, calls, _ = _run([ValueError("bad config"), _Result()], [-1], max_failures=5)
    with pytest.raises(ValueError, match="bad config"):
        t.fit()
    assert calls == [None]
