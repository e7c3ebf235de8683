"""EpochCache: a replayed epoch yields exactly the batches of a streamed one; the cache is dropped for good when a
pass is cut short, runs over budget, or any worker disagrees; the shard is not iterated while replaying."""

from __future__ import annotations

import itertools

import pytest
import torch

from lsvcr_dist.data.epoch_cache import EpochCache, window_bytes
from lsvcr_dist.data.ingest import epoch_iterator


class FakeShard:
    """``iter_torch_batches`` over 50 rows (``x`` [50], ``y`` [50, 3]) in stream order; counts the passes started."""

    def __init__(self) -> None:
        self.passes = 0
        self.x = torch.arange(50)
        self.y = torch.arange(150).reshape(50, 3)

    def iter_torch_batches(self, batch_size: int, drop_last: bool, **_kw):
        self.passes += 1
        for s in range(0, 50, batch_size):
            yield {"x": self.x[s:s + batch_size].clone(), "y": self.y[s:s + batch_size].clone()}


def epoch(shard, e: int, cache=None, seed: int = 7):
    """One epoch's batches of 4 rows with windows of 16 rows, as lists."""
    return [{k: v.tolist() for k, v in b.items()} for b in epoch_iterator(shard, 4, e, seed, 16, 0, cache=cache)]


def test_replayed_epochs_equal_streamed_ones_without_iterating_the_shard():
    shard, cache = FakeShard(), EpochCache(1)
    first = epoch(shard, 0, cache)
    assert first == epoch(FakeShard(), 0) and shard.passes == 1
    # 50 rows x (1 + 3) int64 columns, recorded in full
    assert cache.bytes == 50 * 4 * 8 == sum(window_bytes(w) for w in cache._recorded)
    seen = []
    assert cache.settle(lambda ok: seen.append(ok) or ok) and seen == [True] and cache.replaying
    for e in (1, 2, 3):
        assert epoch(shard, e, cache) == epoch(FakeShard(), e)
    assert shard.passes == 1  # epochs 1-3 never touched the shard
    e1 = epoch(shard, 1, cache)
    assert e1 != first and sorted(r for b in e1 for r in b["x"]) == list(range(48))  # drop_last: 48 of 50 rows
    assert cache.settle(lambda ok: pytest.fail("decided caches do not call the collective"))


def test_replay_is_not_disturbed_by_consumers_writing_into_batches():
    shard, cache = FakeShard(), EpochCache(1)
    epoch(shard, 0, cache)
    cache.settle(lambda ok: ok)
    for b in epoch_iterator(shard, 4, 1, 7, 16, 0, cache=cache):
        b["x"].zero_()  # batches are copies (the per-epoch permutation), never the cached windows
    assert epoch(shard, 2, cache) == epoch(FakeShard(), 2)


@pytest.mark.parametrize("case", ["over_budget", "cut_short", "other_worker_disagrees"])
def test_cache_goes_off_for_good(case):
    shard = FakeShard()
    cache = EpochCache(1)
    if case == "over_budget":
        cache.max_bytes = 3 * 16 * 4 * 8 - 1  # the fourth window would pass the budget
        epoch(shard, 0, cache)
    elif case == "cut_short":  # max_steps_per_epoch: the loop closes the stream before its end
        it = epoch_iterator(shard, 4, 0, 7, 16, 0, cache=cache)
        list(itertools.islice(it, 3))
        it.close()
    else:
        epoch(shard, 0, cache)
    seen = []
    agree = (lambda ok: seen.append(ok) or False) if case == "other_worker_disagrees" else \
        (lambda ok: seen.append(ok) or ok)
    assert not cache.settle(agree) and cache.off and cache.decided
    assert seen == [case == "other_worker_disagrees"]
    assert epoch(shard, 1, cache) == epoch(FakeShard(), 1) and shard.passes == 2  # streamed again


def test_zero_budget_streams_and_negative_budget_is_refused():
    shard, cache = FakeShard(), EpochCache(0)
    assert cache.decided and not cache.replaying
    epoch(shard, 0, cache)
    epoch(shard, 1, cache)
    assert shard.passes == 2
    # shuffle window 0 (stream order) turns a cache off before any pass, so no worker calls the collective
    shard, cache = FakeShard(), EpochCache(1)
    for e in (0, 1):
        list(epoch_iterator(shard, 4, e, 7, 0, 0, cache=cache))
    assert cache.off and shard.passes == 2
    assert not cache.settle(lambda ok: pytest.fail("decided caches do not call the collective"))
    with pytest.raises(ValueError, match="max_mb must be >= 0, got -1"):
        EpochCache(-1)
