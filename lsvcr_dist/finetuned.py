"""Fine-tuned models: set-up from the aligned weights (or scratch) and self-describing best-model folders.

No Ray and no training here: the fine-tune workers (``train/finetune_loop.py``) build and save models with these
functions, and evaluation reads them back, so evaluation never depends on the training layer.

A fine-tuned task folder ``run_dir/finetune/<task>/best/`` holds::

    model.safetensors   the FinetuneModel's persistent weights (the SR model; never the frozen text table)
    model_args.json     build_sr_model kwargs + task, num_videos, tau, model kind, and the text store path:
                        relative to the run (``run_dir = best/../../..``) when the store is inside it
    config.yaml         the resolved FinetuneStageConfig
    manifest.json       the data manifest it was trained on
    meta.json           epoch and validation metrics of the selected model
    COMPLETE            written last (a folder without it is never loaded)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from lsvcr_dist.config import FinetuneStageConfig, SRConfig, dump_yaml
from lsvcr_dist.embeddings import EmbeddingStore, resolve_store, store_ref
from lsvcr_dist.models.builders import build_sr_model, sr_config_kwargs
from lsvcr_dist.models.finetune_model import FinetuneModel, prepare_aligned_state
from lsvcr_dist.models.text_rows import TextRows

BEST_FILES = ("model.safetensors", "model_args.json", "config.yaml", "meta.json", "COMPLETE")


class FinetuneSetupError(RuntimeError):
    """A required input of fine-tune/evaluation is missing or inconsistent; the message names the path or key."""


def reads_projected_store(init: str, text_mlp: str = "frozen") -> bool:
    """Whether a fine-tune run reads the aligned (projected) store: aligned init with the text MLP frozen into it.

    ``init`` / ``text_mlp`` are ``FinetuneStageConfig``'s (baselines run with ``init=scratch``); every other run
    reads the base store through a text MLP of its own.
    """
    return init == "align" and text_mlp == "frozen"


def store_dir(run_dir: str | Path, init: str, text_mlp: str = "frozen") -> Path:
    """Text-vector store of a fine-tune run: aligned (projected) after alignment, base for 'w/o Alignment' and for
    ``text_mlp=trained`` (``reads_projected_store``)."""
    return Path(run_dir) / "embeddings" / ("aligned" if reads_projected_store(init, text_mlp) else "base")


def load_text_table(path: str | Path, verify: str | None = None) -> EmbeddingStore:
    """The text-vector store opened memory-mapped (fp16 shards; rows are read per batch by ``TextRows``).

    Nothing is copied into this process: every worker on a node reads the same page cache, so a worker's memory
    stays flat in the number of texts. ``verify``: ``EmbeddingStore.open`` mode (default ``$LSVCR_STORE_VERIFY``
    or ``full``).
    """
    if not (Path(path) / "manifest.json").is_file():
        raise FinetuneSetupError(f"{path}: embedding store missing (run jobs/encode_text.py)")
    return EmbeddingStore.open(str(path), verify=verify)


def sr_build_args(sr_cfg: SRConfig, *, text_in_dim: int, use_text_mlp: bool, num_videos: int) -> dict:
    """Plain ``build_sr_model`` kwargs from an ``SRConfig`` plus the data-dependent values."""
    return dict(text_in_dim=int(text_in_dim), use_text_mlp=bool(use_text_mlp), num_videos=int(num_videos),
                **sr_config_kwargs(sr_cfg))


def aligned_trained_positions(align_final: Path, la: int) -> int | None:
    """Rows of the positional tables that alignment trained: all (randomized positions) or the first LA."""
    cfg_path = align_final / "config.yaml"
    if not cfg_path.is_file():
        return None
    with open(cfg_path) as f:
        acfg = yaml.safe_load(f) or {}
    return None if acfg.get("rand_pos", True) else int(la)


def build_finetune_model(cfg: FinetuneStageConfig, task: str, *, num_videos: int, text_table,
                         align_final: str | Path | None = None, la: int = 20, generator: torch.Generator | None = None,
                         ) -> tuple[FinetuneModel, dict]:
    """The task's FinetuneModel, initialised from the aligned SR weights (``init=align``) or at random (``scratch``).

    Args:
        cfg: ``FinetuneStageConfig``.
        task: ``video`` or ``comment``.
        num_videos: V (ID-embedding rows unless ``cfg.use_id`` is False).
        text_table: the text vectors: an open ``EmbeddingStore`` (``load_text_table``), a ``[1 + V + C, Din]``
            tensor or a ``TextRows`` (aligned store: Din = sr.text_dim, projected).
        align_final: folder holding ``sr.safetensors`` (+ ``config.yaml``) for ``init=align``.
        la: alignment history length (rows trained without randomized positions).
        generator: RNG of the 'random' position extension.

    Returns:
        ``(model, build_args)``.

    Raises:
        FinetuneSetupError: missing aligned weights or a store of the wrong width.
        CheckpointShapeError: aligned weights of another shape (names the tensor and both shapes).
    """
    din = TextRows(text_table, num_videos).dim
    if cfg.model != "lsvcr":  # baselines start from scratch on the base store
        from lsvcr_dist.models.baselines import baseline_args, build_baseline

        args = baseline_args(cfg.model, cfg.sr, text_in_dim=din, num_videos=num_videos)
        return build_baseline(cfg.model, {"sr": args, "num_videos": num_videos, "task": task,
                                          "tau": cfg.loss.tau}, text_table), args
    aligned = cfg.init == "align"
    projected = reads_projected_store(cfg.init, cfg.text_mlp)
    if projected and din != cfg.sr.text_dim:
        raise FinetuneSetupError(f"aligned store vectors have width {din} but sr.text_dim={cfg.sr.text_dim}"
                                 " (the aligned store must hold projected vectors)")
    args = sr_build_args(cfg.sr, text_in_dim=din, use_text_mlp=not projected,
                         num_videos=num_videos if cfg.use_id else 0)
    sr = build_sr_model(**args)
    if aligned:
        if align_final is None:
            raise FinetuneSetupError("init=align needs the aligned SR weights folder")
        path = Path(align_final) / "sr.safetensors"
        if not path.is_file():
            raise FinetuneSetupError(f"{path}: aligned SR weights missing (run jobs/align.py, or"
                                     " finetune.init=scratch)")
        state = prepare_aligned_state(sr, load_file(str(path)), str(path),
                                      aligned_trained_positions(Path(align_final), la))
        sr.load_aligned_state(state, position_mode=cfg.position_extension, generator=generator)
    return FinetuneModel(sr, text_table, num_videos, task, tau=cfg.loss.tau), args


def save_best(out_dir: str | Path, model: nn.Module, cfg: FinetuneStageConfig, build_args: dict, meta: dict,
              manifest_path: str | Path | None, text_store: str | Path, kind: str = "lsvcr") -> Path:
    """Write the selected model into ``out_dir`` atomically (``out_dir.tmp`` then rename; COMPLETE last)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    args = {"kind": kind, "task": model.task, "num_videos": model.num_videos, "tau": model.tau,
            "text_store": store_ref(text_store, _run_of(out)), "sr": build_args}
    (tmp / "model_args.json").write_text(json.dumps(args, indent=1))
    dump_yaml(cfg, tmp / "config.yaml")
    if manifest_path and Path(manifest_path).is_file():
        shutil.copy(manifest_path, tmp / "manifest.json")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    (tmp / "COMPLETE").write_text(json.dumps(sorted(p.name for p in tmp.iterdir())))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _run_of(best_dir: str | Path) -> Path:
    """The run directory of ``run_dir/finetune/<task>/best``."""
    return Path(os.path.abspath(best_dir)).parents[2]


