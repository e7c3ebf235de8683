"""Alignment ``train_loop_per_worker`` (Ray Train + DeepSpeed): setup, epochs of streamed batches, logging, checkpoints.

Each worker rebuilds the config from its argument, builds tokenizer / LLM + LoRA / SR inside the process (seeded,
so all ranks start identical), wraps them in one DeepSpeed engine and streams ``get_dataset_shard("train")``.
Per micro-batch: forward, all-gather of s, s~, e (negatives = every worker's micro-batch), L_ALI (Eq. 16),
``engine.backward`` / ``engine.step``; under ``contrastive_pool=global`` the step's micro-batches are queued and
``grad_cache.grad_cache_step`` runs them against the whole global batch. DeepSpeed accumulates ``global_batch / (micro_batch * workers)`` micro-batches
per optimizer step. Resume sources: ``ray.train.get_checkpoint()`` (FailureConfig restarts and same-name runs) and
``config["_resume_from"]`` (the latest complete checkpoint the driver found under ``run_dir/align``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import ray.train
import torch

from lsvcr_dist.config import AlignStageConfig, from_dict
from lsvcr_dist.data.epoch_cache import EpochCache
from lsvcr_dist.losses import AlignmentLoss
from lsvcr_dist.train.align_step import (
    micro_step,
    reduce_metrics,
    seed_micro_step,
    text_inputs,
    to_tensors,
    trim_prompts,
    trim_text,
)
from lsvcr_dist.train.checkpoint import base_fingerprint, read_state, restore_checkpoint, save_checkpoint, write_final
from lsvcr_dist.train.distributed import all_true, barrier
from lsvcr_dist.train.grad_cache import Micro, grad_cache_step

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

FAULT_ENV = "LSVCR_FAULT_INJECT"
LOGGED = ("loss", "loss_lm", "loss_sr", "loss_ssc", "loss_vcc", "acc_sr", "masked_sr", "masked_ssc")
"""Step metrics written to ``metrics.jsonl`` beside step, epoch, lr, throughput and pool size."""


def dataset_name(epoch: int, draws: int) -> str:
    """Ray Train dataset the loop streams in ``epoch``: ``train`` for draw 0, else ``train_draw{k}``, k = epoch % draws.

    The name depends on the epoch and ``ingest.epoch_draws`` only (not on ``max_steps``), so a resumed run with a
    longer schedule reads the same draw at the same epoch. The driver (``align_run.build_align_datasets``) names the
    datasets it hands to the trainer with the same function.
    """
    k = epoch % draws
    return "train" if k == 0 else f"train_draw{k}"


class InjectedFault(RuntimeError):
    """Raised once by ``LSVCR_FAULT_INJECT=step:N`` to exercise FailureConfig restarts."""


@dataclass
class Position:
    """Where training stands: optimizer steps done, current epoch, micro-batches of that epoch consumed."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0


@dataclass
class Worker:
    """Everything one worker built in ``setup``."""

    cfg: AlignStageConfig
    """The resolved config, rebuilt from the loop argument."""
    rank: int
    """This worker's rank in the Ray Train group."""
    world: int
    """Workers in the group: the contrastive pool is ``micro_batch * world`` rows."""
    device: torch.device
    """Where the engine and the batches live."""
    engine: DeepSpeedEngine
    """The DeepSpeed engine wrapping the ``AlignModel`` (and its AdamW and LR schedule)."""
    loss_fn: AlignmentLoss
    """L_ALI (Eq. 16) over the gathered pool."""
    encode_texts: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None
    """Text ids ``[U]`` -> token ids and mask ``[U, T]`` (``text_source=online``); None for the store source."""
    num_videos: int
    """Comment text-id offset (data manifest)."""
    accum: int
    """Micro-batches per optimizer step on this worker (``AlignStageConfig.grad_accum_steps``)."""
    align_dir: Path
    """``run_dir/align``: metrics, checkpoints, ``final/``."""
    manifest_path: Path
    """The data manifest copied into every checkpoint."""
    fault_inject: str = ""
    """``step:N`` test hook (see ``maybe_inject_fault``); empty = off."""
    caches: dict[str, EpochCache] = field(default_factory=dict)
    """Per dataset name: the epochs of that draw replayed from memory once a complete pass fit ``ingest.cache_mb``."""


