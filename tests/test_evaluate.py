"""Evaluation extras: 4.4.2 scoring with the ID embeddings discarded, the popularity baseline, the select metric."""

from __future__ import annotations

import sys
import typing
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "train"))
import _ft_fakes as F  # noqa: E402

from lsvcr_dist.config import ConfigError, SelectMetric, load_config  # noqa: E402
from lsvcr_dist.evaluate import evaluate_model, iter_split, metrics_markdown, popularity_model, results_table  # noqa: E402
from lsvcr_dist.metrics import MetricAccumulator  # noqa: E402
from lsvcr_dist.models.baselines import Popularity  # noqa: E402
from lsvcr_dist.models.builders import build_sr_model  # noqa: E402
from lsvcr_dist.models.finetune_model import FinetuneModel, IDOnlyModelError, ids_discarded  # noqa: E402
from lsvcr_dist.train.finetune_loop import Selection  # noqa: E402
from lsvcr_dist.finetuned import build_finetune_model  # noqa: E402


@pytest.fixture()
def run(tmp_path):
    F.make_prepared(tmp_path)
    return tmp_path


def _with_ids_and_text_twin(run, task):
    """A fine-tune model whose (large) ID vectors matter, and an SR model built WITHOUT IDs holding its weights."""
    cfg = F.ft_config(run)
    F.write_aligned(run, cfg)
    torch.manual_seed(0)
    model, args = build_finetune_model(cfg, task, num_videos=F.V, text_table=F.text_table(),
                                       align_final=run / "align" / "final", la=F.DIMS["LA"])
    with torch.no_grad():
        model.sr.id_embedding.weight[1:].normal_(0.0, 2.0, generator=torch.Generator().manual_seed(3))
        model.sr.gate.fill_(1.5)
    twin_sr = build_sr_model(**{**args, "num_videos": 0})
    missing, unexpected = twin_sr.load_state_dict(model.sr.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == ["gate", "id_embedding.weight"]
    twin = FinetuneModel(twin_sr, model.text, F.V, task, model.tau)
    return model.eval(), twin.eval()


@pytest.mark.parametrize("task", ["video", "comment"])
def test_ids_discarded_scores_equal_a_model_built_without_ids(run, task):
    """Discarded = no gate*E_id in the histories, the F_c query or the candidates: the text path of the same weights."""
    model, twin = _with_ids_and_text_twin(run, task)
    batch = next(iter_split(run / "data", "test", task, 24))
    with torch.no_grad():
        full = model.eval_scores(batch)[0]
        with ids_discarded(model):
            text = model.eval_scores(batch)[0]
        ref = twin.eval_scores(batch)[0]
        after = model.eval_scores(batch)[0]
    torch.testing.assert_close(text, ref, rtol=0, atol=0)
    assert (full - ref).abs().max() > 1e-2  # the IDs did matter
    assert torch.equal(after, full) and model.sr.ids_enabled  # the block restores the model


def test_evaluate_reports_subsets_with_ids_discarded_beside_the_trained_ones(run):
    model, twin = _with_ids_and_text_twin(run, "video")
    res = evaluate_model(model, run / "data", "test", "video")
    ref = evaluate_model(twin, run / "data", "test", "video")
    assert res["ids_discarded"]["all"] == ref["metrics"]
    for name in ("unseen_videos", "unseen_users"):
        assert res["ids_discarded"][name] == ref["subsets"][name]
        assert res["ids_discarded"][name]["n"] == res["subsets"][name]["n"] > 0
    assert res["subsets"]["unseen_videos"] != ref["subsets"]["unseen_videos"]  # as trained: with the IDs
    table = results_table({"video": res})
    assert table["ids_discarded"]["video"]["unseen_videos"] == ref["subsets"]["unseen_videos"]
    assert "unseen videos (IDs discarded, 4.4.2)" in metrics_markdown(table)


def test_id_only_models_report_that_they_cannot_score_without_ids(run):
    """SASRec has nothing but IDs: no invented text path, the table says n/a."""
    cfg = F.ft_config(run, init="scratch", model="sasrec")
    model, _ = build_finetune_model(cfg, "video", num_videos=F.V, text_table=F.text_table())
    with pytest.raises(IDOnlyModelError, match="SASRec scores by video/comment ids only"):
        with ids_discarded(model):
            pass
    res = evaluate_model(model, run / "data", "test", "video")
    assert set(res["ids_discarded"]) == {"unsupported"} and res["subsets"]["unseen_videos"]["n"] == 4
    assert "| video / IDs discarded | n/a: SASRec" in metrics_markdown(results_table({"video": res}))


def test_evaluation_prints_progress_per_pass_with_rows_and_eta(run):
    """Each pass (IDs as trained, all videos ranked; IDs discarded) prints rows scored out of the split's rows, and a
    final line; a batch of 5 and a zero interval give a line per batch, so the counts are checkable by hand."""
    model, _ = _with_ids_and_text_twin(run, "video")
    lines: list[str] = []
    res = evaluate_model(model, run / "data", "test", "video", batch_size=5, full_ranking=True, progress="ev",
                         progress_every_s=1e-9, log=lines.append)
    n = res["metrics"]["n"]
    assert n == 12  # make_prepared's test split: 3 batches of 5, 5, 2
    passes = {"ev (test, all videos ranked)": [], "ev (test, IDs discarded)": []}
    for line in lines:
        name = line.split(":")[0]
        assert name in passes, line
        passes[name].append(line)
    for name, got in passes.items():
        batches = -(-n // 5)
        assert len(got) == batches + 1  # a line per batch (interval ~0), then the final one
        assert f"step 1, 5/{n} rows" in got[0] and ", ETA " in got[0]
        assert f"step {batches}, {n}/{n} rows" in got[-1] and " - done in " in got[-1]
    silent: list[str] = []
    assert evaluate_model(model, run / "data", "test", "video", batch_size=5, log=silent.append) == \
        evaluate_model(model, run / "data", "test", "video", batch_size=5, progress="x", log=silent.append) \
        and len(silent) >= 2 and all(s.startswith("x (test") for s in silent)  # progress changes no number


def test_full_ranking_encodes_the_videos_once_per_pass_and_ranks_as_scoring_each_batch_alone(run):
    """One SR forward per batch and one all-videos table per pass (``FinetuneModel.videos_fixed``), with the same
    full-ranking metrics as re-scoring every batch on its own; the table is dropped after the block."""
    from lsvcr_dist.metrics import per_row_metrics

    model, _ = _with_ids_and_text_twin(run, "video")
    tables, forwards = [], []
    encode = model.sr.encode_videos
    model.sr.encode_videos = lambda text, ids: tables.append(len(ids)) or encode(text, ids)
    model.sr.register_forward_hook(lambda *_: forwards.append(1))
    res = evaluate_model(model, run / "data", "test", "video", batch_size=5, full_ranking=True, subsets=False)
    assert tables.count(F.V + 1) == 1 and len(forwards) == 3  # 12 test rows in batches of 5, 5, 2
    ref = MetricAccumulator((5, 10))
    with torch.no_grad():
        for batch in iter_split(run / "data", "test", "video", 5):
            scores = model.video_scores(model(batch))  # [B, V + 1], the table encoded for this batch alone
            pos = torch.zeros_like(scores, dtype=torch.bool)
            pos[torch.arange(len(scores)), batch["target_video"]] = True
            cand = torch.ones_like(pos)
            cand[:, 0] = False
            ref.update(per_row_metrics(scores, pos, cand, (5, 10)))
    assert res["full"] == ref.result() and res["full"]["n"] == 12
    with torch.no_grad():
        with model.videos_fixed():
            held = model.all_videos()
            assert model.all_videos() is held
        model.sr.gate.add_(1.0)
        assert not torch.allclose(model.all_videos(), held)  # outside the block: encoded from the current weights
    with pytest.raises(RuntimeError, match="gradients are on"):
        with model.videos_fixed():
            pass


# ------------------------------------------------------------------------------------------ popularity
def test_popularity_counts_and_pessimistic_ties():
    b1 = {"target_video": torch.tensor([3, 3, 1, 0])}
    b2 = {"target_video": torch.tensor([2, 3, 2])}
    counts = Popularity.count_targets([b1, b2], "video", 4)
    assert counts.tolist() == [0, 1, 2, 3, 0]
    with pytest.raises(ValueError, match="target id 9 exceeds the 4 known ids"):
        Popularity.count_targets([{"target_video": torch.tensor([9])}], "video", 4)
    pop = Popularity(counts, "video")
    batch = {"cand_videos": torch.tensor([[1, 3, 4, 2], [4, 1, 0, 0]]), "target_video": torch.tensor([1, 4]),
             "video_hist": torch.zeros(2, 3, dtype=torch.long)}
    scores, pos, mask = pop.eval_scores(batch)
    assert scores[0].tolist() == [1, 3, 0, 2] and mask[1].tolist() == [True, True, False, False]
    from lsvcr_dist.metrics import positive_ranks

    ranks, _ = positive_ranks(scores, pos, mask)
    assert ranks[:, 0].tolist() == [3, 2]  # video 1 (count 1) behind 3 and 2; unseen video 4 (count 0) ranks last
    full = pop.video_scores(pop(batch))
    assert full.shape == (2, 5) and full[0, 0] < -1e8 and full[1, 1:].tolist() == [1, 2, 3, 0]
    comments = Popularity.count_targets([{"target_comments": torch.tensor([[5, 6], [5, 0]])}], "comment", 6)
    assert comments.tolist() == [0, 0, 0, 0, 0, 2, 1]


def test_popularity_through_the_evaluation_matches_a_hand_count(run):
    """Counts of the training targets read straight from the shards, ranked pessimistically by hand."""
    def rows(split):
        t = pq.read_table(run / "data" / "parquet" / split / "part-00000.parquet").to_pydict()
        return [i for i, task in enumerate(t["task"]) if task == 0], t

    idx, train = rows("train")
    counts = np.bincount([train["target_video"][i] for i in idx], minlength=F.V + 1)
    idx, test = rows("test")
    ndcg = []
    for i in idx:
        cand, tgt = np.asarray(test["cand_videos"][i]), test["target_video"][i]
        rank = 1 + int(((counts[cand] >= counts[tgt]) & (cand != tgt) & (cand > 0)).sum())
        ndcg.append(1 / np.log2(rank + 1) if rank <= 10 else 0.0)
    got = evaluate_model(popularity_model(run / "data", "video"), run / "data", "test", "video")
    assert got["metrics"]["ndcg@10"] == pytest.approx(float(np.mean(ndcg)), abs=1e-12)
    assert got["metrics"]["n"] == len(idx) and set(got["ids_discarded"]) == {"unsupported"}


# ------------------------------------------------------------------------------------------ select metric
def test_select_metric_literal_matches_the_metrics_evaluate_reports():
    names = set(MetricAccumulator((5, 10)).result()) - {"n"}
    assert set(typing.get_args(SelectMetric)) == names
    assert load_config(None, "finetune", ["select_metric=ndcg@5"]).select_metric == "ndcg@5"
    assert load_config(None, "finetune").select_metric == "ndcg@10"
    with pytest.raises(ConfigError, match="'select_metric' must be one of .*got 'ndcg@20'"):
        load_config(None, "finetune", ["select_metric=ndcg@20"])


def test_selection_and_early_stop_follow_the_configured_metric():
    """Val curves where NDCG@5 peaks at epoch 1 and NDCG@10 at epoch 3: the best epoch and the stop differ."""
    curve = [{"ndcg@5": 0.30, "ndcg@10": 0.40}, {"ndcg@5": 0.28, "ndcg@10": 0.41},
             {"ndcg@5": 0.29, "ndcg@10": 0.45}, {"ndcg@5": 0.20, "ndcg@10": 0.30}]

    def run(metric):
        sel, saved = Selection(metric, patience=2), []
        for epoch, val in enumerate(curve, 1):
            improved = sel.update(val)
            sel.record(improved)
            saved += [epoch] if improved else []
            if sel.stop:
                return saved, epoch, sel.best
        return saved, None, sel.best

    assert run("ndcg@5") == ([1], 3, 0.30)
    assert run("ndcg@10") == ([1, 2, 3], None, 0.45)
    with pytest.raises(KeyError, match="select_metric='mrr' is not among"):
        Selection("mrr", 1).update(curve[0])
