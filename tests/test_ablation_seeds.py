"""Multi-seed ablations: seed folders, shifted training seeds, shared data, and the mean ± std table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"


def _res(v: float, c: float) -> dict:
    return {"video": {"recall@10": 2 * v, "ndcg@10": v}, "comment": {"recall@10": 2 * c, "ndcg@10": c}}


def test_mean_std_hand_worked():
    from lsvcr_dist.ablation_seeds import mean_std

    m, s = mean_std([0.2, 0.4, 0.6])  # deviations -0.2, 0, 0.2 -> variance 0.08 / 2 = 0.04
    assert m == pytest.approx(0.4) and s == pytest.approx(0.2)
    assert mean_std([0.3]) == (0.3, 0.0)


def test_run_seeds_shifts_training_seeds_on_shared_data(tmp_path, monkeypatch):
    import lsvcr_dist.ablation_seeds as S

    for rel in ("raw", "data", "embeddings/base"):
        (tmp_path / rel).mkdir(parents=True)
    calls = []

    def fake_main(config, overrides, runner, variants, log):
        calls.append(("main", overrides, None, None))
        return {"LSVCR": {**_res(0.5, 0.2), "baselines": {"popularity": _res(0.1, 0.05)}}, "SASRec": _res(0.4, 0.0)}

    def fake_set(config, base, runner, variants, main, extra, stages, log):
        calls.append(("seed", base, main, extra, [s.name for s in stages]))
        k = int(main.name[len("seed"):])
        return {"LSVCR": {**_res(0.5 + 0.1 * k, 0.2), "baselines": {"popularity": _res(0.1, 0.05)}},
                "SASRec": _res(0.4, 0.0)}

    monkeypatch.setattr(S, "run_ablations", fake_main)
    monkeypatch.setattr(S, "run_variant_set", fake_set)
    summary = S.run_seeds(TINY, [f"run_dir={tmp_path}", "finetune.max_epochs=2"], runner=None, seeds=3,
                          log=lambda s: None)
    assert [c[0] for c in calls] == ["main", "seed", "seed"]
    _, base, sub, extra, stages = calls[1]
    assert sub == tmp_path.resolve() / "seeds" / "seed1" and base == ["finetune.max_epochs=2"]
    assert extra == ["align.seed=2025", "finetune.seed=2025"] and calls[2][3] == ["align.seed=2026", "finetune.seed=2026"]
    assert stages == ["align", "encode_aligned", "finetune", "evaluate"]  # no data stage reruns
    for rel in ("raw", "data", "embeddings/base"):
        assert (sub / rel).is_symlink() and (sub / rel).resolve() == (tmp_path / rel).resolve()
    # LSVCR video NDCG@10 0.5, 0.6, 0.7 -> mean 0.6, sample std 0.1
    mean, std, n = summary["LSVCR"]["video"]["ndcg@10"]
    assert (mean, n) == (pytest.approx(0.6), 3) and std == pytest.approx(0.1)
    assert summary["Popularity"]["comment"]["ndcg@10"] == [pytest.approx(0.05), pytest.approx(0.0, abs=1e-12), 3]
    md = (tmp_path / "ablations" / "seeds.md").read_text()
    assert "| LSVCR | 1.2000 ± 0.2000 | 0.6000 ± 0.1000 | 0.4000 ± 0.0000 | 0.2000 ± 0.0000 |" in md
    assert md.index("| Popularity") < md.index("| SASRec") < md.index("| LSVCR")
    saved = json.loads((tmp_path / "ablations" / "seeds.json").read_text())
    assert len(saved["runs"]) == 3 and math.isclose(saved["summary"]["SASRec"]["video"]["ndcg@10"][0], 0.4)


def test_seed_runs_refuse_missing_shared_data(tmp_path, monkeypatch):
    import lsvcr_dist.ablation_seeds as S

    with pytest.raises(ValueError, match="--seeds must be >= 1"):
        S.run_seeds(TINY, [f"run_dir={tmp_path}"], runner=None, seeds=0)
    monkeypatch.setattr(S, "run_ablations", lambda *a: {"LSVCR": _res(0.5, 0.2)})  # seed 0 ran, left no data
    with pytest.raises(FileNotFoundError, match="raw: needed by the seed runs"):
        S.run_seeds(TINY, [f"run_dir={tmp_path}"], runner=None, seeds=2, variants=())
