"""Retry a Ray Train ``fit()`` while checkpoints make progress: a failure budget that resets after progress.

Ray's ``FailureConfig(max_failures=N)`` counts every worker-group failure of a run. One spurious failure at start
(a worker health check timing out on a loaded machine) spends a budget of 1, and a real worker loss hours later
then fails the job although training advanced in between. Ray 2.60 has no such reset (its failure policy is
internal to the controller), so the driver owns the budget: each attempt runs with Ray's ``max_failures=0``
(preemptions and controller start-up failures keep Ray's own, separate budgets), and ``RetryingTrainer.fit``
starts a new attempt from the newest complete checkpoint while ``FailureBudget`` allows it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class FailureBudget:
    """Allows at most ``max_failures`` failures in a row without checkpoint progress between them.

    A failure observed when the newest complete checkpoint is past the one seen at the previous failure (or at the
    start) opens a new count: only failures that made no progress since the last one accumulate.
    ``max_failures=-1`` allows any number; ``0`` none.
    """

    def __init__(self, max_failures: int, start_step: int = -1) -> None:
        if max_failures < -1:
            raise ValueError(f"checkpoint.max_failures must be >= -1 (-1 = unlimited), got {max_failures}")
        self.max_failures = max_failures
        self.step = start_step
        self.count = 0

    def failed(self, step: int) -> bool:
        """Record a failure while the newest complete checkpoint is at ``step``; True if a retry is allowed."""
        if step > self.step:
            self.step, self.count = step, 0
        self.count += 1
        return self.max_failures == -1 or self.count <= self.max_failures


def _retryable() -> tuple[type[BaseException], ...]:
    from ray.train import WorkerGroupError

    return (WorkerGroupError,)  # what Ray's max_failures covers: a worker raised or died


class RetryingTrainer:
    """A trainer whose ``fit()`` re-runs ``make_trainer(resume).fit()`` after each failure the budget allows.

    Args:
        make_trainer: ``resume_path_or_None -> trainer`` (a fresh Ray trainer with the same run name and storage,
            so ``ray.train.get_checkpoint()`` also sees the run's checkpoints).
        progress: ``() -> (newest complete checkpoint path or None, its step or -1)`` of this run.
        max_failures: see ``FailureBudget``.
        resume_from: the first attempt's resume path (a checkpoint of an earlier submission).
        retry_on: exception types that count as a failure (default: Ray Train's ``WorkerGroupError``); any other
            error is raised at once.
        log: one line per retry.
    """

    def __init__(self, make_trainer: Callable[[str | None], Any], progress: Callable[[], tuple[str | None, int]],
                 max_failures: int, resume_from: str | None = None,
                 retry_on: tuple[type[BaseException], ...] | None = None, log: Callable[[str], None] = print) -> None:
        self.make_trainer, self.progress, self.resume_from = make_trainer, progress, resume_from
        self.budget = FailureBudget(max_failures, progress()[1])
        self.retry_on, self.log = retry_on, log
        self.attempts = 0

    def fit(self):
        """The first successful attempt's result; re-raises the last failure once the budget is spent."""
        retry_on = self.retry_on or _retryable()
        resume = self.resume_from
        while True:
            self.attempts += 1
            try:
                return self.make_trainer(resume).fit()
            except retry_on as e:
                path, step = self.progress()
                if not self.budget.failed(step):
                    raise
                first = (str(e).strip().splitlines() or [""])[0][:300]
                self.log(f"[retry] attempt {self.attempts} failed ({type(e).__name__}: {first}); "
                         f"{self.budget.count} failure(s) since the newest complete checkpoint (step {step}), "
                         f"{self.budget.max_failures} allowed: resuming from {path or resume or 'the start'}")
                resume = path or resume
