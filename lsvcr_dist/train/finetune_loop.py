"""Recommendation-oriented fine-tuning (Section 3.4) on Ray Train with plain DDP: SR model only, no LLM.

One model per task (public code): the driver (``fit_task``) builds the streamed training dataset
(``read_instances(..., tasks=[task])`` + ``map_batches(FinetuneTransform)``) and a ``TorchTrainer``; every worker
runs ``train_loop_per_worker``: builds the task model (aligned SR weights + frozen aligned text table, or random init
+ base store for 'w/o Alignment'), wraps it with ``ray.train.torch.prepare_model`` (DDP), and trains with
L_FT = L_VRT + eta * L_REG (video, Eq. 17-19) or the in-video comment cross-entropy (+ eta * L_REG). After every
epoch rank 0 validates on the val split (4.1.3 candidates), keeps the best model by NDCG@10 in
``run_dir/finetune/<task>/best/`` and appends a line to ``run_dir/finetune/<task>/metrics.jsonl``; all ranks stop
together after ``patience`` epochs without improvement.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lsvcr_dist.config import from_dict, to_dict
from lsvcr_dist.data.manifest import dims_of, manifest_path, read_manifest
from lsvcr_dist.evaluate import evaluate_model
from lsvcr_dist.losses import CommentRankLoss, FinetuneLoss, VRTLoss
from lsvcr_dist.train.engine import make_adamw
from lsvcr_dist.train.ft_setup import build_finetune_model, load_text_table, save_best, store_dir

SELECT_METRIC = "ndcg@10"


def task_dir(run_dir: str | Path, task: str) -> Path:
    """``run_dir/finetune/<task>``."""
    return Path(run_dir) / "finetune" / task


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean_across(x: float) -> float:
    rank, world = _world()
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


def _broadcast_flag(flag: bool) -> bool:
    rank, world = _world()
    if world == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, 0)
    return bool(t.item())


def train_step(ddp_model, batch: dict[str, torch.Tensor], task: str, task_loss, ft_loss, opt,
               generator: torch.Generator, grad_clip: float = 0.0) -> dict:
    """One optimizer step; returns the loss metrics (local values)."""
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


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry: reads only ``config`` = ``{"cfg": to_dict(FinetuneStageConfig), "task": str}``."""
    import ray.train
    import ray.train.torch

    cfg = from_dict("finetune", config["cfg"])
    task = config["task"]
    run_dir, data_dir = Path(cfg.run_dir), Path(cfg.run_dir) / "data"
    rank, world = _world()
    torch.manual_seed(cfg.seed)  # identical init everywhere (DDP also broadcasts rank 0's weights)
    man = read_manifest(data_dir)
    dims = dims_of(man)
    store = store_dir(run_dir, cfg.init)
    model, build_args = build_finetune_model(
        cfg, task, num_videos=int(man["num_videos"]), text_table=load_text_table(store),
        align_final=run_dir / "align" / "final", la=dims["LA"],
        generator=torch.Generator().manual_seed(cfg.seed))
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    core = model  # prepare_model wraps `model` without copying its parameters
    params = [p for p in ddp.parameters() if p.requires_grad]
    o = cfg.optim
    opt = make_adamw(params, o, "cuda" if torch.cuda.is_available() else "cpu")
    task_loss = VRTLoss(cfg.loss.tau) if task == "video" else CommentRankLoss(cfg.loss.tau)
    ft_loss = FinetuneLoss.from_config(cfg.loss)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    out_dir = task_dir(run_dir, task)
    log_path = out_dir / "metrics.jsonl"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")  # a rerun starts a fresh curve
    per_worker = max(1, cfg.batch_size // world)
    shard = ray.train.get_dataset_shard("train")
    t0 = time.time()

    def validate(epoch: int, train_metrics: dict) -> bool:
        """Rank 0: val metrics, best-model save, log line; returns whether this epoch improved."""
        res = evaluate_model(core, data_dir, "val", task, batch_size=256, subsets=False)["metrics"]
        nonlocal best
        improved = res[SELECT_METRIC] > best
        if improved:
            best = res[SELECT_METRIC]
            save_best(out_dir / "best", core, cfg, build_args, {"epoch": epoch, "val": res},
                      manifest_path(data_dir), store, kind=cfg.model)
        _log(log_path, {"epoch": epoch, **train_metrics, "val": res, "best": best, "time_s": time.time() - t0})
        return improved

    best, bad = -1.0, 0
    if rank == 0:  # epoch 0 = the model before fine-tuning (aligned init), the reference for "did it learn"
        ddp.eval()
        validate(0, {"loss": None})
    for epoch in range(1, cfg.max_epochs + 1):
        ddp.train()
        sums, steps = {}, 0
        it = shard.iter_torch_batches(batch_size=per_worker, dtypes=torch.int64, drop_last=True,
                                      local_shuffle_buffer_size=cfg.ingest.local_shuffle_buffer or None,
                                      local_shuffle_seed=cfg.ingest.shuffle_seed + epoch
                                      if cfg.ingest.local_shuffle_buffer else None,
                                      prefetch_batches=cfg.ingest.prefetch_batches)
        for batch in it:
            m = train_step(ddp, batch, task, task_loss, ft_loss, opt, gen, o.grad_clip)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
        train_metrics = {k: _mean_across(v / max(steps, 1)) for k, v in sums.items()}
        train_metrics["steps"] = steps
        stop = False
        if rank == 0:
            ddp.eval()
            bad = 0 if validate(epoch, train_metrics) else bad + 1
            stop = bad >= cfg.patience or (time.time() - t0) > cfg.timeout_s
        stop = _broadcast_flag(stop)
        ray.train.report({"epoch": epoch, **{k: v for k, v in train_metrics.items() if v is not None},
                          "best_val_" + SELECT_METRIC: best if rank == 0 else -1.0})
        if stop:
            break


def build_train_dataset(cfg, task: str):
    """Streamed training rows of one task with the training-mode FinetuneTransform applied."""
    import ray.data

    from lsvcr_dist.data.ft_transforms import FinetuneTransform
    from lsvcr_dist.data.ingest import read_instances

    data_dir = str(Path(cfg.run_dir) / "data")
    ds = read_instances(data_dir, "train", cfg.ingest.format, tasks=[task])
    return ds.map_batches(FinetuneTransform, fn_constructor_kwargs=dict(data_dir=data_dir, train=True, seed=cfg.seed),
                          batch_format="pyarrow", batch_size=256, compute=ray.data.ActorPoolStrategy(size=1),
                          num_cpus=0.5)


def fit_task(cfg, task: str) -> dict:
    """Driver side: fine-tune one task with a ``TorchTrainer`` (plain DDP), return the best validation metrics.

    Raises:
        RuntimeError: the trainer failed, or no best model was written.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lsvcr_dist.train.resources import worker_resources  # fail fast instead of waiting forever

    if cfg.model != "lsvcr" and cfg.init != "scratch":
        raise ValueError(f"finetune.model={cfg.model} is a baseline: set finetune.init=scratch (it reads the base store)")
    if cfg.optim.schedule != "constant" or cfg.optim.warmup_ratio > 0:
        raise ValueError("finetune.optim: only a constant learning rate without warm-up is implemented (the public"
                         f" code's); got schedule={cfg.optim.schedule!r}, warmup_ratio={cfg.optim.warmup_ratio}")
    run_dir = Path(cfg.run_dir).resolve()
    cfg.run_dir = str(run_dir)
    datasets = {"train": build_train_dataset(cfg, task)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "task": task},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=worker_resources(cfg.scaling, datasets.values())),
        datasets=datasets,
        run_config=RunConfig(name=f"finetune_{task}", storage_path=str(run_dir / "finetune" / "ray")),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"fine-tune of task {task} failed: {result.error}")
    meta = task_dir(run_dir, task) / "best" / "meta.json"
    if not meta.is_file():
        raise RuntimeError(f"fine-tune of task {task} wrote no best model ({meta} missing)")
    return json.loads(meta.read_text())
