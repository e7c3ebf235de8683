"""all_gather_with_grad on 2 gloo processes (torch.multiprocessing.spawn, no Ray).

Each rank holds half of one batch. Its loss is the mean over its rows against the gathered pool; averaging the
ranks' losses and gradients (what DDP / ZeRO do) must equal ONE process computing the same loss over the
concatenated batch, to 1e-6, including duplicate-target masking across ranks.
"""

from __future__ import annotations

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lsvcr_dist.losses import InfoNCE, SRLoss, SSCLoss
from lsvcr_dist.train import distributed as D

WORLD, B, DIM = 2, 3, 5


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * B, DIM, generator=g, dtype=torch.float64)
    y = torch.randn(WORLD * B, DIM, generator=g, dtype=torch.float64)
    # row 4 (rank 1) shares target id 11 with row 0 (rank 0): a cross-rank duplicate to mask
    keys = torch.tensor([11, 12, 13, 14, 11, 15])
    return x, y, keys


def _reference(fn):
    """Loss and grads of ONE process over the whole batch."""
    x, y, keys = _data()
    x.requires_grad_(), y.requires_grad_()
    loss = fn(x, y, x, y, torch.arange(WORLD * B), keys, keys)
    loss.backward()
    return loss.detach(), x.grad, y.grad


def _cases():
    nce = InfoNCE(0.5)
    sr = SRLoss(0.5, mask_duplicate_targets=True)
    ssc = SSCLoss(0.5)
    return {
        "infonce": lambda x, y, x_all, y_all, pos, k, k_all: nce(x, y_all, pos)[0],
        "sr_dup_masked": lambda x, y, x_all, y_all, pos, k, k_all: sr(x, y_all, pos, k, k_all)[0],
        "ssc": lambda x, y, x_all, y_all, pos, k, k_all: ssc(x, y, x_all, y_all, pos)[0],
    }


def _worker(rank: int, init_file: str, err_dir: str) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        assert D.world_size() == WORLD and D.rank() == rank
        x_full, y_full, keys_full = _data()
        rows = slice(rank * B, (rank + 1) * B)
        for name, fn in _cases().items():
            ref_loss, ref_gx, ref_gy = _reference(fn)
            x = x_full[rows].clone().requires_grad_()
            y = y_full[rows].clone().requires_grad_()
            keys = keys_full[rows]
            x_all, y_all = D.all_gather_with_grad(x), D.all_gather_with_grad(y)
            keys_all = D.all_gather(keys)
            assert torch.equal(keys_all, keys_full)
            pos = D.rank_offsets(B)
            assert pos.tolist() == list(range(rank * B, (rank + 1) * B))
            loss = fn(x, y, x_all, y_all, pos, keys, keys_all)
            loss.backward()
            # DDP averages gradients over ranks; the loss is logged as the all-reduced mean
            mean_loss = D.all_reduce_mean(loss)
            # each rank's x.grad / y.grad covers only its own rows: gather them, then apply DDP's 1/W averaging
            gx_all = D.all_gather(x.grad) / WORLD
            gy_all = D.all_gather(y.grad) / WORLD
            torch.testing.assert_close(mean_loss, ref_loss, rtol=0, atol=1e-6, msg=f"{name}: loss")
            torch.testing.assert_close(gx_all, ref_gx, rtol=0, atol=1e-6, msg=f"{name}: grad x")
            torch.testing.assert_close(gy_all, ref_gy, rtol=0, atol=1e-6, msg=f"{name}: grad y")
        # the masking case really masked something (row 0 vs row 4 share id 11)
        _, m = SRLoss(0.5)(x_full[rows], y_full, D.rank_offsets(B), keys_full[rows], keys_full)
        assert m["masked"] == 1.0  # one masked pool entry among this rank's 3 rows
        # unequal micro-batches fail loudly on every rank instead of hanging or mis-slicing
        try:
            D.all_gather_with_grad(torch.zeros(B + rank, DIM))
        except ValueError as e:
            assert "same per-rank shape" in str(e) and "[(3, 5), (4, 5)]" in str(e), str(e)
        else:
            raise AssertionError("unequal batch sizes were accepted")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(err_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.mark.timeout(120)
def test_gathered_losses_and_grads_match_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg_init")
        try:
            mp.spawn(_worker, args=(init_file, tmp), nprocs=WORLD, join=True)
        except Exception:
            msgs = [open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp)) if f.startswith("rank")]
            pytest.fail("worker failed:\n" + "\n".join(msgs))


def test_single_process_helpers_are_identity():
    """No process group: gather is the identity (same object), offsets start at 0, reductions copy."""
    x = torch.randn(4, 3, requires_grad=True)
    assert D.all_gather_with_grad(x) is x
    assert D.rank_offsets(4).tolist() == [0, 1, 2, 3]
    assert D.world_size() == 1 and D.rank() == 0
    v = torch.tensor([1.0, 3.0])
    assert D.all_reduce_mean(v).tolist() == [1.0, 3.0] and D.all_reduce_sum(v) is not v
