"""Ray integration: jobs/finetune.py on the tiny prepared data, 2 DDP workers, a few epochs.

The text store is a stand-in (random vectors written with the real EmbeddingWriter) so this test does not need the
LLM encode or align stages; ``init=scratch`` is the 'w/o Alignment' path, which reads the base store. The model must
beat its own untrained validation NDCG@10 (epoch 0 line of metrics.jsonl).
"""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_finetune_job_two_workers_improves_val_ndcg(tiny_prepared):
    import finetune  # jobs/finetune.py (tests/conftest.py puts jobs/ on sys.path)

    from lsvcr_dist.data.manifest import read_manifest
    from lsvcr_dist.embeddings import EmbeddingStore, EmbeddingWriter

    run_dir, cfg_path, overrides = tiny_prepared
    man = read_manifest(run_dir / "data")
    v, c = int(man["num_videos"]), int(man["num_comments"])
    store = run_dir / "embeddings" / "base"
    w = EmbeddingWriter(store, 16, v, c, shard_rows=4096, meta={"projected": False, "which": "base"})
    w.write(np.arange(1, v + c + 1), np.random.default_rng(0).standard_normal((v + c, 16)).astype(np.float32))
    w.close()
    assert EmbeddingStore.open(store).count == v + c

    rc = finetune.main(["--config", str(cfg_path), *overrides, "init=scratch", "tasks=[video]", "max_epochs=2",
                        "patience=5", "batch_size=64", "scaling.num_workers=2", "optim.lr=3e-3"])
    assert rc == 0
    lines = [json.loads(x) for x in (run_dir / "finetune" / "video" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2]
    untrained = lines[0]["val"]["ndcg@10"]
    best = max(x["val"]["ndcg@10"] for x in lines[1:])
    assert best > untrained + 0.02, (untrained, best)
    assert all(x["steps"] > 0 and x["loss"] > 0 for x in lines[1:])
    meta = json.loads((run_dir / "finetune" / "video" / "best" / "meta.json").read_text())
    assert meta["val"]["ndcg@10"] == pytest.approx(best)
    assert (run_dir / "finetune" / "video" / "best" / "COMPLETE").is_file()
