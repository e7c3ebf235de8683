"""Serving: evaluate_run exports the scorers; Recommender reproduces the fine-tune model's rankings (no LLM/Ray)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "train"))
import _ft_fakes as F  # noqa: E402

from lsvcr_dist.config import EvalConfig  # noqa: E402
from lsvcr_dist.evaluate import evaluate_run, iter_split  # noqa: E402
from lsvcr_dist.finetuned import build_finetune_model, load_text_table, save_best  # noqa: E402
from lsvcr_dist.serve import Recommender, time_requests  # noqa: E402


@pytest.fixture()
def served(tmp_path):
    F.make_prepared(tmp_path)
    cfg = F.ft_config(tmp_path)
    F.write_aligned(tmp_path, cfg)
    store = F.write_store(tmp_path / "embeddings" / "aligned", F.text_table())
    table = load_text_table(store)  # the fp16-rounded vectors the server reads
    models = {}
    for task in ("video", "comment"):
        torch.manual_seed(1)
        m, args = build_finetune_model(cfg, task, num_videos=F.V, text_table=table,
                                       align_final=tmp_path / "align" / "final", la=F.DIMS["LA"])
        save_best(tmp_path / "finetune" / task / "best", m, cfg, args, {"epoch": 1}, None, store)
        models[task] = m.eval()
    table_out = evaluate_run(EvalConfig(run_dir=str(tmp_path)))
    return tmp_path, models, table_out


def _request(batch, i):
    vh = [int(v) for v in batch["video_hist"][i] if v > 0]
    ch = [(int(v), [int(c) for c in cs if c > 0]) for v, cs in zip(batch["comment_hist_video"][i],
                                                                     batch["comment_hist_comments"][i]) if v > 0]
    return vh, ch


def test_evaluate_writes_metrics_and_exports(served):
    run, _, table = served
    on_disk = json.loads((run / "eval" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(table))
    for task in ("video", "comment"):
        assert set(on_disk[task]) >= {"recall@5", "recall@10", "ndcg@5", "ndcg@10", "mrr"}
        assert all(0.0 <= on_disk[task][k] <= 1.0 for k in ("recall@5", "ndcg@10", "mrr"))
        assert on_disk[task]["n"] == 12
        assert (run / "export" / task / "scorer.pt").is_file()
    assert on_disk["subsets"]["video"]["unseen_videos"]["n"] == 4  # rows 0, 3, 6, 9 have target_seen == 0
    assert "video_full" in on_disk and "| video |" in (run / "eval" / "metrics.md").read_text()
    pop = on_disk["baselines"]["popularity"]  # every run reports popularity on the same candidates
    assert pop["video"]["n"] == on_disk["video"]["n"] and pop["comment"]["n"] == on_disk["comment"]["n"]
    assert "Popularity baseline" in (run / "eval" / "metrics.md").read_text()
    assert on_disk["ids_discarded"]["video"]["unseen_videos"]["n"] == 4


def test_top_k_videos_matches_model(served):
    run, models, _ = served
    rec = Recommender.load(run)
    batch = next(iter_split(run / "data", "test", "video", 3))
    with torch.no_grad():
        ref = models["video"].video_scores(models["video"](batch))[:, 1:]  # [B, V]
    for i in range(3):
        got = rec.top_k_videos(*_request(batch, i), k=5)
        top = torch.topk(ref[i], 5)
        assert [v for v, _ in got] == [int(j) + 1 for j in top.indices]
        assert [s for _, s in got] == pytest.approx(top.values.tolist(), abs=1e-4)
    vh, ch = _request(batch, 0)
    seen = {v for v, _ in rec.top_k_videos(vh, ch, k=F.V, exclude_seen=True)[: F.V - len(set(vh))]}
    assert not seen & set(vh)
    with pytest.raises(ValueError, match=rf"video_hist\[0\]: video id 999 outside 1..{F.V}"):
        rec.top_k_videos([999], [])


def test_rank_comments_matches_model(served):
    run, models, _ = served
    rec = Recommender.load(run)
    batch = next(iter_split(run / "data", "test", "comment", 2))
    m = models["comment"]
    for i in range(2):
        cands = [int(c) for c in batch["cand_comments"][i] if c > 0]
        with torch.no_grad():
            ref = m.comment_scores(m(batch), batch["cand_comments"])[i, : len(cands)]
        got = rec.rank_comments(*_request(batch, i), int(batch["current_video"][i]), cands)
        order = torch.argsort(ref, descending=True, stable=True)
        assert [c for c, _ in got] == [cands[j] for j in order]
        assert sorted(s for _, s in got) == pytest.approx(sorted(ref.tolist()), abs=1e-4)
    with pytest.raises(ValueError, match="candidate comment id 0 outside"):
        rec.rank_comments([1], [], 2, [0, 5])
    lat = time_requests(lambda: rec.rank_comments([1, 2], [(3, [13])], 2, [7, 8, 9]), [()] * 8, warmup=2)
    assert lat["n"] == 8 and 0 < lat["p50_ms"] <= lat["p99_ms"]


def test_request_ids_and_k_are_validated(served):
    """Before: a negative comment id read another text's vector (-5 -> text id V - 5, a title), k=-3 raised a torch
    RuntimeError, float/str ids were truncated or coerced silently."""
    import numpy as np

    run, _, _ = served
    rec = Recommender.load(run)
    C = F.C
    bad = [
        (lambda: rec.top_k_videos([1], [(1, [-5])], k=3),
         rf"comment_hist\[0\] comments\[0\]: comment id -5 outside 1..{C}"),
        (lambda: rec.top_k_videos([1], [(1, [C + 1])], k=3), rf"comment id {C + 1} outside 1..{C}"),
        (lambda: rec.top_k_videos([1], k=-3), r"k must be a positive integer, got -3"),
        (lambda: rec.top_k_videos([1], k=0), r"k must be a positive integer, got 0"),
        (lambda: rec.top_k_videos([1], k=2.0), r"k must be a positive integer, got 2.0"),
        (lambda: rec.top_k_videos([1, 2.7]), r"video_hist\[1\]: video id must be an integer, got float 2.7"),
        (lambda: rec.top_k_videos(["3"]), r"video_hist\[0\]: video id must be an integer, got str '3'"),
        (lambda: rec.top_k_videos([True]), r"video_hist\[0\]: video id must be an integer, got bool True"),
        (lambda: rec.top_k_videos([-1] + [1] * 10, exclude_seen=True), r"video_hist\[0\]: video id -1 outside"),
        (lambda: rec.top_k_videos([1], [(2.0, [7])]), r"comment_hist\[0\] video: video id must be an integer"),
        (lambda: rec.top_k_videos([1], [(2, "7")]), r"comment_hist\[0\]: expected \(video_id, \[comment ids\]\)"),
        (lambda: rec.rank_comments([1], [], 2, [7, 8.5]), r"candidate_comment_ids\[1\]: candidate comment id must be"),
        (lambda: rec.rank_comments([1], [], -2, [7]), r"watched_video: video id -2 outside 1..30"),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):  # serve.RequestError
            call()
    # numpy integers are integers: same answer as Python ints
    assert rec.top_k_videos([np.int64(3), 4], [(np.int32(3), [np.int64(13)])], k=4) == rec.top_k_videos(
        [3, 4], [(3, [13])], k=4)


def test_exclude_seen_returns_only_unseen_videos(served):
    """Before: k = V with exclude_seen returned the seen videos too, with score -inf."""
    import math

    run, _, _ = served
    rec = Recommender.load(run)
    seen = [3, 4, 5, 4]
    got = rec.top_k_videos(seen, [], k=F.V, exclude_seen=True)
    assert len(got) == F.V - 3 and not {v for v, _ in got} & set(seen)
    assert all(math.isfinite(s) for _, s in got) and [s for _, s in got] == sorted((s for _, s in got), reverse=True)
    ranked = rec.top_k_videos(seen, [], k=F.V)  # the same scores, seen videos dropped
    assert got == [(v, s) for v, s in ranked if v not in seen]
    assert rec.top_k_videos(list(range(1, F.V + 1)), [], k=5, exclude_seen=True) == []


def test_moved_run_reads_its_own_store(served, tmp_path_factory):
    """Before: model_args.json / export.json held the absolute store path, so a moved run read the original store."""
    import shutil

    from lsvcr_dist.finetuned import load_finetuned

    run, models, _ = served
    args = json.loads((run / "finetune" / "video" / "best" / "model_args.json").read_text())
    assert args["text_store"] == "embeddings/aligned"
    expected = Recommender.load(run).top_k_videos([3, 4], [(3, [13])], k=5)
    moved = tmp_path_factory.mktemp("moved") / "run"
    shutil.copytree(run, moved)
    shutil.rmtree(run / "embeddings")  # the original store is gone: only the moved run's own copy can be read
    assert Recommender.load(moved).top_k_videos([3, 4], [(3, [13])], k=5) == expected
    model, _ = load_finetuned(moved / "finetune" / "video" / "best")
    assert torch.equal(model.text.all(), models["video"].text.all())
    table = evaluate_run(EvalConfig(run_dir=str(moved)))
    assert table["video"]["n"] == 12


def test_evaluate_refuses_zero_instances(tmp_path):
    """Before: n = 0 wrote eval/metrics.json with every metric 0.0 (rc 0)."""
    import pyarrow.parquet as pq

    F.make_prepared(tmp_path)
    test_shard = tmp_path / "data" / "parquet" / "test" / "part-00000.parquet"
    pq.write_table(pq.read_table(test_shard).slice(0, 0), test_shard)  # a test split with no rows
    cfg = F.ft_config(tmp_path)
    F.write_aligned(tmp_path, cfg)
    store = F.write_store(tmp_path / "embeddings" / "aligned", F.text_table())
    m, args = build_finetune_model(cfg, "video", num_videos=F.V, text_table=load_text_table(store),
                                   align_final=tmp_path / "align" / "final", la=F.DIMS["LA"])
    save_best(tmp_path / "finetune" / "video" / "best", m, cfg, args, {"epoch": 1}, None, store)
    for export in (False, True):
        with pytest.raises(RuntimeError, match=r"0 video instances evaluated on the 'test' split|the 'test' split "
                                                  r"has no video instances"):
            evaluate_run(EvalConfig(run_dir=str(tmp_path)), export=export)
        assert not (tmp_path / "eval" / "metrics.json").exists()
