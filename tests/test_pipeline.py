"""Pipeline skip/marker logic with fake stages (no real jobs run here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lsvcr_dist.config import load_config, overrides_for
from lsvcr_dist.stages import Stage, StageError, is_done, marker_path, run_pipeline, select_stages, stage_hash

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"


def _exists(rel: str):
    def check(run_dir: Path, cfgs: dict):
        return None if (run_dir / rel).is_file() else f"{run_dir / rel} missing"
    return check


STAGES = [
    Stage("one", "one.py", "generate", _exists("a/out.txt")),
    Stage("two", "two.py", "prepare", _exists("b/out.txt")),
    Stage("three", "three.py", "finetune", _exists("c/out.txt")),
]
OUT = {"one": "a/out.txt", "two": "b/out.txt", "three": "c/out.txt"}


class FakeRunner:
    """Records the stages run; writes each stage's output unless told to fail or to leave it out."""

    def __init__(self, run_dir: Path, fail: str = "", skip_output: str = ""):
        self.run_dir, self.fail, self.skip_output, self.calls = run_dir, fail, skip_output, []

    def __call__(self, stage: Stage, argv: list[str]) -> int:
        self.calls.append((stage.name, argv))
        if stage.name == self.fail:
            return 3
        if stage.name != self.skip_output:
            out = self.run_dir / OUT[stage.name]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("ok")
        return 0


def _run(tmp_path, overrides=(), **kw):
    runner = FakeRunner(tmp_path, **kw)
    res = run_pipeline(TINY, [f"run_dir={tmp_path}", *overrides], runner=runner, stages=STAGES, log=lambda s: None)
    return res, runner


def test_second_run_skips_everything(tmp_path):
    res, r1 = _run(tmp_path)
    assert res == [("one", "ran"), ("two", "ran"), ("three", "ran")]
    assert [c[0] for c in r1.calls] == ["one", "two", "three"]
    assert r1.calls[0][1][:2] == ["--config", str(TINY)] and f"run_dir={tmp_path}" in r1.calls[0][1]
    res, r2 = _run(tmp_path)
    assert res == [("one", "skipped"), ("two", "skipped"), ("three", "skipped")] and r2.calls == []
    rec = json.loads(marker_path(tmp_path, "two").read_text())
    assert rec["stage"] == "two" and len(rec["hash"]) == 64


def test_incomplete_output_is_rerun(tmp_path):
    _run(tmp_path)
    (tmp_path / "b" / "out.txt").unlink()  # stage two's output damaged after it completed
    res, r = _run(tmp_path)
    assert res == [("one", "skipped"), ("two", "ran"), ("three", "skipped")]
    assert [c[0] for c in r.calls] == ["two"]


def test_config_change_reruns_stage_and_downstream(tmp_path):
    _run(tmp_path)
    res, r = _run(tmp_path, ["prepare.shard_rows=123"])
    assert res == [("one", "skipped"), ("two", "ran"), ("three", "ran")]
    # a fine-tune-only override leaves generate and prepare alone
    res, r = _run(tmp_path, ["prepare.shard_rows=123", "finetune.max_epochs=2"])
    assert res == [("one", "skipped"), ("two", "skipped"), ("three", "ran")]


def test_overrides_of_one_stage_reach_only_the_stages_that_have_them(tmp_path):
    """`llm.kind` and `contrastive_pool` are not generate/prepare keys: the pipeline loads every stage's config with
    that stage's overrides only (it used to fail with "unknown config key ... for GenerateConfig")."""
    res, r = _run(tmp_path, ["llm.kind=tiny_glm", "contrastive_pool=global", "finetune.max_epochs=2"])
    assert res == [("one", "ran"), ("two", "ran"), ("three", "ran")]
    argv = dict(r.calls)
    assert "contrastive_pool=global" not in argv["one"] and "finetune.max_epochs=2" in argv["three"]


def test_failed_job_leaves_no_marker_and_is_rerun(tmp_path):
    with pytest.raises(StageError, match=r"stage 'two' \(jobs/two.py\) failed with exit code 3"):
        _run(tmp_path, fail="two")
    assert marker_path(tmp_path, "one").is_file() and not marker_path(tmp_path, "two").exists()
    res, r = _run(tmp_path)
    assert res == [("one", "skipped"), ("two", "ran"), ("three", "ran")]