def build_from_args(args: dict, text_table) -> nn.Module:
    """Rebuild a (not yet loaded) scorer from ``model_args.json`` content: LSVCR or a baseline."""
    kind = args.get("kind", "lsvcr")
    if kind == "lsvcr":
        return FinetuneModel(build_sr_model(**args["sr"]), text_table, args["num_videos"], args["task"], args["tau"])
    from lsvcr_dist.models.baselines import build_baseline

    return build_baseline(kind, args, text_table)


def load_finetuned(best_dir: str | Path, text_table=None) -> tuple[nn.Module, dict]:
    """Load a fine-tuned model from its ``best/`` folder (safetensors only, never pickles).

    Args:
        best_dir: ``run_dir/finetune/<task>/best``.
        text_table: text vectors (store, tensor or ``TextRows``); None = open the store recorded in
            ``model_args.json`` (memory-mapped).

    Returns:
        ``(model in eval mode, model_args)``.

    Raises:
        FinetuneSetupError: the folder is incomplete (no COMPLETE marker) or a file is missing (named).
    """
    best = Path(best_dir)
    if not (best / "COMPLETE").is_file():
        raise FinetuneSetupError(f"{best}: no complete fine-tuned model (COMPLETE marker missing; rerun finetune)")
    args = json.loads((best / "model_args.json").read_text())
    if text_table is None:
        text_table = load_text_table(resolve_store(args["text_store"], _run_of(best)))
    model = build_from_args(args, text_table)
    state = load_file(str(best / "model.safetensors"))
    model.load_state_dict(state, strict=True)
    return model.eval(), args
