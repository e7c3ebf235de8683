"""The alignment plot's chance lines: InfoNCE over a pool of N that learned nothing sits at ln N."""

from __future__ import annotations

import json
import math

from lsvcr_dist.plots import chance_levels, plot_align_losses


def test_chance_levels_from_the_logged_pool(tmp_path):
    rows = [{"step": s, "pool_size": 8, "loss": 3.0, "loss_lm": 1.0, "loss_sr": 2.0, "loss_ssc": 1.9,
             "loss_vcc": 0.1} for s in range(1, 6)]
    assert chance_levels(rows) == {"loss_sr": math.log(8), "loss_ssc": math.log(8), "loss_vcc": math.log(2)}
    # a run whose pool changed (resumed with other workers) gets no single ln(pool) line
    assert chance_levels(rows + [{"step": 6, "pool_size": 16}]) == {"loss_vcc": math.log(2)}
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    png = plot_align_losses(tmp_path / "m.jsonl", tmp_path / "a.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