def test_job_that_exits_0_with_missing_output_fails(tmp_path):
    with pytest.raises(StageError, match=r"stage 'three' finished but its output is incomplete: .*c/out.txt missing"):
        _run(tmp_path, skip_output="three")
    assert not marker_path(tmp_path, "three").exists()


def test_stale_marker_removed_before_rerun(tmp_path):
    _run(tmp_path)
    (tmp_path / "c" / "out.txt").unlink()
    with pytest.raises(StageError):
        _run(tmp_path, fail="three")  # the rerun fails: the old marker must not survive
    assert not marker_path(tmp_path, "three").exists()
    cfgs = {"finetune": load_config(TINY, "finetune", [f"run_dir={tmp_path}"])}
    digest = stage_hash(TINY, STAGES[2], [f"run_dir={tmp_path}"], "x")
    assert is_done(tmp_path, STAGES[2], digest, cfgs) == (False, "no completion marker")


def test_stage_selection_and_override_routing(tmp_path):
    base = {s: load_config(TINY, s, [f"run_dir={tmp_path}"]) for s in ("generate", "prepare", "finetune")}
    names = [s.name for s in select_stages(base)]
    assert names == ["generate", "prepare", "encode_base", "align", "encode_aligned", "finetune", "evaluate"]
    scratch = {**base, "finetune": load_config(TINY, "finetune", ["init=scratch"])}
    assert "align" not in [s.name for s in select_stages(scratch)]
    imported = {**base, "prepare": load_config(TINY, "prepare", ["raw_dir=/x"])}
    assert [s.name for s in select_stages(imported)][0] == "prepare"
    assert overrides_for("generate", ["run_dir=x", "max_epochs=3", "finetune.patience=1", "num_users=5"]) == [
        "run_dir=x", "finetune.patience=1", "num_users=5"]


def test_jobs_runner_runs_each_stage_as_its_job_script(tmp_path):
    """The library knows no path into jobs/: jobs/pipeline.py hands run_pipeline its runner, which starts the
    stage's job script as its own process (here the real generate stage, then a skip on the second run)."""
    import pipeline as job  # jobs/pipeline.py
    from lsvcr_dist.stages import STAGES as PIPELINE_STAGES

    gen = [s for s in PIPELINE_STAGES if s.name == "generate"]
    args = (TINY, [f"run_dir={tmp_path}", "generate.num_users=50", "generate.num_video_inter=400"])
    assert run_pipeline(*args, runner=job.run_stage, stages=gen, log=lambda s: None) == [("generate", "ran")]
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["comment_inter", "comments", "generated.json",
                                                                     "video_inter", "videos"]
    assert run_pipeline(*args, runner=job.run_stage, stages=gen, log=lambda s: None) == [("generate", "skipped")]


# ------------------------------------------------------------------------------------------ ablations harness
def test_ablation_variants_rerun_only_what_they_change(tmp_path):
    from lsvcr_dist.ablations import ALL, link_shared, stages_for

    by = {v.slug: v for v in ALL}
    assert [s.name for s in stages_for(by["wo_ssc"])] == ["align", "encode_aligned", "finetune", "evaluate"]
    assert [s.name for s in stages_for(by["wo_randposi"])][0] == "align"
    assert [s.name for s in stages_for(by["wo_reg"])] == ["finetune", "evaluate"]
    assert [s.name for s in stages_for(by["wo_alignment"])] == ["finetune", "evaluate"]
    assert [s.name for s in stages_for(by["sasrec"])] == ["finetune", "evaluate"]
    for rel in ("raw", "data", "embeddings/base", "align", "embeddings/aligned"):
        (tmp_path / rel).mkdir(parents=True)
    sub = tmp_path / "ablations" / "wo_reg"
    link_shared(tmp_path, sub, by["wo_reg"])
    assert (sub / "align").resolve() == (tmp_path / "align").resolve() and (sub / "embeddings/aligned").is_symlink()
    sub2 = tmp_path / "ablations" / "wo_ssc"
    link_shared(tmp_path, sub2, by["wo_ssc"])
    assert (sub2 / "data").is_symlink() and not (sub2 / "align").exists()  # realigned, never the main alignment
    (tmp_path / "data").rename(tmp_path / "data_gone")
    with pytest.raises(FileNotFoundError, match="needed by ablation 'w/o L_VCC'"):
        link_shared(tmp_path, tmp_path / "ablations" / "wo_vcc", by["wo_vcc"])


