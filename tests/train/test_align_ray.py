"""Alignment on real Ray Train + DeepSpeed (CPU, gloo) over the streamed tiny data.

Runs are kept to a few steps on a row-limited dataset (``limit``) so several epochs revisit the same rows: the loss
must fall, every LoRA and SR tensor must move and the frozen base must not. Dropout stays on except in the
1-worker vs 2-worker comparison. Resume is exact for 2 workers because the dataset split is deterministic
(``ingest_data_config(preserve_order=True)``) and dropout / randomized positions are reseeded per micro-step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _ray_order import preserve_order
from safetensors.torch import load_file

from lsvcr_dist.config import load_config
from lsvcr_dist.train.align_run import run_align
from lsvcr_dist.train.checkpoint import COMPLETE, EXPORT_FILES, find_latest_complete

pytestmark = pytest.mark.ray

EXACT = ["sr.dropout=0", "lora.dropout=0", "comdiv.enabled=false", "rand_pos=false"]
CONSTANT_LR = ["optim.schedule=constant", "optim.warmup_ratio=0"]


def _cfg(data_from, cfg_path, run_dir, *overrides):
    """Config of a run in its own ``run_dir`` whose ``data`` and base store link to the session's tiny run."""
    run_dir = Path(run_dir)
    (run_dir / "embeddings").mkdir(parents=True, exist_ok=True)
    if not (run_dir / "data").exists():
        (run_dir / "data").symlink_to(Path(data_from) / "data")
        (run_dir / "embeddings" / "base").symlink_to(Path(data_from) / "embeddings" / "base")
    return load_config(cfg_path, "align", [f"run_dir={run_dir}", "global_batch=8", "log_every=1", *overrides])


