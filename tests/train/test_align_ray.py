"""Alignment on real Ray Train + DeepSpeed (CPU, gloo) over the streamed tiny data.

Runs are kept to a few steps on a row-limited dataset (``limit``) so several epochs revisit the same rows: the loss
must fall, every LoRA and SR tensor must move and the frozen base must not. Dropout is off here so that 1 worker
and 2 workers compare exactly; resume is exact for 2 workers because the dataset split is deterministic
(``ingest_data_config(preserve_order=True)``) and dropout / randomized positions are reseeded per micro-step, which
``tests/test_multinode.py`` checks with dropout and randomized positions on.
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


def _records(run_dir, name="metrics.jsonl"):
    """The lines of ``align/<name>`` in file order (``metrics.replaced.jsonl``: in the order restarts moved them)."""
    p = Path(run_dir) / "align" / name
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def _lines(run_dir):
    """``metrics.jsonl`` by step."""
    return {d["step"]: d for d in _records(run_dir)}


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


@pytest.mark.timeout(1500)
def test_one_worker_equals_two_fault_restart_and_resume_by_new_submission(tiny_encoded, tmp_path):
    """First-step loss: 1 worker x 8 rows == 2 workers x 4 rows (the dataset holds just those 8 rows, so both runs
    see them; the loss is invariant to their order: pool 8 both times, LM loss token-weighted). The 2-worker run is
    ZeRO-3 and its rank 1 raises at step 5: the retry resumes from the step-4 checkpoint and recomputes step 5 with
    the loss the failed attempt logged; keep_last=2 leaves steps 4 and 6 with exactly the promised files. Then the
    step-6 checkpoint and the export are deleted (as after a disk problem) and the run is submitted again: the new
    submission moves Ray's record of the deleted checkpoint aside, resumes from step 4 and recomputes steps 5-6."""
    data, cfg_path, _ = tiny_encoded
    one = _cfg(data, cfg_path, tmp_path / "one", "scaling.num_workers=1", "deepspeed.micro_batch=8", "max_steps=1",
               *EXACT)
    assert run_align(one, _rows(one.run_dir, 8)).error is None
    two = _cfg(data, cfg_path, tmp_path / "two", "scaling.num_workers=2", "deepspeed.micro_batch=4", "max_steps=6",
               "deepspeed.zero_stage=3", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
               "checkpoint.max_failures=1", *EXACT, *CONSTANT_LR)
    assert run_align(two, _rows(two.run_dir, 8), fault_inject="step:5").error is None
    align = tmp_path / "two" / "align"
    assert (align / ".fault_injected_step_5").is_file()  # the fault did fire once
    m1, m2 = _lines(tmp_path / "one"), _lines(tmp_path / "two")
    assert m1[1]["pool_size"] == 8 and m2[1]["pool_size"] == 8 and m2[1]["world_size"] == 2
    for k in ("loss", "loss_lm", "loss_sr", "loss_ssc", "loss_vcc"):
        assert m1[1][k] == pytest.approx(m2[1][k], abs=1e-5), k
    # 8 rows = 1 step per epoch: 6 epochs over the same rows, the loss must fall
    assert sorted(m2) == list(range(1, 7)) and m2[6]["epoch"] == 5
    assert m2[5]["loss"] + m2[6]["loss"] < m2[1]["loss"] + m2[2]["loss"]
    # rank 0 of the failed attempt logged step 5 (rank 1 raised after its update) past the step-4 checkpoint; the
    # retry recomputed it from that checkpoint: same rows, same draws, same loss
    failed = _records(tmp_path / "two", "metrics.replaced.jsonl")
    assert [d["step"] for d in failed] == [5] and failed[0]["loss"] == pytest.approx(m2[5]["loss"], abs=1e-5)
    _check_moved(two, tmp_path / "two")
    _check_zero3_files(align, step=6, epoch=5, max_steps=6)
    shutil.rmtree(align / "checkpoints" / "step_00000006")
    shutil.rmtree(align / "final")
    assert find_latest_complete(align).name == "step_00000004"
    said = []
    assert run_align(two, _rows(two.run_dir, 8), log=said.append).error is None  # a NEW fit on the same run_dir
    assert any("names step_00000006, which no longer exist" in x for x in said), said
    assert (align / "checkpoints" / "checkpoint_manager_snapshot.json.stale-1").is_file()
    again, replaced = _lines(tmp_path / "two"), _records(tmp_path / "two", "metrics.replaced.jsonl")
    # after the fault's step 5: the first run's steps 5-6, moved aside by the new submission
    assert sorted(again) == list(range(1, 7)) and [d["step"] for d in replaced] == [5, 5, 6]
    for s, moved in zip((5, 6), replaced[1:]):  # recomputed from the step-4 checkpoint: the same curve
        assert again[s]["loss"] == pytest.approx(m2[s]["loss"], abs=1e-5), s
        assert moved["loss"] == pytest.approx(m2[s]["loss"], abs=1e-5), s
    assert (align / "final" / "adapter" / "adapter_model.safetensors").is_file()


def _check_zero3_files(align, step, epoch, max_steps):
    """keep_last=2: the two newest checkpoints remain; the newest holds exactly the promised files (exports, state,
    marker, both ranks' ZeRO-3 shards); the final export holds the exports, the summary and the run's config."""
    import yaml

    ckpts = sorted(p.name for p in (align / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{step - 2:08d}", f"step_{step:08d}"]
    latest = align / "checkpoints" / f"step_{step:08d}"
    files = {str(p.relative_to(latest)) for p in latest.rglob("*") if p.is_file()}
    ds = {f"ds/step_{step:08d}/zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in (0, 1) for k in ("model", "optim")}
    assert files == set(EXPORT_FILES) | {"state.json", COMPLETE, "ds/latest", "ds/zero_to_fp32.py",
                                         "ds/zero_to_torch.py"} | ds
    state = json.loads((latest / "state.json").read_text())
    assert (state["step"], state["epoch"], state["world_size"]) == (step, epoch, 2)
    final = {str(p.relative_to(align / "final")) for p in (align / "final").rglob("*") if p.is_file()}
    assert final == set(EXPORT_FILES) | {"train_summary.json"}
    saved = yaml.safe_load((align / "final" / "config.yaml").read_text())
    assert saved["deepspeed"]["zero_stage"] == 3 and saved["max_steps"] == max_steps