# ------------------------------------------------------------------------------------------------ setup
def setup(config: dict) -> tuple[Worker, Position]:
    """Build model, engine and loss inside the worker and restore the latest checkpoint if any."""
    from lsvcr_dist.data.manifest import manifest_path, read_manifest
    from lsvcr_dist.losses import AlignmentLoss
    from lsvcr_dist.models.align_model import base_text_norm, build_align_model
    from lsvcr_dist.train.engine import initialize_engine

    config = dict(config)
    resume_from = config.pop("_resume_from", None)
    fault = config.pop("_fault_inject", "") or ""
    cfg = from_dict("align", config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    data_dir = Path(cfg.run_dir) / "data"
    manifest = read_manifest(data_dir)
    nv, nc = int(manifest["num_videos"]), int(manifest["num_comments"])
    text_table = None
    if cfg.text_source == "store":
        from lsvcr_dist.embeddings import EmbeddingStore
        from lsvcr_dist.models.text_rows import TextRows

        # memory-mapped: rows are read per batch, never a per-worker float32 copy of the whole store
        text_table = TextRows(EmbeddingStore.open(Path(cfg.run_dir) / "embeddings" / "base"), nv)
    tok, model = build_align_model(cfg, nv, text_table, base_text_norm(cfg))
    encode = None
    if cfg.text_source == "online":
        from lsvcr_dist.data.tables import TextLookup
        from lsvcr_dist.data.transforms import TextTokenizer

        encode = TextTokenizer(tok, TextLookup(data_dir, nv, nc), cfg.llm.max_text_len).tokenize
    engine, ds_cfg = initialize_engine(model, cfg, world, device.type, total_steps=cfg.max_steps)
    w = Worker(cfg, rank, world, device, engine, AlignmentLoss.from_config(cfg.loss), encode, nv,
               ds_cfg["gradient_accumulation_steps"], Path(cfg.run_dir) / "align", manifest_path(data_dir), fault)
    return w, restore(w, resume_from)


def _pick_checkpoint(resume_from: str | None) -> str | None:
    """The resume path with the higher step among Ray's latest checkpoint and the driver's pick."""
    cands = []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        cands.append(ckpt.path)
    if resume_from:
        cands.append(resume_from)
    best, best_step = None, -1
    for c in cands:
        step = int(read_state(c)["step"])
        if step > best_step:
            best, best_step = c, step
    return best


def restore(w: Worker, resume_from: str | None) -> Position:
    """Load the latest complete checkpoint into the engine (all ranks); trim metric lines past it (rank 0)."""
    path = _pick_checkpoint(resume_from)
    if path is None:
        return Position()
    state = restore_checkpoint(w.engine, path)
    if state.get("world_size") != w.world or state.get("global_batch") != w.cfg.global_batch:
        raise RuntimeError(
            f"checkpoint {path} was written with world_size={state.get('world_size')}, global_batch="
            f"{state.get('global_batch')}; this run has {w.world}, {w.cfg.global_batch} (the data position would"
            " not line up)")
    pos = Position(int(state["step"]), int(state["epoch"]), int(state["micro_in_epoch"]))
    if w.rank == 0:
        _trim_metrics(w.align_dir / "metrics.jsonl", pos.step)
        print(f"[align] resumed from {path} at step {pos.step} (epoch {pos.epoch}, micro {pos.micro_in_epoch})")
    return pos


def _trim_metrics(path: Path, step: int) -> None:
    """Drop lines of steps after ``step`` (they are recomputed after a restart), so each step appears once."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln)["step"] <= step]
    dropped = [ln for ln in lines if json.loads(ln)["step"] > step]
    if dropped:  # kept for audit (and the resume test): what the failed attempt logged
        with open(path.with_name("metrics.replaced.jsonl"), "a") as f:
            f.write("".join(ln + "\n" for ln in dropped))
    path.write_text("".join(ln + "\n" for ln in keep))


# ------------------------------------------------------------------------------------------------ logging / faults
def log_metrics(w: Worker, metrics: dict) -> None:
    """Rank 0 appends one JSON line to ``run_dir/align/metrics.jsonl`` and prints a progress line."""
    if w.rank != 0:
        return
    w.align_dir.mkdir(parents=True, exist_ok=True)
    with open(w.align_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    print(f"[align] step {metrics['step']}/{w.cfg.max_steps} loss {metrics['loss']:.4f} lm {metrics['loss_lm']:.4f}"
          f" sr {metrics['loss_sr']:.4f} lr {metrics['lr']:.2e} {metrics['samples_per_s']:.1f} samples/s", flush=True)


def maybe_inject_fault(w: Worker, step: int) -> None:
    """``LSVCR_FAULT_INJECT=step:N``: rank 1 (rank 0 if alone) raises once at step N; a marker file in
    ``run_dir/align`` keeps the restarted attempt from raising again."""
    spec = w.fault_inject or os.environ.get(FAULT_ENV, "")
    if not spec.startswith("step:") or step != int(spec.split(":", 1)[1]):
        return
    if w.rank != min(1, w.world - 1):
        return
    marker = w.align_dir / f".fault_injected_step_{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(time.time()))
    raise InjectedFault(f"{FAULT_ENV}: injected failure on rank {w.rank} at step {step}")


# ------------------------------------------------------------------------------------------------ checkpoint
def checkpoint(w: Worker, pos: Position, metrics: dict) -> None:
    """Every rank stages its shard; rank 0 adds exports + state + COMPLETE; all report to Ray (merged dir)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"lsvcr-align-r{w.rank}-"))
    try:
        state = {"step": pos.step, "epoch": pos.epoch, "micro_in_epoch": pos.micro_in_epoch,
                 "seed": w.cfg.seed, "global_batch": w.cfg.global_batch, "metrics": metrics,
                 "rng": "re-derived per micro-step from (seed, rank, micro index)"}
        save_checkpoint(w.engine, w.engine.module, tmp, w.cfg, state, w.manifest_path)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                         checkpoint_dir_name=f"step_{pos.step:08d}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ loop
