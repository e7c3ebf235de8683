"""Text vectors read from the memory-mapped fp16 store score exactly as the old in-memory float32 table."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _ft_fakes as F  # noqa: E402

from lsvcr_dist.embeddings import EmbeddingStore  # noqa: E402
from lsvcr_dist.evaluate import evaluate_model, iter_split  # noqa: E402
from lsvcr_dist.finetuned import build_finetune_model, load_text_table  # noqa: E402
from lsvcr_dist.losses import CommentRankLoss, FinetuneLoss, VRTLoss  # noqa: E402
from lsvcr_dist.models.text_rows import TextRows  # noqa: E402
from lsvcr_dist.train.finetune_loop import train_step  # noqa: E402


@pytest.fixture()
def run(tmp_path):
    F.make_prepared(tmp_path)
    return tmp_path


def _store_and_table(run):
    """A multi-shard store (64 rows a shard) and the float32 table of its fp16-rounded rows (the old path)."""
    store = F.write_store(run / "embeddings" / "aligned", F.text_table())
    table = torch.from_numpy(EmbeddingStore.open(store).as_array())
    return load_text_table(store), table


def test_store_lookup_matches_table_rows_in_any_order(run):
    """Ids spread over every shard, repeated and out of order, in a [B, L] shape."""
    store, table = _store_and_table(run)
    assert len(store.shards) > 2
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, F.V + F.C + 1, size=(7, 13)))
    ids[0, :3] = torch.tensor([F.V + F.C, 0, F.V + F.C])
    rows = TextRows(store, F.V)
    got = rows(ids)
    assert got.dtype == torch.float32 and got.shape == (7, 13, table.shape[1])
    assert torch.equal(got, table[ids])
    assert torch.equal(rows.videos(), table[: F.V + 1]) and torch.equal(rows.all(), table)


def _models(run, task, store, table):
    cfg = F.ft_config(run)
    F.write_aligned(run, cfg)
    out = []
    for source in (store, table):
        torch.manual_seed(0)
        m, _ = build_finetune_model(cfg, task, num_videos=F.V, text_table=source, align_final=run / "align" / "final",
                                    la=F.DIMS["LA"], generator=torch.Generator().manual_seed(0))
        out.append(m)
    return cfg, out


@pytest.mark.parametrize("task", ["video", "comment"])
def test_mmapped_store_scores_and_trains_identically_to_the_in_memory_table(run, task):
    store, table = _store_and_table(run)
    cfg, (mapped, memory) = _models(run, task, store, table)
    assert not mapped.text.in_memory and memory.text.in_memory
    assert not any("text" in k for k in mapped.state_dict())  # nothing of the store is a parameter or buffer
    assert list(mapped.buffers()) == list(memory.buffers())
    res = [evaluate_model(m, run / "data", "test", task, full_ranking=True) for m in (mapped, memory)]
    assert res[0] == res[1] and res[0]["metrics"]["n"] > 0
    batch = next(iter_split(run / "data", "train", task, 16, train_mode=True))
    losses = []
    for m in (mapped, memory):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        task_loss = VRTLoss(cfg.loss.tau) if task == "video" else CommentRankLoss(cfg.loss.tau)
        losses.append([train_step(m, batch, task, task_loss, FinetuneLoss.from_config(cfg.loss), opt,
                                  torch.Generator().manual_seed(1))["loss"] for _ in range(3)])
    assert losses[0] == losses[1]
    for (name, a), b in zip(mapped.named_parameters(), memory.parameters()):
        assert torch.equal(a, b), name


def test_text_rows_refuse_a_table_shorter_than_the_videos():
    with pytest.raises(ValueError, match="fewer than num_videos"):
        TextRows(torch.zeros(3, 4), num_videos=5)
