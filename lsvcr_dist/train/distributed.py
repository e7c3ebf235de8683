"""Cross-worker collectives: the ONLY autograd all-gather of the project and the one set of rank/world helpers.

Gradient convention: every rank computes the mean loss over its own B rows against the gathered pool. The
all-gather's backward all-reduces (sums) the pool gradient over ranks and keeps this rank's slice, so after the
usual DDP / ZeRO gradient AVERAGING each parameter's gradient equals that of the mean loss over the concatenated
``W*B`` batch in one process (``tests/test_distributed_gather.py`` checks this to 1e-6). A plain ``dist.all_gather``
returns tensors with no autograd history, so the other ranks' rows would silently get no gradient.

Every helper is the identity (or a no-op) when ``torch.distributed`` is unavailable, not initialised, or the world
has one rank, so single-process code paths need no special casing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _check_same_shape(x: torch.Tensor) -> None:
    """Raise ValueError on every rank unless all ranks hold ``x`` of the same shape (gather needs it)."""
    shape = torch.tensor([x.dim(), *x.shape, *([0] * (8 - x.dim()))], dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    sizes = [tuple(s[1:1 + int(s[0])].tolist()) for s in shapes]
    if len(set(sizes)) != 1:
        raise ValueError(
            f"all_gather_with_grad needs the same per-rank shape on every rank (equal micro-batch B; use"
            f" drop_last / equal shards), got shapes by rank {sizes}"
        )


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's ``x``. Backward: all-reduce(SUM) the gradient, keep this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.b = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.b:(ctx.rank + 1) * ctx.b]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Gather ``x [B, ...]`` from every rank into ``[W*B, ...]`` (rank order) with gradients to each owner's rows.

    Args:
        x: this rank's rows; every rank must pass the same shape.

    Returns:
        ``[W*B, ...]``; ``x`` itself when there is no process group or one rank.

    Raises:
        ValueError: the ranks' shapes differ (raised on every rank, so none hangs in the gather).
    """
    if not _active():
        return x
    _check_same_shape(x)
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Gather ``x [B, ...]`` without gradients (ids / keys for duplicate masking); same rules as the autograd one."""
    if not _active():
        return x
    _check_same_shape(x)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def rank_offsets(local_b: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``pos_index [B]`` = rows of this rank's samples inside a gathered ``[W*B, ...]`` tensor."""
    return torch.arange(local_b, device=device) + rank() * local_b


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (a new tensor, no autograd); ``x`` cloned without a process group."""
    out = x.detach().clone()
    if _active():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (a new floating tensor, no autograd)."""
    out = all_reduce_sum(x if x.is_floating_point() else x.double())
    return out / world_size()


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (a decision only rank 0 can take, such as early stopping)."""
    if not _active():
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, 0)
    return bool(t.item())


def all_true(flag: bool, device: torch.device | str | None = None) -> bool:
    """Whether ``flag`` holds on every rank (a MIN all-reduce of a tensor on ``device``, which must suit the process
    group's backend: the GPU under NCCL; ``flag`` itself without a process group)."""
    if not _active():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj`` in rank order (``[obj]`` without a process group)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
