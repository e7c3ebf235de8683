"""Checkpoint save / complete-marker / restore with the real DeepSpeed engine, 2 processes (spawn + gloo).

A ZeRO-3 run of 3 optimizer steps is compared with a run stopped after 2 steps, checkpointed (each rank into its own
staging dir, merged like Ray merges uploads), rebuilt from scratch and restored: step 3 must give the same loss.
Dropout stays ON: the per-micro-step reseeding makes the resumed draws identical without stored RNG state.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from _align_fakes import NV, fake_batch, text_encoder  # noqa: E402

from lsvcr_dist.train.checkpoint import (  # noqa: E402
    COMPLETE, EXPORT_FILES, RAY_SNAPSHOT, CheckpointError, find_latest_complete, is_complete, read_state,
    retire_stale_snapshot)

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(stage: int):
    from lsvcr_dist.config import load_config

    return load_config(ROOT / "jobs/configs/tiny.yaml", "align", [
        f"deepspeed.zero_stage={stage}", "global_batch=4", "deepspeed.micro_batch=2", "scaling.num_workers=2",
        "max_steps=3", "optim.warmup_ratio=0", "run_dir=/nonexistent",
    ])


def _run_steps(engine, loss_fn, cfg, encode, rank, start, stop):
    from lsvcr_dist.train.align_step import micro_step, seed_micro_step, text_inputs, to_tensors

    losses = []
    for step in range(start, stop):
        raw = fake_batch(2, seed=100 * step + rank)
        seed_micro_step(cfg.seed, rank, step)
        m = micro_step(engine, loss_fn, to_tensors(raw, "cpu"), text_inputs(raw, NV, encode, "cpu"), rand_pos=True)
        losses.append(m["loss"])
    return losses


def _worker(rank: int, world: int, port: int, stage: int, tmp: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from lsvcr_dist.losses import AlignmentLoss
    from lsvcr_dist.models.align_model import build_align_model
    from lsvcr_dist.train.checkpoint import restore_checkpoint, save_checkpoint
    from lsvcr_dist.train.engine import initialize_engine

    cfg = _cfg(stage)
    loss_fn = AlignmentLoss.from_config(cfg.loss)
    tok, model = build_align_model(cfg, NV)
    encode = text_encoder(tok)
    engine, _ = initialize_engine(model, cfg, world, "cpu", total_steps=3)
    full = _run_steps(engine, loss_fn, cfg, encode, rank, 0, 3)

    tok, model = build_align_model(cfg, NV)
    engine, _ = initialize_engine(model, cfg, world, "cpu", total_steps=3)
    first = _run_steps(engine, loss_fn, cfg, encode, rank, 0, 2)
    stage_dir = Path(tmp) / f"stage_rank{rank}"
    files = save_checkpoint(engine, engine.module, stage_dir, cfg, {"step": 2, "epoch": 0, "micro_in_epoch": 2},
                            manifest_path=None)
    dist.barrier()
    merged = Path(tmp) / "checkpoints" / "step_00000002"
    if rank == 0:  # what Ray does with the per-worker uploads of one report
        for r in range(world):
            shutil.copytree(Path(tmp) / f"stage_rank{r}", merged, dirs_exist_ok=True)
    dist.barrier()
    tok, model = build_align_model(cfg, NV)
    engine, _ = initialize_engine(model, cfg, world, "cpu", total_steps=3)
    state = restore_checkpoint(engine, merged)
    resumed = _run_steps(engine, loss_fn, cfg, encode, rank, state["step"], 3)
    with open(Path(tmp) / f"result_{rank}.json", "w") as f:
        json.dump({"full": full, "first": first, "resumed": resumed, "files": files,
                   "lr": engine.lr_scheduler.get_last_lr()}, f)
    dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_zero3_checkpoint_files_and_exact_resume(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), 3, str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "result_0.json").read_text())
    r1 = json.loads((tmp_path / "result_1.json").read_text())
    for r in (r0, r1):
        assert r["first"] == pytest.approx(r["full"][:2], abs=1e-6)
        assert r["resumed"] == pytest.approx(r["full"][2:], abs=1e-6)  # same loss at step 3 after restore
    assert r0["full"] != r1["full"]  # the ranks saw different rows (a real 2-worker run)
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    # exactly the promised files: exports + state + marker + the DeepSpeed shards of both ranks
    files = set(r0["files"])
    assert r1["files"] == []
    ds_files = {f for f in files if f.startswith("ds/")}
    assert set(files - ds_files) == set(EXPORT_FILES) | {"state.json", COMPLETE}
    for r in (0, 1):
        assert f"ds/step_00000002/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" in ds_files
        assert f"ds/step_00000002/zero_pp_rank_{r}_mp_rank_00_model_states.pt" in ds_files
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()}
    assert on_disk == files
    assert read_state(ckpt)["step"] == 2 and read_state(ckpt)["world_size"] == 2
    # ZeRO-3 exports were gathered: LoRA A/B have their full shapes, not empty partitions
    from safetensors.torch import load_file

    adapter = load_file(str(ckpt / "adapter/adapter_model.safetensors"))
    lora_a = [v for k, v in adapter.items() if "lora_A" in k]
    assert lora_a and all(v.shape == (8, 64) or v.shape[0] == 8 for v in lora_a) and all(v.numel() > 0 for v in lora_a)
    sr = load_file(str(ckpt / "sr.safetensors"))
    assert sr["llm_adapter.weight"].shape == (32, 32) and float(sr["llm_adapter.weight"].abs().sum()) > 0
    head = load_file(str(ckpt / "llm_head.safetensors"))
    assert set(head) == {"pref_head.weight", "pref_head.bias"} and head["pref_head.weight"].shape == (32, 64)
    # completeness: the marker alone is not enough, every listed file must exist
    assert is_complete(ckpt) and find_latest_complete(tmp_path) == ckpt
    # COMPLETE records every file of both ranks (each rank hashed its own shard before the merge)
    from lsvcr_dist.checksums import file_record

    records = json.loads((ckpt / COMPLETE).read_text())["records"]
    assert set(records) == files - {COMPLETE} and all(records[f] == file_record(ckpt / f) for f in records)
    model_states = ckpt / "ds/step_00000002/zero_pp_rank_1_mp_rank_00_model_states.pt"
    intact = model_states.read_bytes()
    model_states.write_bytes(intact[:-100])  # truncated model states of rank 1: named, never resumed from
    with pytest.warns(RuntimeWarning, match=f"{model_states}: {len(intact) - 100} bytes, recorded {len(intact)}"):
        assert find_latest_complete(tmp_path) is None
    model_states.write_bytes(intact)
    (ckpt / "ds/step_00000002/zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert not is_complete(ckpt)
    with pytest.warns(RuntimeWarning, match="optim_states.pt: listed in COMPLETE but missing"):
        assert find_latest_complete(tmp_path) is None
    with pytest.raises(CheckpointError, match="step_00000002 is incomplete"):
        read_state(ckpt)


def test_latest_complete_picks_highest_step_and_skips_unmarked(tmp_path):
    def make(name, step, complete=True):
        d = tmp_path / "checkpoints" / name
        d.mkdir(parents=True)
        (d / "state.json").write_text(json.dumps({"step": step}))
        if complete:
            (d / COMPLETE).write_text(json.dumps({"files": ["state.json"], "step": step}))
        return d

    make("step_00000010", 10)
    best = make("step_00000020", 20)
    make("step_00000030", 30, complete=False)  # crashed before the marker: never resumed from
    assert find_latest_complete(tmp_path) == best
    assert find_latest_complete(tmp_path / "nothing") is None


def test_ray_record_naming_a_deleted_checkpoint_is_moved_aside(tmp_path):
    """Ray's record names step 3 and step 6; step 6 was deleted: the record is renamed (kept), a second stale one
    gets the next free name, and a record whose folders all exist or that is not Ray's form is left alone."""
    run = tmp_path / "checkpoints"
    (run / "step_00000003").mkdir(parents=True)
    record = {"checkpoint_results": [{"checkpoint_dir_name": "step_00000003"},
                                     {"checkpoint_dir_name": "step_00000006"}], "other": 1}
    (run / RAY_SNAPSHOT).write_text(json.dumps(record))
    dest, missing = retire_stale_snapshot(run)
    assert missing == ["step_00000006"] and dest == run / f"{RAY_SNAPSHOT}.stale-1"
    assert json.loads(dest.read_text()) == record and not (run / RAY_SNAPSHOT).exists()
    (run / RAY_SNAPSHOT).write_text(json.dumps(record))
    assert retire_stale_snapshot(run)[0] == run / f"{RAY_SNAPSHOT}.stale-2"
    (run / "step_00000006").mkdir()
    (run / RAY_SNAPSHOT).write_text(json.dumps(record))
    assert retire_stale_snapshot(run) is None and (run / RAY_SNAPSHOT).is_file()
    (run / RAY_SNAPSHOT).write_text(json.dumps({"ray_version": "9"}))  # a form this does not read: Ray's to judge
    assert retire_stale_snapshot(run) is None and (run / RAY_SNAPSHOT).is_file()
    assert retire_stale_snapshot(tmp_path / "nothing") is None


