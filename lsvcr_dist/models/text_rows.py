"""Frozen text vectors read on demand: the fine-tune and evaluation models' view of the embedding store.

``TextRows`` gathers only the rows a batch needs (``ids [B, L] -> [B, L, Din]`` float32) from either

* a memory-mapped ``EmbeddingStore`` (fp16 shards; what fine-tune workers and evaluation use): rows are read from
  the page cache, which every process on a node shares, and converted to float32 per batch, so a worker's own
  memory does not grow with the number of texts (a paper-scale fp32 copy would be ~14.26M x Din x 4 bytes per
  worker); or
* an in-memory ``[1 + V + C, Din]`` tensor (tests, small tools).

The video rows ``[V + 1, Din]`` are the exception: the all-videos L_VRT (Eq. 18) and the full ranking encode every
video each step, so they are read once and kept (float32, ~100k x Din at paper scale).

Nothing here is a parameter or a registered buffer: checkpoints never carry the table and DDP never broadcasts it.
No Ray, DeepSpeed or process-group collectives (boundary rule).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class TextRows:
    """Text-id -> vector lookups over a store or a tensor.

    Args:
        source: an ``EmbeddingStore`` (anything with ``lookup(np.ndarray) -> float32 [..., dim]``, ``dim`` and
            ``count``), a ``[1 + V + C, Din]`` tensor (row 0 zeros), or another ``TextRows`` (shared).
        num_videos: V (text ids ``1..V`` are video titles).
    """

    def __init__(self, source, num_videos: int):
        if isinstance(source, TextRows):
            source = source.source
        self.source = source
        self.num_videos = int(num_videos)
        if isinstance(source, torch.Tensor):
            if source.dim() != 2:
                raise ValueError(f"text table must be [1 + V + C, Din], got shape {tuple(source.shape)}")
            self.source = source.float()
            self.dim, self.rows = int(source.shape[1]), int(source.shape[0])
        else:
            self.dim, self.rows = int(source.dim), int(source.count) + 1
        if self.num_videos + 1 > self.rows:
            raise ValueError(f"text table has {self.rows} rows, fewer than num_videos + 1 = {self.num_videos + 1}")
        self._videos: dict[torch.device, torch.Tensor] = {}

    @property
    def in_memory(self) -> bool:
        """Whether the rows are a tensor in this process (else memory-mapped store reads)."""
        return isinstance(self.source, torch.Tensor)

    @property
    def shape(self) -> tuple[int, int]:
        """``(1 + V + C, Din)``."""
        return (self.rows, self.dim)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Vectors of integer text ids of any shape ``[...]`` -> float32 ``[..., Din]`` on ``ids.device``."""
        if self.in_memory:
            return F.embedding(ids, self.source.to(ids.device))
        vec = self.source.lookup(ids.detach().cpu().numpy())
        return torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32)).to(ids.device)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        return self(torch.as_tensor(ids))

    def videos(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows ``0..V`` ``[V + 1, Din]`` float32 (row 0 zeros), read once per device and kept."""
        device = torch.device(device)
        if device not in self._videos:
            if self.in_memory:
                self._videos[device] = self.source[: self.num_videos + 1].to(device)
            else:
                self._videos[device] = self(torch.arange(self.num_videos + 1)).to(device)
        return self._videos[device]

    def all(self) -> torch.Tensor:
        """Every row ``[1 + V + C, Din]`` float32 in memory: for small stores and tests only."""
        return self.source if self.in_memory else self(torch.arange(self.rows))