def _batches(w: Worker, epoch: int):
    """Micro-batches of ``epoch`` on this worker (``ingest.epoch_iterator``: the prepared global order, windows
    permuted by ``(seed, epoch, rank)``), stopping when any rank runs out so all ranks take the same steps."""
    from lsvcr_dist.data.ingest import epoch_iterator, shuffle_seed

    name = dataset_name(epoch, w.cfg.ingest.epoch_draws)
    shard = ray.train.get_dataset_shard(name)
    ing = w.cfg.ingest
    cache = w.caches.setdefault(name, EpochCache(ing.cache_mb))
    it = iter(epoch_iterator(shard, w.cfg.deepspeed.micro_batch, epoch, shuffle_seed(w.cfg), ing.shuffle_window,
                             w.rank, prefetch_batches=ing.prefetch_batches, drop_last=True, cache=cache))
    while True:
        batch = next(it, None)
        if not all_true(batch is not None, w.device):  # equal steps on all ranks: none waits in a collective
            # every rank is here together (the collective above), so they can agree whether later epochs replay
            if not cache.decided:
                if cache.settle(lambda ok: all_true(ok, w.device)) and w.rank == 0:
                    print(f"[align] {name}: later epochs replay {cache.bytes / 2**20:.1f} MiB per worker from memory")
            return
        yield batch


class Throughput:
    """Samples and tokens since the last metric line, turned into rates when the line is written."""

    def __init__(self) -> None:
        self.t_last, self.samples, self.tokens = time.time(), 0.0, 0.0

    def add(self, reduced: dict[str, float]) -> None:
        """Count one optimizer step's ``samples`` and ``tokens`` (every worker's, from ``reduce_metrics``)."""
        self.samples += reduced["samples"]
        self.tokens += reduced["tokens"]

    def rates(self) -> dict[str, float]:
        """``samples_per_s`` and ``tokens_per_s`` since the last call (or construction), then start over."""
        dt = max(time.time() - self.t_last, 1e-9)
        out = {"samples_per_s": self.samples / dt, "tokens_per_s": self.tokens / dt}
        self.t_last, self.samples, self.tokens = time.time(), 0.0, 0.0
        return out


def pool_size(cfg: AlignStageConfig, world: int) -> int:
    """Rows every InfoNCE query of a step is contrasted with: the global batch, or every worker's micro-batch."""
    return cfg.global_batch if cfg.contrastive_pool == "global" else cfg.deepspeed.micro_batch * world