def _ckpt(root: Path, step: int) -> Path:
    """A checkpoint folder as save_checkpoint leaves it: state, a DeepSpeed-like shard, COMPLETE with records."""
    from lsvcr_dist.checksums import file_records

    d = root / "checkpoints" / f"step_{step:08d}"
    (d / "ds" / f"step_{step:08d}").mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"step": step}))
    (d / "ds" / f"step_{step:08d}" / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * (step + 1))
    files = ["state.json", f"ds/step_{step:08d}/mp_rank_00_model_states.pt"]
    (d / COMPLETE).write_text(json.dumps({"files": files, "step": step, "records": file_records(d, files)}))
    return d


def test_damaged_newest_checkpoint_falls_back_to_the_previous_intact_one(tmp_path):
    """Before: COMPLETE only proved the files existed, so a truncated model-states file was picked and the load
    failed without naming it."""
    first, second, third = _ckpt(tmp_path, 10), _ckpt(tmp_path, 20), _ckpt(tmp_path, 30)
    states = third / "ds" / "step_00000030" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])  # truncated (a copy cut short, a full disk)
    with pytest.warns(RuntimeWarning, match=rf"checkpoint {third} \(step 30\) is damaged, falling back to an "
                                            rf"earlier one: {states}: 1000 bytes, recorded 7936"):
        assert find_latest_complete(tmp_path) == second
    assert not is_complete(third)
    with pytest.raises(CheckpointError, match=rf"step_00000030 is incomplete: {states}: 1000 bytes"):
        read_state(third)
    flipped = second / "ds" / "step_00000020" / "mp_rank_00_model_states.pt"
    data = bytearray(flipped.read_bytes())
    data[100] ^= 0xFF  # same size, one byte changed: only the checksum sees it
    flipped.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning) as w:
        assert find_latest_complete(tmp_path) == first
    assert any(f"{flipped}: sha256" in str(x.message) for x in w)
    assert is_complete(second)  # the cheap check (sizes) passes; the resume pick reads the bytes
    from lsvcr_dist.train.checkpoint import pick_resume

    with pytest.warns(RuntimeWarning, match=rf"checkpoint {third} is damaged, not resuming from it: {states}"):
        assert pick_resume([third, first]) == str(first)  # Ray's latest vs the driver's pick


def test_restore_names_the_damaged_file_before_deepspeed_reads_it(tmp_path):
    from lsvcr_dist.train.checkpoint import restore_checkpoint

    ckpt = _ckpt(tmp_path, 5)
    states = ckpt / "ds" / "step_00000005" / "mp_rank_00_model_states.pt"
    states.write_bytes(b"\0" * states.stat().st_size)
    with pytest.raises(CheckpointError, match=rf"cannot be restored: {states}: sha256"):
        restore_checkpoint(engine=None, path=ckpt)  # raises before the engine is touched
