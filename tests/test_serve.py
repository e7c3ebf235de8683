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
    with pytest.raises(ValueError, match=f"video_hist: video id 999 outside 1..{F.V}"):
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
