"""``ingest.epoch_draws``: one streamed ALIGN dataset per ComDiv draw, and the loop's epoch -> dataset mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _ray_order import preserve_order

from lsvcr_dist.config import ConfigError, load_config
from lsvcr_dist.train.align_run import build_align_datasets
from lsvcr_dist.train.loop import dataset_name


def test_dataset_name_cycles_through_draws():
    assert [dataset_name(e, 1) for e in range(3)] == ["train"] * 3
    assert [dataset_name(e, 3) for e in range(7)] == ["train", "train_draw1", "train_draw2", "train",
                                                       "train_draw1", "train_draw2", "train"]
    with pytest.raises(ConfigError, match="ingest.epoch_draws"):  # the config refuses 0 draws
        load_config(None, "align", ["ingest.epoch_draws=0"])


@pytest.mark.ray
def test_each_draw_streams_the_same_rows_with_new_comdiv_draws(tiny_prepared):
    """Two draws over 24 train rows: identical rows and SR ids outside ComDiv, and different diversified comments
    (ComDiv on with certainty: sample and record probabilities 1) in at least one row; draw 0 is the dataset a
    single-draw run streams."""
    from lsvcr_dist.data.ingest import read_instances

    run_dir, cfg_path, _ = tiny_prepared
    p1 = ["comdiv.video_sample_p=1", "comdiv.video_item_p=1", "comdiv.comment_sample_p=1", "comdiv.comment_record_p=1"]
    cfg = load_config(cfg_path, "align", [f"run_dir={run_dir}", "ingest.epoch_draws=2", *p1])
    with preserve_order():
        rows = read_instances(Path(run_dir) / "data", "train", validate=False).limit(24).materialize()  # read once
        dss = build_align_datasets(cfg, rows)
        assert list(dss) == ["train", "train_draw1"]
        single = build_align_datasets(load_config(cfg_path, "align", [f"run_dir={run_dir}", *p1]), rows)
        streams = {**dss, "single": single["train"]}
        got = {k: next(iter(ds.iter_batches(batch_size=24, batch_format="numpy"))) for k, ds in streams.items()}
    a, b = got["train"], got["train_draw1"]
    for key in ("task", "video_hist", "comment_hist_video", "current_video", "target_video"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for key in a:
        np.testing.assert_array_equal(a[key], got["single"][key], err_msg=key)
    assert not np.array_equal(a["video_hist_comment"], b["video_hist_comment"])
    assert not np.array_equal(a["prompt_input_ids"], b["prompt_input_ids"])