def end_of_step(w: Worker, pos: Position, reduced: dict[str, float], meter: Throughput) -> None:
    """After optimizer step ``pos.step``: fault hook, then a metric line and a checkpoint or a plain report when due."""
    maybe_inject_fault(w, pos.step)
    meter.add(reduced)
    cfg = w.cfg
    ckpt_now = pos.step % cfg.checkpoint.every_steps == 0 or pos.step >= cfg.max_steps
    if not (pos.step % cfg.log_every == 0 or ckpt_now):
        return
    metrics = {"step": pos.step, "epoch": pos.epoch, **{k: reduced[k] for k in LOGGED},
               "lr": float(w.engine.get_lr()[0]), **meter.rates(),
               "pool_size": pool_size(cfg, w.world), "world_size": w.world}
    log_metrics(w, metrics)
    if ckpt_now:
        checkpoint(w, pos, metrics)
    else:
        ray.train.report(metrics)


def finish(w: Worker, pos: Position, fp_start: list[float]) -> None:
    """Write ``run_dir/align/final`` (collective under ZeRO-3) and rank 0's ``train_summary.json``."""
    zero = w.engine.zero_optimization_stage()
    final = write_final(w.engine.module, w.align_dir, w.cfg, w.manifest_path, zero, write=w.rank == 0)
    fp_end = base_fingerprint(w.engine.module, zero)
    if w.rank == 0:
        n_train = sum(p.numel() for p in w.engine.module.parameters() if p.requires_grad)
        (final / "train_summary.json").write_text(json.dumps({
            "step": pos.step, "epoch": pos.epoch, "world_size": w.world, "zero_stage": zero,
            "trainable_params": n_train, "base_fingerprint_start": fp_start, "base_fingerprint_end": fp_end}))
    barrier()


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: ``config`` is ``to_dict(AlignStageConfig)`` (+ optional ``_resume_from``, ``_fault_inject``).

    Runs until ``max_steps`` optimizer steps (epochs of the streamed dataset repeat as needed), logging every
    ``log_every`` steps and checkpointing every ``checkpoint.every_steps`` and at the end; then writes
    ``run_dir/align/final/``.
    """
    w, pos = setup(config)
    cfg = w.cfg
    fp_start = base_fingerprint(w.engine.module, w.engine.zero_optimization_stage())
    if pos.step >= cfg.max_steps:
        print(f"[align] rank {w.rank}: already at step {pos.step} >= max_steps={cfg.max_steps}")
    pending: list[dict] = []
    queued: list[Micro] = []  # contrastive_pool=global: the step's micro-batches, run together by grad_cache_step
    skip, micro_index = pos.micro_in_epoch, pos.step * w.accum
    meter = Throughput()
    while pos.step < cfg.max_steps:
        pos.micro_in_epoch = 0
        for batch in _batches(w, pos.epoch):
            if pos.micro_in_epoch < skip:  # resume mid-epoch: these micro-batches were consumed before
                pos.micro_in_epoch += 1
                continue
            batch_t = to_tensors(batch, w.device)
            text = text_inputs(batch, w.num_videos, w.encode_texts, w.device)
            if cfg.trim_padding:  # exact: the cut columns are right padding (benchmarks/RESULTS.md measures the gain)
                batch_t, text = trim_prompts(batch_t), trim_text(text)
            if cfg.contrastive_pool == "global":
                queued.append(Micro(micro_index, batch_t, text))
                if len(queued) == w.accum:
                    pending, queued = grad_cache_step(w.engine, w.loss_fn, queued, cfg.seed, cfg.rand_pos), []
            else:
                seed_micro_step(cfg.seed, w.rank, micro_index)
                pending.append(micro_step(w.engine, w.loss_fn, batch_t, text, cfg.rand_pos))
            micro_index += 1
            pos.micro_in_epoch += 1
            if len(pending) < w.accum:
                continue
            pos.step += 1
            reduced = reduce_metrics(pending, cfg.loss.lm_reduction, w.device)
            pending = []
            end_of_step(w, pos, reduced, meter)
            if pos.step >= cfg.max_steps:
                break
        if pos.micro_in_epoch == 0 and skip == 0:
            raise RuntimeError(
                f"the train shard of rank {w.rank} yielded no full micro-batch of {cfg.deepspeed.micro_batch} rows"
                f" in epoch {pos.epoch}: too little data for {w.world} workers")
        skip = 0
        if pos.step < cfg.max_steps:
            pos.epoch += 1
    finish(w, pos, fp_start)