def _rows(run_dir, n):
    """n INSTANCE rows, half per task, each with >= 2 records in both histories, so every SR module (F_c, the
    comment encoder's attention, cross-fusion) gets a gradient; deterministic order (preserve_order)."""
    import pyarrow.compute as pc

    from lsvcr_dist.data.ingest import read_instances

    def keep(task):
        def f(t):
            ok = pc.and_(pc.equal(t["task"], task), pc.greater_equal(t["video_hist_len"], 2))
            return t.filter(pc.and_(ok, pc.greater_equal(t["comment_hist_len"], 2)))
        return f

    ds = read_instances(Path(run_dir) / "data", "train", validate=False)
    parts = [ds.map_batches(keep(t), batch_format="pyarrow").limit(n // 2) for t in (0, 1)]
    # Materialized once, in order: left lazy, every epoch re-reads and re-filters the whole train split (about 15 s
    # an epoch here, and these runs take one step per epoch).
    with preserve_order():
        return parts[0].union(parts[1]).materialize()


def _lines(run_dir, name="metrics.jsonl"):
    p = Path(run_dir) / "align" / name
    return {d["step"]: d for d in (json.loads(x) for x in p.read_text().splitlines() if x.strip())}


def _initial_trainables(cfg, run_dir):
    from peft import get_peft_model_state_dict

    from lsvcr_dist.data.manifest import read_manifest
    from lsvcr_dist.models.align_model import build_align_model

    _, model = build_align_model(cfg, read_manifest(Path(run_dir) / "data")["num_videos"])
    return get_peft_model_state_dict(model.llm.lm), model.sr.state_dict()


def _check_moved(cfg, run_dir):
    """Every LoRA tensor and every SR tensor changed; the frozen base fingerprint did not."""
    lora0, sr0 = _initial_trainables(cfg, run_dir)
    final = Path(run_dir) / "align" / "final"
    lora1 = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    assert set(lora1) == set(lora0) and len(lora1) == 2 * 6 * cfg.llm.num_layers
    for k, v in lora1.items():
        assert not torch.equal(v, lora0[k].float()), f"LoRA tensor {k} did not change"
    sr1 = load_file(str(final / "sr.safetensors"))
    assert set(sr1) == set(sr0)
    for k, v in sr1.items():
        assert not torch.equal(v, sr0[k].float()), f"SR tensor {k} did not change"
    summary = json.loads((final / "train_summary.json").read_text())
    assert summary["base_fingerprint_end"] == summary["base_fingerprint_start"]
    assert summary["base_fingerprint_start"][1] > 0


@pytest.mark.timeout(1200)
def test_one_worker_equals_two_and_resume_by_new_submission(tiny_encoded, tmp_path):
    """First-step loss: 1 worker x 8 rows == 2 workers x 4 rows (the dataset holds just those 8 rows, so both runs
    see them; the loss is invariant to their order: pool 8 both times, LM loss token-weighted). Then a 2-worker
    ZeRO-2 run of 6 steps loses its step-6 checkpoint and export (deleted, as after a disk problem) and is
    submitted again: the new submission moves Ray's record of the deleted checkpoint aside, resumes from step 3 and
    recomputes steps 4-6 with the losses the first run logged for them."""
    data, cfg_path, _ = tiny_encoded
    one = _cfg(data, cfg_path, tmp_path / "one", "scaling.num_workers=1", "deepspeed.micro_batch=8", "max_steps=1",
               *EXACT)
    assert run_align(one, _rows(one.run_dir, 8)).error is None
    two = _cfg(data, cfg_path, tmp_path / "two", "scaling.num_workers=2", "deepspeed.micro_batch=4", "max_steps=6",
               "checkpoint.every_steps=3", *EXACT, *CONSTANT_LR)
    assert run_align(two, _rows(two.run_dir, 8)).error is None
    m1, m2 = _lines(tmp_path / "one"), _lines(tmp_path / "two")
    assert m1[1]["pool_size"] == 8 and m2[1]["pool_size"] == 8 and m2[1]["world_size"] == 2
    for k in ("loss", "loss_lm", "loss_sr", "loss_ssc", "loss_vcc"):
        assert m1[1][k] == pytest.approx(m2[1][k], abs=1e-5), k
    # 8 rows = 1 step per epoch: 6 epochs over the same rows, the loss must fall
    assert sorted(m2) == list(range(1, 7)) and m2[6]["epoch"] == 5
    assert m2[5]["loss"] + m2[6]["loss"] < m2[1]["loss"] + m2[2]["loss"]
    _check_moved(two, tmp_path / "two")
    align = tmp_path / "two" / "align"
    shutil.rmtree(align / "checkpoints" / "step_00000006")
    shutil.rmtree(align / "final")
    assert find_latest_complete(align).name == "step_00000003"
    said = []
    assert run_align(two, _rows(two.run_dir, 8), log=said.append).error is None  # a NEW fit on the same run_dir
    assert any("names step_00000006, which no longer exist" in x for x in said), said
    assert (align / "checkpoints" / "checkpoint_manager_snapshot.json.stale-1").is_file()
    again, replaced = _lines(tmp_path / "two"), _lines(tmp_path / "two", "metrics.replaced.jsonl")
    assert sorted(again) == list(range(1, 7)) and sorted(replaced) == [4, 5, 6]
    for s in range(4, 7):  # recomputed from the step-3 checkpoint: the same curve
        assert again[s]["loss"] == pytest.approx(m2[s]["loss"], abs=1e-5), s
    assert (align / "final" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.timeout(1200)
def test_zero3_fault_restart_checkpoint_files(tiny_encoded, tmp_path):
    """2 workers, ZeRO-3, dropout and randomized positions on; rank 1 fails at step 5, FailureConfig restarts from
    the step-3 checkpoint, the run completes with the same step-4 loss as the failed attempt logged."""
    data, cfg_path, _ = tiny_encoded
    cfg = _cfg(data, cfg_path, tmp_path, "scaling.num_workers=2", "deepspeed.micro_batch=4", "deepspeed.zero_stage=3",
               "max_steps=8", "checkpoint.every_steps=3", "checkpoint.keep_last=2", "checkpoint.max_failures=1")
    result = run_align(cfg, _rows(cfg.run_dir, 16), fault_inject="step:5")
    assert result.error is None
    assert (tmp_path / "align" / ".fault_injected_step_5").is_file()  # the fault did fire once
    m = _lines(tmp_path)
    assert sorted(m) == list(range(1, 9))
    replaced = _lines(tmp_path, "metrics.replaced.jsonl")
    # rank 0 of the failed attempt logged steps 4 and 5 (rank 1 raised after step 5's update) past the step-3
    # checkpoint; the restarted attempt recomputes them from that checkpoint: same rows, same draws, same losses
    assert sorted(replaced) == [4, 5]
    for s in (4, 5):
        assert replaced[s]["loss"] == pytest.approx(m[s]["loss"], abs=1e-5), s
    assert m[7]["loss"] + m[8]["loss"] < m[1]["loss"] + m[2]["loss"]
    _check_moved(cfg, tmp_path)
    # keep_last=2 keeps steps 6 and 8; the latest holds exactly the promised files
    ckpts = sorted(p.name for p in (tmp_path / "align" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000006", "step_00000008"]
    latest = tmp_path / "align" / "checkpoints" / "step_00000008"
    files = {str(p.relative_to(latest)) for p in latest.rglob("*") if p.is_file()}
    ds = {f"ds/step_00000008/zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in (0, 1) for k in ("model", "optim")}
    assert files == set(EXPORT_FILES) | {"state.json", COMPLETE, "ds/latest", "ds/zero_to_fp32.py",
                                         "ds/zero_to_torch.py"} | ds
    state = json.loads((latest / "state.json").read_text())
    assert (state["step"], state["epoch"], state["world_size"]) == (8, 3, 2)
    final = {str(p.relative_to(tmp_path / "align" / "final"))
             for p in (tmp_path / "align" / "final").rglob("*") if p.is_file()}
    assert final == set(EXPORT_FILES) | {"train_summary.json"}
    import yaml

    saved = yaml.safe_load((tmp_path / "align" / "final" / "config.yaml").read_text())
    assert saved["deepspeed"]["zero_stage"] == 3 and saved["max_steps"] == 8
