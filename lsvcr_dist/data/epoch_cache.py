"""Replay of a worker's data stream from memory after its first complete epoch.

Every epoch of a Ray Train dataset shard starts the Ray Data pipeline again: read tasks, ``flatten_nested``, the
task filter and, in alignment, a fresh ``AlignTransform`` actor that imports torch and transformers (about 6 s on 2
CPU cores, whatever the dataset's size). On a small split that start costs more than the epoch's training steps.
``EpochCache`` keeps the shuffle windows of a complete pass (``ingest.epoch_iterator`` permutes each window per
epoch *after* the cache), so a replayed epoch yields exactly the batches a streamed one would: the stream itself
is the same every epoch (``ingest_data_config``: deterministic split, preserved order). A split larger than
``ingest.cache_mb`` per worker is streamed every epoch, as before.

``streaming_split`` starts an epoch only when every worker iterates its split, so either every worker replays or
none does: after each epoch the loop calls ``settle(agree)``, with ``agree`` a collective AND over the workers,
until the cache is decided.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch


def window_bytes(window: dict[str, torch.Tensor]) -> int:
    """Bytes held by one window ``{column: Tensor[W, ...]}``."""
    return sum(t.numel() * t.element_size() for t in window.values())


class EpochCache:
    """One worker's stream windows, recorded during a complete pass within ``max_mb`` MiB and replayed after
    ``settle``.

    States: recording (no decision yet), replaying (``windows`` kept), off (streams every epoch; chosen for good
    when a pass was cut short, such as by ``max_steps_per_epoch``, or when any worker's windows exceed the budget).
    """

    def __init__(self, max_mb: int) -> None:
        if max_mb < 0:
            raise ValueError(f"EpochCache: max_mb must be >= 0, got {max_mb}")
        self.max_bytes = int(max_mb) * 2**20
        self.windows: list[dict[str, torch.Tensor]] | None = None
        self.off = self.max_bytes == 0
        self._recorded: list[dict[str, torch.Tensor]] | None = None
        self.bytes = 0

    @property
    def replaying(self) -> bool:
        """Whether epochs now come from memory (the shard is no longer iterated)."""
        return self.windows is not None

    @property
    def decided(self) -> bool:
        """Whether ``settle`` has nothing left to agree on (replaying, or off for good)."""
        return self.replaying or self.off

    def wrap(self, stream: Callable[[], Iterable[dict[str, torch.Tensor]]]) -> Iterator[dict[str, torch.Tensor]]:
        """The windows of one epoch: replayed from memory, or ``stream()`` (called only when not replaying), recorded
        while the pass stays within budget. A pass closed early (``generator.close()``) records nothing."""
        if self.windows is not None:
            yield from self.windows
            return
        rec: list | None = None if self.off else []
        self._recorded, self.bytes = None, 0
        for w in stream():
            if rec is not None:
                self.bytes += window_bytes(w)
                if self.bytes <= self.max_bytes:
                    rec.append(w)
                else:  # over budget: this worker streams every epoch (settle makes every worker agree)
                    rec = None
            yield w
        self._recorded = rec

    def settle(self, agree: Callable[[bool], bool]) -> bool:
        """After an epoch, on every worker at the same point: replay from now on iff ``agree`` (a collective AND over
        the workers) says every worker recorded a complete pass within budget; otherwise stream every epoch. Calls
        ``agree`` only while undecided (every worker decides alike, so they stop calling it together). Returns
        ``replaying``."""
        if self.decided:
            return self.replaying
        keep = agree(self._recorded is not None)
        if keep:
            self.windows = self._recorded
        else:
            self.off = True
        self._recorded = None
        return self.replaying
