"""Recommendation-oriented fine-tuning (Section 3.4) on Ray Train with plain DDP: SR model only, no LLM.

One model per task (public code): the driver (``fit_task``) builds the streamed training dataset
(``read_instances(..., tasks=[task])``) and a ``TorchTrainer``; every worker streams it (``epoch_batches``: users
mixed, windows permuted per epoch, ``FinetuneTransform`` with the epoch's popular-comment draw) and
runs ``train_loop_per_worker``: builds the task model (aligned SR weights + frozen aligned text table, or random init
+ base store for 'w/o Alignment'), wraps it with ``ray.train.torch.prepare_model`` (DDP), and trains with
L_FT = L_VRT + eta * L_REG (video, Eq. 17-19) or the in-video comment cross-entropy (+ eta * L_REG). After every
epoch rank 0 validates on the val split (4.1.3 candidates), keeps the best model by ``finetune.select_metric`` in
``run_dir/finetune/<task>/best/`` and appends a line to ``run_dir/finetune/<task>/metrics.jsonl``; all ranks stop
together after ``patience`` epochs without improvement.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lsvcr_dist.config import FinetuneStageConfig, from_dict, to_dict
from lsvcr_dist.data.epoch_cache import EpochCache
from lsvcr_dist.data.ft_transforms import FinetuneTransform
from lsvcr_dist.data.manifest import dims_of, manifest_path, read_manifest
from lsvcr_dist.evaluate import evaluate_model
from lsvcr_dist.finetuned import build_finetune_model, load_text_table, save_best, store_dir
from lsvcr_dist.losses import CommentRankLoss, FinetuneLoss, VRTLoss
from lsvcr_dist.progress import Progress, emit, print_lines_once
from lsvcr_dist.train.distributed import all_reduce_mean, all_true, broadcast_flag, rank, world_size
from lsvcr_dist.train.engine import make_adamw

VAL_BATCH = 256
"""Validation rows scored per forward pass (memory only: the metrics do not depend on it)."""


class Selection:
    """Best-model selection and early stopping on one validation metric (``finetune.select_metric``).

    ``update(val)`` returns whether ``val[metric]`` beat every earlier value (strictly); ``record(improved)`` counts
    a trained epoch, and ``stop`` turns True after ``patience`` recorded epochs in a row without improvement.
    """

    def __init__(self, metric: str, patience: int):
        self.metric, self.patience = metric, patience
        self.best, self.bad = -1.0, 0

    def update(self, val: dict) -> bool:
        """Whether the validation metrics ``val`` improve on the best so far (then they become the best)."""
        if self.metric not in val:
            raise KeyError(f"finetune.select_metric={self.metric!r} is not among the validation metrics {sorted(val)}")
        improved = val[self.metric] > self.best
        if improved:
            self.best = val[self.metric]
        return improved

    def record(self, improved: bool) -> None:
        """Count an epoch (not the epoch-0 reference) towards ``patience``."""
        self.bad = 0 if improved else self.bad + 1

    @property
    def stop(self) -> bool:
        """``patience`` recorded epochs in a row without improvement."""
        return self.bad >= self.patience


def task_dir(run_dir: str | Path, task: str) -> Path:
    """``run_dir/finetune/<task>``."""
    return Path(run_dir) / "finetune" / task


def _mean_across(x: float) -> float:
    """Mean of ``x`` over the workers (float64)."""
    return float(all_reduce_mean(torch.tensor([x], dtype=torch.float64)))


def train_step(ddp_model: nn.Module, batch: dict[str, torch.Tensor], task: str, task_loss: nn.Module,
               ft_loss: FinetuneLoss, opt: torch.optim.Optimizer, generator: torch.Generator,
               grad_clip: float = 0.0) -> dict:
    """One optimizer step; returns the loss metrics (this worker's values).

    Args:
        ddp_model: the task model (DDP-wrapped) returning ``(s [B, d], candidates, reg)`` with ``train=True``.
        batch: FINETUNE_BATCH tensors ``[B, ...]``.
        task: ``video`` (targets = ``target_video``) or ``comment`` (positives = ``train_comment_cands > 0``).
        task_loss: L_VRT (Eq. 18) or the in-video comment cross-entropy.
        ft_loss: adds eta * L_REG (Eq. 19).
        opt: AdamW.
        generator: draws the L_REG negatives.
        grad_clip: global gradient-norm clip; 0 = off.
    """
    s, cand, reg = ddp_model(batch, train=True)
    if task == "video":
        loss_task, _ = task_loss(s, cand, batch["target_video"])
    else:
        loss_task, _ = task_loss(s, cand, batch["train_comment_cands"] > 0)
    loss, metrics = ft_loss(loss_task, reg, generator)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), grad_clip)
    opt.step()
    return metrics


def _quiet(_line: str) -> None:
    """Progress sink of the ranks that do not print."""


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@dataclass
class FinetuneWorker:
    """What one fine-tune worker built in ``setup``."""

    cfg: FinetuneStageConfig
    """The resolved config, rebuilt from the loop argument."""
    task: str
    """``video`` or ``comment``: one model per task."""
    model: nn.Module
    """The task's scorer (``FinetuneModel`` or a baseline); what rank 0 validates and saves."""
    ddp: nn.Module
    """``model`` wrapped by ``ray.train.torch.prepare_model`` (DDP): what trains."""
    build_args: dict
    """``build_sr_model`` kwargs, saved beside the best weights so evaluation rebuilds the model."""
    store: Path
    """The text-vector store the model reads (aligned, or base for 'w/o Alignment')."""
    opt: torch.optim.Optimizer
    """AdamW over the trainable parameters."""
    task_loss: nn.Module
    """L_VRT (Eq. 18) for video, the in-video comment cross-entropy for comment."""
    ft_loss: FinetuneLoss
    """L_FT = task loss + eta * L_REG (Eq. 19)."""
    gen: torch.Generator
    """Draws the L_REG negatives; seeded per rank."""
    out_dir: Path
    """``run_dir/finetune/<task>``: ``best/`` and ``metrics.jsonl``."""
    t0: float
    """Start time (``timeout_s`` and the logged ``time_s``)."""
    sel: Selection
    """Best-model selection and early stopping on ``finetune.select_metric`` (rank 0)."""


def setup(config: dict) -> FinetuneWorker:
    """Build the task model (aligned SR weights + frozen aligned text table, or random init + base store), DDP,
    AdamW and the losses; rank 0 starts a fresh ``metrics.jsonl``."""
    import ray.train.torch

    cfg = from_dict("finetune", config["cfg"])
    task = config["task"]
    run_dir = Path(cfg.run_dir)
    torch.manual_seed(cfg.seed)  # identical init everywhere (DDP also broadcasts rank 0's weights)
    man = read_manifest(run_dir / "data")
    store = store_dir(run_dir, cfg.init, cfg.text_mlp)
    model, build_args = build_finetune_model(
        cfg, task, num_videos=int(man["num_videos"]), text_table=load_text_table(store),
        align_final=run_dir / "align" / "final", la=dims_of(man)["LA"],
        generator=torch.Generator().manual_seed(cfg.seed))
    # The LSVCR model uses every parameter in both tasks (tested), so DDP skips the per-step search of the autograd
    # graph for unused ones; a baseline may leave a tower unused (DSSM's comment tower in the video task).
    ddp = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": cfg.model != "lsvcr"})
    params = [p for p in ddp.parameters() if p.requires_grad]  # prepare_model wraps `model` without copying them
    opt = make_adamw(params, cfg.optim, "cuda" if torch.cuda.is_available() else "cpu")
    task_loss = VRTLoss(cfg.loss.tau) if task == "video" else CommentRankLoss(cfg.loss.tau)
    w = FinetuneWorker(cfg, task, model, ddp, build_args, store, opt, task_loss, FinetuneLoss.from_config(cfg.loss),
                       torch.Generator().manual_seed(cfg.seed * 1000 + rank()), task_dir(run_dir, task), time.time(),
                       Selection(cfg.select_metric, cfg.patience))
    if rank() == 0:
        w.out_dir.mkdir(parents=True, exist_ok=True)
        (w.out_dir / "metrics.jsonl").write_text("")  # a rerun starts a fresh curve
    return w


def validate(w: FinetuneWorker, epoch: int, train_metrics: dict) -> bool:
    """Rank 0: val metrics, best-model save, log line; returns whether this epoch improved."""
    data_dir = Path(w.cfg.run_dir) / "data"
    res = evaluate_model(w.model, data_dir, "val", w.task, batch_size=VAL_BATCH, subsets=False,
                         progress=f"finetune {w.task} validation epoch {epoch}",
                         progress_every_s=w.cfg.progress_every_s)["metrics"]
    improved = w.sel.update(res)
    if improved:
        save_best(w.out_dir / "best", w.model, w.cfg, w.build_args, {"epoch": epoch, "val": res},
                  manifest_path(data_dir), w.store, kind=w.cfg.model)
    _log(w.out_dir / "metrics.jsonl", {"epoch": epoch, **train_metrics, "val": res, "best": w.sel.best,
                                       "select_metric": w.sel.metric, "time_s": time.time() - w.t0})
    return improved


def train_epoch(w: FinetuneWorker, batches, epoch: int, epoch_steps: int, global_batch: int) -> dict:
    """Train one epoch on this worker's ``batches``; returns the loss means over the workers plus ``steps``,
    ``train_s``, ``first_step_s`` (the first step waits for the epoch's data pipeline to start), ``samples_per_s``
    and ``steady_samples_per_s`` (without the first step). Rank 0 prints progress at most every
    ``finetune.progress_every_s`` seconds: the workers step together (DDP), so its rate is the stage's."""
    cfg = w.cfg
    w.ddp.train()
    sums, steps = {}, 0
    prog = Progress(f"finetune {w.task} epoch {epoch}", epoch_steps, cfg.progress_every_s,
                    log=emit if rank() == 0 else _quiet)
    for batch in batches:
        m = train_step(w.ddp, batch, w.task, w.task_loss, w.ft_loss, w.opt, w.gen, cfg.optim.grad_clip)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
        prog.update(1, global_batch)
    train_s = prog.done()
    first = prog.first_s or 0.0
    out = {k: _mean_across(v / max(steps, 1)) for k, v in sums.items()}
    out.update(steps=steps, train_s=round(train_s, 3), first_step_s=round(first, 3),
               samples_per_s=round(steps * global_batch / max(train_s, 1e-9), 2),
               steady_samples_per_s=round((steps - 1) * global_batch / max(train_s - first, 1e-9), 2)
               if steps > 1 else None)
    return out


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry: reads only ``config`` = ``{"cfg": to_dict(FinetuneStageConfig), "task": str}``.

    Epoch 0 validates the model before fine-tuning (the "did it learn" reference); then every epoch trains on this
    worker's shard, validates on rank 0 and stops on every rank after ``patience`` epochs without a better
    validation ``select_metric`` (or past ``timeout_s``).
    """
    import ray.train

    w = setup(config)
    cfg, ddp = w.cfg, w.ddp
    per_worker = cfg.batch_size // world_size()  # >= 1: the config holds batch_size >= num_workers
    shard = ray.train.get_dataset_shard("train")
    data_dir = Path(cfg.run_dir) / "data"
    transform = FinetuneTransform(str(data_dir), train=True, seed=cfg.seed)
    man = read_manifest(data_dir)
    dims = dims_of(man)
    # streaming_split(equal=True) gives every worker floor(rows / W) rows; drop_last keeps whole batches
    epoch_steps = int(man.get("splits", {}).get("train", {}).get(w.task, 0)) // world_size() // per_worker
    if cfg.max_steps_per_epoch:
        epoch_steps = min(epoch_steps, cfg.max_steps_per_epoch)
    if rank() == 0:  # epoch 0 = the model before fine-tuning (aligned init), the reference for "did it learn"
        ddp.eval()
        validate(w, 0, {"loss": None})
    cache = EpochCache(cfg.ingest.cache_mb)
    for epoch in range(1, cfg.max_epochs + 1):
        batches = epoch_batches(shard, cfg, transform, epoch, per_worker, rank(), dims, cfg.max_steps_per_epoch,
                                cache)
        train_metrics = train_epoch(w, batches, epoch, epoch_steps, per_worker * world_size())
        if not cache.decided and cache.settle(all_true) and rank() == 0:  # every rank decides alike, together
            emit(f"finetune {w.task}: later epochs replay {cache.bytes / 2**20:.1f} MiB per worker from memory")
        stop = False
        if rank() == 0:
            ddp.eval()
            w.sel.record(validate(w, epoch, train_metrics))
            stop = w.sel.stop or (time.time() - w.t0) > cfg.timeout_s
        stop = broadcast_flag(stop)
        ray.train.report({"epoch": epoch, **{k: v for k, v in train_metrics.items() if v is not None},
                          "best_val_" + w.sel.metric: w.sel.best if rank() == 0 else -1.0})
        if stop:
            break


def epoch_batches(shard, cfg: FinetuneStageConfig, transform: FinetuneTransform, epoch: int, batch_size: int,
                  worker_rank: int, dims: dict, max_steps: int = 0, cache: EpochCache | None = None):
    """The training batches of one epoch on this worker: INSTANCE rows in ``ingest.epoch_iterator`` order (the
    prepared global order, windows permuted by ``(seed, epoch, rank)``), then ``FinetuneTransform`` with this
    epoch's popular-comment draw, as int64 tensors ``{key: [B, ...]}`` of ``schema.FINETUNE_BATCH``.

    ``max_steps`` > 0 stops after that many batches and closes the shard's iterator (every worker stops at the same
    step, so the DDP steps stay paired); 0 reads the whole epoch. ``cache``: the worker's ``EpochCache`` (kept
    across epochs; the loop settles it after each epoch)."""
    from lsvcr_dist.data.ingest import epoch_iterator, shuffle_seed

    draw = transform.with_epoch(epoch)
    stream = iter(epoch_iterator(shard, batch_size, epoch, shuffle_seed(cfg), cfg.ingest.shuffle_window, worker_rank,
                                 prefetch_batches=cfg.ingest.prefetch_batches, drop_last=True, device="cpu",
                                 dims=dims, cache=cache))
    try:
        for rows in itertools.islice(stream, max_steps) if max_steps else stream:
            out = draw({k: v.numpy() for k, v in rows.items()})
            yield {k: torch.from_numpy(v) for k, v in out.items()}
    finally:
        close = getattr(stream, "close", None)
        if close is not None:  # a bounded epoch releases the shard's prefetching iterator now, not at collection
            close()


def build_train_dataset(cfg: FinetuneStageConfig, task: str):
    """Streamed INSTANCE rows of one task's train split; ``FinetuneTransform`` runs in the worker, per epoch
    (``epoch_batches``), so each epoch draws its own popular comments without one dataset per epoch."""
    from lsvcr_dist.data.ingest import read_instances, with_block_size

    ds = read_instances(str(Path(cfg.run_dir) / "data"), "train", cfg.ingest.format, tasks=[task])
    return with_block_size(ds, cfg.ingest.block_mb)


def fit_task(cfg: FinetuneStageConfig, task: str) -> dict:
    """Driver side: fine-tune one task with a ``TorchTrainer`` (plain DDP), return the best validation metrics.

    Raises:
        RuntimeError: the trainer failed, or no best model was written.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lsvcr_dist.data.ingest import ingest_data_config
    from lsvcr_dist.train.resources import worker_resources  # fail fast instead of waiting forever

    run_dir = Path(cfg.run_dir).resolve()
    cfg.run_dir = str(run_dir)
    datasets = {"train": build_train_dataset(cfg, task)}
    print_lines_once()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "task": task},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=worker_resources(cfg.scaling, datasets.values())),
        datasets=datasets,
        dataset_config=ingest_data_config(preserve_order=True),  # deterministic split: same rows, same order
        run_config=RunConfig(name=f"finetune_{task}", storage_path=str(run_dir / "finetune" / "ray")),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"fine-tune of task {task} failed: {result.error}")
    meta = task_dir(run_dir, task) / "best" / "meta.json"
    if not meta.is_file():
        raise RuntimeError(f"fine-tune of task {task} wrote no best model ({meta} missing)")
    return json.loads(meta.read_text())
