"""Self-describing alignment checkpoints: DeepSpeed state + adapter/SR exports + config + data manifest.

Layout of one checkpoint directory (``run_dir/align/checkpoints/step_00000010/`` once Ray has merged the
workers' uploads)::

    ds/latest, ds/<tag>/...          every rank's DeepSpeed shard (trainable params only, optimizer, scheduler)
    adapter/adapter_config.json      peft LoRA adapter alone (safetensors)
    adapter/adapter_model.safetensors
    sr.safetensors                   the SR model alone: what fine-tune loads
    llm_head.safetensors             trainable non-LoRA LLM-recommender parameters (the s~ preference head)
    config.yaml                      the resolved AlignStageConfig
    manifest.json                    the data manifest the run trained on
    state.json                       step, epoch, data position, seeds, metrics
    COMPLETE                         written last by rank 0: every file above (all ranks) with its size and sha256

A checkpoint is resumed from only if ``COMPLETE`` exists and every file it lists exists with its recorded size
(workers upload their shards independently, so the marker alone does not prove rank 1's shard has landed) and, when
picked for a resume, its recorded sha256. ``find_latest_complete`` skips a damaged checkpoint with a warning naming
the bad file and falls back to the previous intact one.
``final/`` holds the same exports without ``ds/`` for the encode and fine-tune stages.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lsvcr_dist.checksums import file_records, verify_records
from lsvcr_dist.config import dump_yaml
from lsvcr_dist.train.distributed import gather_objects, rank, world_size

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

COMPLETE = "COMPLETE"
STATE = "state.json"
DS_DIR = "ds"
EXPORT_FILES = (
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "sr.safetensors",
    "llm_head.safetensors",
    "config.yaml",
    "manifest.json",
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


def find_peft_model(model: nn.Module):
    """The ``peft.PeftModel`` inside ``model`` (the LoRA-wrapped LLM).

    Raises:
        CheckpointError: no PeftModel found.
    """
    from peft import PeftModel

    for m in model.modules():
        if isinstance(m, PeftModel):
            return m
    raise CheckpointError("no peft.PeftModel inside the model: LoRA was not applied with peft.get_peft_model")


def llm_head_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable LLM-recommender parameters that are not LoRA weights (the s~ head), by name under ``model.llm``."""
    return {n: p for n, p in model.llm.named_parameters() if p.requires_grad and "lora_" not in n}


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], zero_stage: int):
    """Full (un-partitioned) parameters inside the block under ZeRO-3; a no-op otherwise.

    Collective under ZeRO-3: every rank must enter it with the same parameter list.
    """
    if zero_stage == 3 and params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def export_weights(model: nn.Module, out_dir: str | Path, cfg: Any, manifest_path: str | Path | None,
                   zero_stage: int, write: bool) -> list[str]:
    """Write the adapter, SR weights, LLM head, config and data manifest into ``out_dir``.

    Every rank calls this (ZeRO-3 gathers collectively); only the rank with ``write=True`` touches disk.

    Args:
        model: the AlignModel (``.llm`` holding a PeftModel, ``.sr``), possibly wrapped parameters under ZeRO-3.
        out_dir: target folder (created).
        cfg: the resolved stage config, dumped as ``config.yaml``.
        manifest_path: the data ``manifest.json`` copied beside the weights; None writes ``{}``.
        zero_stage: 3 gathers partitioned parameters first so nothing is saved empty.
        write: True on the writing rank (rank 0).

    Returns:
        Relative paths written (empty when ``write`` is False).
    """
    out = Path(out_dir)
    peft_model = find_peft_model(model)
    head = llm_head_params(model)
    params = [p for p in peft_model.parameters() if p.requires_grad] + list(model.sr.parameters())
    params += list(head.values())
    with gathered(params, zero_stage):
        if not write:
            return []
        out.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(out / "adapter"), safe_serialization=True, save_embedding_layers=False)
        sr_state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.sr.state_dict().items()}
        save_file(sr_state, str(out / "sr.safetensors"), metadata={"format": "pt"})
        head_state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.items()}
        save_file(head_state, str(out / "llm_head.safetensors"), metadata={"format": "pt"})
    # peft adds a model-card README; the checkpoint promises exactly EXPORT_FILES, so drop it.
    (out / "adapter" / "README.md").unlink(missing_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (out / "adapter" / name).is_file():
            raise CheckpointError(f"peft did not write {out / 'adapter' / name}")
    dump_yaml(cfg, out / "config.yaml")
    if manifest_path and Path(manifest_path).is_file():
        shutil.copyfile(manifest_path, out / "manifest.json")
    else:
        (out / "manifest.json").write_text("{}\n")
    return list(EXPORT_FILES)


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def save_checkpoint(engine: DeepSpeedEngine, model: nn.Module, tmp_dir: str | Path, cfg: Any, state: dict,
                    manifest_path: str | Path | None) -> list[str]:
    """Write this rank's part of a checkpoint into ``tmp_dir`` (then the caller reports it to Ray).

    Every rank saves its DeepSpeed shard (``exclude_frozen_parameters=True``: the frozen base is rebuilt from
    the backbone, not stored); rank 0 adds the exports and ``state.json``, then ``COMPLETE`` last, listing the
    files of all ranks.

    Args:
        engine: the DeepSpeed engine.
        model: the AlignModel inside the engine (``engine.module``).
        tmp_dir: this rank's local staging folder.
        cfg: resolved config.
        state: JSON-able training state (``step`` required).
        manifest_path: data manifest to copy.

    Returns:
        On rank 0, every relative file path of the merged checkpoint; ``[]`` elsewhere.
    """
    me = rank()
    tmp = Path(tmp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    tag = f"step_{int(state['step']):08d}"
    engine.save_checkpoint(str(tmp / DS_DIR), tag=tag, client_state={}, exclude_frozen_parameters=True)
    export_weights(model, tmp, cfg, manifest_path, engine.zero_optimization_stage(), write=me == 0)
    if me == 0:
        (tmp / STATE).write_text(json.dumps({**state, "ds_tag": tag, "world_size": world_size()}, indent=2))
    lists = gather_objects(file_records(tmp, _files_under(tmp)))  # each rank hashes its own shard before upload
    if me != 0:
        return []
    records = _merge_records(lists)
    files = sorted(set(records) | {STATE})
    # Written last: a crash before this line leaves a checkpoint that is never resumed from.
    (tmp / COMPLETE).write_text(json.dumps({"files": files, "step": int(state["step"]), "records": records},
                                           indent=1))
    return files + [COMPLETE]


def _merge_records(per_rank: list[dict[str, dict]]) -> dict[str, dict]:
    """One record per file over all ranks; a file two ranks wrote differently keeps no size/digest (the merged
    copy is whichever upload landed last, so only its existence can be promised)."""
    out: dict[str, dict] = {}
    for recs in per_rank:
        for rel, rec in recs.items():
            out[rel] = rec if out.get(rel, rec) == rec else {}
    return out


def verify_checkpoint(path: str | Path, full: bool = True) -> str | None:
    """The problem with a checkpoint, naming the file (None when it is intact).

    Checks the ``COMPLETE`` marker, that every file it lists exists with its recorded size, and with ``full``
    their sha256. Markers written before sizes were recorded are checked for existence only.
    """
    p = Path(path)
    marker = p / COMPLETE
    if not marker.is_file():
        return f"{marker}: no completion marker"
    try:
        rec = json.loads(marker.read_text())
        files, records = rec["files"], rec.get("records", {})
    except (ValueError, KeyError, TypeError) as e:
        return f"{marker}: unreadable completion marker ({e})"
    missing = [f for f in files if not (p / f).is_file()]
    if missing:
        return f"{p / missing[0]}: listed in {COMPLETE} but missing"
    return verify_records(p, {f: records.get(f, {}) for f in files}, full=full)


def is_complete(path: str | Path) -> bool:
    """True when ``path/COMPLETE`` exists and every file it lists is present with its recorded size."""
    return verify_checkpoint(path, full=False) is None


def read_state(path: str | Path) -> dict:
    """``state.json`` of a checkpoint.

    Raises:
        CheckpointError: the checkpoint is not complete (names the path and the missing or truncated file).
    """
    problem = verify_checkpoint(path, full=False)
    if problem:
        raise CheckpointError(f"checkpoint {path} is incomplete: {problem}")
    return json.loads((Path(path) / STATE).read_text())


def find_latest_complete(align_dir: str | Path) -> Path | None:
    """The intact checkpoint with the highest step under ``align_dir/checkpoints*/`` (None if there is none).

    Checkpoints are tried newest first; one whose files differ from its ``COMPLETE`` record (truncated, corrupted,
    missing) is skipped with a warning naming the file, so a run resumes from the previous intact checkpoint.
    """
    cands = []
    for marker in Path(align_dir).glob(f"checkpoints*/*/{COMPLETE}"):
        try:
            step = int(json.loads(marker.read_text()).get("step", -1))
        except (ValueError, AttributeError):
            step = -1  # unreadable marker: verify_checkpoint names it below
        cands.append((step, marker.stat().st_mtime, marker.parent))
    for step, _, ckpt in sorted(cands, key=lambda c: c[:2], reverse=True):
        problem = verify_checkpoint(ckpt, full=True)
        if problem is None:
            return ckpt
        warnings.warn(f"checkpoint {ckpt} (step {step}) is damaged, falling back to an earlier one: {problem}",
                      RuntimeWarning, stacklevel=2)
    return None


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train's record of the checkpoints it registered, in the run folder (``align/checkpoints/``)."""


def retire_stale_snapshot(run_folder: str | Path) -> tuple[Path, list[str]] | None:
    """Move Ray Train's checkpoint record aside when it names checkpoint folders that are gone.

    Ray's controller refuses to start on such a record (``ActorDiedError`` from ``_assert_checkpoints_exist``), so a
    run whose newest checkpoint was deleted could not be resubmitted. The resume point is this project's own pick
    (``find_latest_complete``), so Ray's record is not needed to resume: it is renamed to
    ``checkpoint_manager_snapshot.json.stale-N`` (kept, not deleted) and Ray starts a new one.

    Args:
        run_folder: the Ray run folder (``run_dir/align/checkpoints``).

    Returns:
        ``(new path of the record, [missing folder names])``, or None when nothing is missing, there is no record,
        or the record is not in the form this reads (Ray then reports it itself).
    """
    snap = Path(run_folder) / RAY_SNAPSHOT
    if not snap.is_file():
        return None
    try:
        names = [r["checkpoint_dir_name"] for r in json.loads(snap.read_text())["checkpoint_results"]]
    except (ValueError, KeyError, TypeError):
        return None
    missing = [n for n in names if not (snap.parent / n).is_dir()]
    if not missing:
        return None
    n = 1
    while snap.with_name(f"{RAY_SNAPSHOT}.stale-{n}").exists():
        n += 1
    dest = snap.with_name(f"{RAY_SNAPSHOT}.stale-{n}")
    snap.rename(dest)
    return dest, missing


def pick_resume(candidates: list[str | Path]) -> str | None:
    """The intact candidate with the highest step (e.g. Ray's latest checkpoint and the driver's pick); a damaged
    one is skipped with a warning naming the bad file. None when no candidate is intact."""
    best, best_step = None, -1
    for c in candidates:
        problem = verify_checkpoint(c, full=True)
        if problem:
            warnings.warn(f"checkpoint {c} is damaged, not resuming from it: {problem}", RuntimeWarning, stacklevel=2)
            continue
        step = int(read_state(c)["step"])
        if step > best_step:
            best, best_step = str(c), step
    return best


def _weights_only_load(path: str, map_location: Any = None) -> Any:
    """DeepSpeed's checkpoint-engine ``load`` without unpickling arbitrary objects (the project rule)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def restore_checkpoint(engine: DeepSpeedEngine, path: str | Path) -> dict:
    """Load model, optimizer and scheduler state into ``engine`` from a complete checkpoint; return its state.

    Every rank calls this with the same (shared-storage) path. DeepSpeed's own reader is switched to
    ``torch.load(weights_only=True)`` so a checkpoint cannot execute code.

    Raises:
        CheckpointError: incomplete or damaged checkpoint (names the file) or DeepSpeed could not load it.
    """
    problem = verify_checkpoint(path, full=True)
    if problem:
        raise CheckpointError(f"checkpoint {path} cannot be restored: {problem}")
    state = read_state(path)
    _allow_deepspeed_globals()
    engine.checkpoint_engine.load = _weights_only_load
    try:
        load_path, _ = engine.load_checkpoint(
            str(Path(path) / DS_DIR), tag=state["ds_tag"], load_module_strict=False,
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as e:
        raise CheckpointError(f"DeepSpeed could not load {Path(path) / DS_DIR} (tag {state['ds_tag']}): {e}") from e
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no state under {Path(path) / DS_DIR} (tag {state['ds_tag']})")
    return state


def _allow_deepspeed_globals() -> None:
    """The plain DeepSpeed types pickled into ZeRO shards, allow-listed for ``weights_only`` loading.

    ``ZeroStageEnum`` (an int enum), ``LossScaler`` (a static scale holder) and ``fragment_address`` (a dataclass of
    two ints, ZeRO-1/2) define no ``__reduce__`` of their own, so allowing them keeps ``weights_only=True``
    meaningful: nothing else can be instantiated while loading.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.serialization.add_safe_globals([ZeroStageEnum, LossScaler, fragment_address])


def base_fingerprint(model: nn.Module, zero_stage: int) -> list[float]:
    """``[sum, sum of squares]`` (float64) over every frozen parameter: equal before and after training iff no base
    weight moved (to float64 precision). Collective under ZeRO-3 (gathers one parameter at a time)."""
    total, sq = 0.0, 0.0
    for p in model.parameters():
        if p.requires_grad:
            continue
        with gathered([p], zero_stage):
            x = p.detach().double()
            total += float(x.sum())
            sq += float((x * x).sum())
    return [total, sq]


def load_sr_state(path: str | Path) -> dict[str, torch.Tensor]:
    """SR weights of a checkpoint or ``final/`` folder (``sr.safetensors``), for fine-tune.

    Raises:
        CheckpointError: the file is missing (names it).
    """
    f = Path(path) / "sr.safetensors"
    if not f.is_file():
        raise CheckpointError(f"no SR weights at {f}")
    return load_file(str(f))


def write_final(model: nn.Module, align_dir: str | Path, cfg: Any, manifest_path: str | Path | None,
                zero_stage: int, write: bool) -> Path:
    """Exports of the finished run into ``align_dir/final`` (``final/adapter/``, ``final/sr.safetensors``...).

    Collective under ZeRO-3 like ``export_weights``. The previous ``final/`` is replaced atomically-ish: written
    to ``final.tmp`` then renamed, so readers never see a half-written folder.
    """
    final = Path(align_dir) / "final"
    tmp = Path(align_dir) / "final.tmp"
    if write and tmp.exists():
        shutil.rmtree(tmp)
    export_weights(model, tmp, cfg, manifest_path, zero_stage, write)
    if write:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    return final