def test_ablation_tables(tmp_path):
    from lsvcr_dist.ablations import table4_markdown, tables23_markdown, write_tables

    m = {"recall@5": 0.1, "recall@10": 0.2, "ndcg@5": 0.05, "ndcg@10": 0.125, "mrr": 0.3}
    res = {"LSVCR": {"video": m, "comment": m, "baselines": {"popularity": {"video": {**m, "ndcg@5": 0.04}}}},
           "w/o L_REG": {"video": {**m, "recall@10": 0.15}},
           "SASRec": {"video": {**m, "mrr": 0.25}}}
    t4 = table4_markdown(res)
    assert "| LSVCR | 0.2000 | 0.1250 | 0.2000 | 0.1250 |" in t4
    assert "| w/o L_REG | 0.1500 | 0.1250 | - | - |" in t4 and "w/o L_SSC" not in t4
    t23 = tables23_markdown(res)
    assert "| SASRec | 0.1000 | 0.2000 | 0.0500 | 0.1250 | 0.2500 |" in t23
    assert "| Popularity | 0.1000 | 0.2000 | 0.0400 | 0.1250 | 0.3000 |" in t23.split("## Comment")[0]
    write_tables(res, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == res
    assert (tmp_path / "table4.md").read_text() == t4


def test_figure4_table_reads_each_row_from_its_own_block():
    from lsvcr_dist.ablations import figure4_markdown

    def sub(v, u):
        return {"unseen_videos": {"ndcg@10": v, "n": 10}, "unseen_users": {"ndcg@10": u, "n": 48}}

    res = {"LSVCR": {"subsets": {"video": sub(0.0, 0.4)}, "ids_discarded": {"video": {"all": {}, **sub(0.03, 0.09)}},
                     "baselines": {"popularity": {"subsets": {"video": sub(0.0, 0.2)}}}},
           "LSVCR w/o IDs": {"subsets": {"video": sub(0.05, 0.12)}},
           "SASRec": {"subsets": {"video": sub(0.01, 0.45)}, "ids_discarded": {"video": {"unsupported": "ids only"}}}}
    md = figure4_markdown(res)
    assert "| LSVCR, trained without IDs (public code's disable_id) | 0.0500 (10) | 0.1200 (48) | - | - |" in md
    assert "| LSVCR, IDs discarded at scoring | 0.0300 (10) | 0.0900 (48) | - | - |" in md
    assert "| LSVCR, with IDs | 0.0000 (10) | 0.4000 (48) | - | - |" in md
    assert "| Popularity, with IDs | 0.0000 (10) | 0.2000 (48) | - | - |" in md
    assert "SASRec, with IDs" in md and "DSSM" not in md  # absent runs leave no row


def test_plots_written_from_run_logs(tmp_path):
    from lsvcr_dist.plots import plot_run, read_jsonl

    (tmp_path / "align").mkdir()
    (tmp_path / "align" / "metrics.jsonl").write_text("\n".join(json.dumps(
        {"step": s, "loss": 5 - s * 0.1, "loss_lm": 3.0, "loss_sr": 1.0, "loss_ssc": 0.5, "loss_vcc": 0.6})
        for s in range(1, 11)))
    for task in ("video", "comment"):
        d = tmp_path / "finetune" / task
        d.mkdir(parents=True)
        d.joinpath("metrics.jsonl").write_text("\n".join(json.dumps(
            {"epoch": e, "loss": None if e == 0 else 5.0 / e, "val": {"ndcg@10": 0.05 + 0.1 * e}}) for e in range(3)))
    m = {"recall@5": 0.1, "recall@10": 0.2, "ndcg@5": 0.05, "ndcg@10": 0.125, "mrr": 0.3}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"video": m, "comment": m}))
    out = plot_run(tmp_path)
    for name in ("align_losses", "finetune_curves", "metrics"):
        png = Path(out[name])
        assert png.parent == tmp_path / "eval" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 5000
    (tmp_path / "align" / "metrics.jsonl").write_text('{"step": 1}\n{broken\n')
    with pytest.raises(ValueError, match=r"align/metrics.jsonl:2: not JSON"):
        read_jsonl(tmp_path / "align" / "metrics.jsonl")
    assert plot_run(tmp_path / "nothing")["metrics"].startswith("skipped:")
