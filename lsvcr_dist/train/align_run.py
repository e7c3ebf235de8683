"""Driver side of the alignment stage: validate prepared data, build the streamed dataset, build the TorchTrainer.

Used by ``jobs/align.py`` and by the Ray integration tests (which may pass a row-limited dataset). Runs in the
driver only; the workers run ``train/loop.py``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from lsvcr_dist.config import AlignStageConfig, to_dict
from lsvcr_dist.train.checkpoint import find_latest_complete, retire_stale_snapshot

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    from ray.data import Dataset
    from ray.train import Result, RunConfig
    from ray.train.torch import TorchTrainer

    from lsvcr_dist.train.retry import RetryingTrainer

RUN_NAME = "checkpoints"


class StreamAlignTransform:
    """``AlignTransform`` over batches as ``read_instances`` streams them.

    ``read_instances`` ships ``comment_hist_comments`` flattened to ``[L*K]`` (pyarrow corrupts nested fixed lists in
    Ray's take/filter kernels); ``ingest.to_numpy_batch`` restores ``[B, L, K]`` before the transform runs.
    """

    def __init__(self, **kwargs) -> None:
        from lsvcr_dist.data.transforms import AlignTransform

        self.inner = AlignTransform(**kwargs)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        from lsvcr_dist.data.ingest import to_numpy_batch

        return self.inner(to_numpy_batch(batch, self.inner.dims))


def validate_prepared(cfg: AlignStageConfig) -> dict:
    """Check the data manifest and every train shard's schema on the driver, before any worker starts.

    Returns:
        The data manifest.

    Raises:
        FileNotFoundError / ManifestError / ShardError: naming the file (and column) at fault.
        ManifestError is raised for an unknown format, too.
    """
    from lsvcr_dist.data.ingest import validate_shards

    data_dir = Path(cfg.run_dir) / "data"
    if not (data_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{data_dir / 'manifest.json'} does not exist: run jobs/prepare_data.py first")
    manifest = validate_shards(data_dir, "train", cfg.ingest.format)
    if cfg.text_source == "store" and not (Path(cfg.run_dir) / "embeddings" / "base" / "manifest.json").is_file():
        raise FileNotFoundError(f"text_source=store needs {Path(cfg.run_dir) / 'embeddings/base'}: run encode_text.py")
    from lsvcr_dist.models.align_model import base_text_norm

    base_text_norm(cfg)  # llm.text_norm=standardize: the base store's statistics exist, checked before any worker
    return manifest


def build_align_datasets(cfg: AlignStageConfig, instances: Dataset | None = None) -> dict[str, Dataset]:
    """``{dataset_name: dataset}``: one lazy ALIGN dataset per ComDiv draw (``ingest.epoch_draws``).

    Draw k runs ``AlignTransform(epoch=k)``, so epoch e of training sees new diversified comments and popular-
    comment targets whenever ``e % epoch_draws`` changes; each draw gets its own deterministic streaming split.
    """
    from lsvcr_dist.train.loop import dataset_name

    n = cfg.ingest.epoch_draws
    return {dataset_name(k, n): build_align_dataset(cfg, instances, draw=k) for k in range(n)}


def build_align_dataset(cfg: AlignStageConfig, instances: Dataset | None = None, draw: int = 0) -> Dataset:
    """Train INSTANCE shards -> ``map_batches(AlignTransform)`` -> ALIGN_BATCH rows (a lazy ``ray.data.Dataset``).

    Args:
        cfg: alignment config (``ingest``, ``llm``, ``comdiv``, ``seed``).
        instances: an INSTANCE-row dataset to transform instead of the whole train split (tests pick rows).
        draw: the transform's epoch seed (ComDiv / popular-comment draw; see ``build_align_datasets``).
    """
    import ray.data

    from lsvcr_dist.data.ingest import read_instances, with_block_size

    data_dir = Path(cfg.run_dir) / "data"
    # validate=False: validate_prepared already checked every shard on the driver.
    ds = read_instances(data_dir, "train", fmt=cfg.ingest.format, validate=False) if instances is None else instances
    return with_block_size(ds.map_batches(
        StreamAlignTransform,
        fn_constructor_kwargs=dict(data_dir=str(data_dir), llm=asdict(cfg.llm), comdiv=asdict(cfg.comdiv),
                                   seed=cfg.seed, epoch=draw),
        batch_format="pyarrow", batch_size=64, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5,
    ), cfg.ingest.block_mb)


def run_name(cfg: AlignStageConfig) -> str:
    """Ray run name: fixed (so a new submission resumes) unless ``checkpoint.resume`` is off."""
    return RUN_NAME if cfg.checkpoint.resume else f"{RUN_NAME}-{time.strftime('%Y%m%d-%H%M%S')}"


def align_trainer(cfg: AlignStageConfig, loop: Callable[[dict], None], loop_config: dict,
                  datasets: dict[str, Dataset], run_config: RunConfig,
                  resources: dict[str, float] | None = None) -> TorchTrainer:
    """A ``TorchTrainer`` for alignment-shaped work: ``cfg``'s workers and backend, deterministic dataset split.

    The stage (``build_trainer``) and the throughput benchmark (its own timed ``loop``) both build their trainer here.

    Args:
        cfg: resolved config (``scaling``, ``timeout_s``).
        loop: ``train_loop_per_worker`` run by every worker.
        loop_config: its argument (plain values only).
        datasets: ``{name: ray.data.Dataset}``, each split across the workers by Ray Train.
        run_config: ``ray.train.RunConfig`` (storage, name, failure and checkpoint policy).
        resources: per-worker resources (``train/resources.worker_resources``); default ``scaling.cpus_per_worker``
            CPUs.
    """
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lsvcr_dist.data.ingest import ingest_data_config
    from lsvcr_dist.progress import print_lines_once

    sc = cfg.scaling
    print_lines_once()
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        # timeout_s bounds every collective: a hung peer fails the attempt instead of hanging the job.
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo", timeout_s=cfg.timeout_s),
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                     resources_per_worker=resources or {"CPU": sc.cpus_per_worker}),
        datasets=datasets,
        dataset_config=ingest_data_config(preserve_order=True),  # deterministic split: reproducible resumes
        run_config=run_config,
    )


def build_trainer(cfg: AlignStageConfig, dataset: Dataset | dict[str, Dataset], resume_from: str | None = None,
                  fault_inject: str | None = None) -> RetryingTrainer:
    """The stage's trainer: ``fit()`` runs a ``TorchTrainer`` (DeepSpeed inside ``train_loop_per_worker``).

    Before anything runs, the workers' resources are fitted to the connected cluster next to Ray Data's needs, or
    ``ClusterResourceError`` says what is missing (``train/resources.py``). ``fit()`` retries from the newest
    complete checkpoint after a worker failure, up to ``checkpoint.max_failures`` failures in a row without
    checkpoint progress between them (``train/retry.py``).

    Args:
        cfg: resolved config.
        dataset: ``build_align_datasets``'s dict (or one ALIGN_BATCH dataset, named ``train``), each split
            across workers by Ray Train.
        resume_from: a complete checkpoint folder to resume from (``find_latest_complete``), or None.
        fault_inject: ``step:N`` fault for the restart tests (default: the driver's ``LSVCR_FAULT_INJECT``), passed
            in the loop config because driver environment variables do not reach already-started Ray workers.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from lsvcr_dist.train.loop import FAULT_ENV, train_loop_per_worker
    from lsvcr_dist.train.resources import worker_resources
    from lsvcr_dist.train.retry import RetryingTrainer

    align_dir = (Path(cfg.run_dir) / "align").resolve()
    align_dir.mkdir(parents=True, exist_ok=True)
    fault = os.environ.get(FAULT_ENV, "") if fault_inject is None else fault_inject
    datasets = dataset if isinstance(dataset, dict) else {"train": dataset}
    resources = worker_resources(cfg.scaling, datasets.values())
    name = run_name(cfg)

    def attempt(resume: str | None) -> TorchTrainer:
        loop_cfg = to_dict(cfg)
        if resume:
            loop_cfg["_resume_from"] = str(resume)
        if fault:
            loop_cfg["_fault_inject"] = fault
        run_config = RunConfig(
            name=name, storage_path=str(align_dir),
            failure_config=FailureConfig(max_failures=0),  # RetryingTrainer owns the worker-failure budget
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
        )
        return align_trainer(cfg, train_loop_per_worker, loop_cfg, datasets, run_config, resources)

    return RetryingTrainer(attempt, lambda: newest_complete(align_dir / name), cfg.checkpoint.max_failures,
                           resume_from=resume_from)


def newest_complete(run_folder: Path) -> tuple[str | None, int]:
    """``(path, step)`` of the newest intact checkpoint in one Ray run folder, ``(None, -1)`` if there is none (a
    damaged one is skipped with a warning naming the bad file: ``checkpoint.pick_resume``)."""
    from lsvcr_dist.train.checkpoint import COMPLETE, pick_resume, read_state

    path = pick_resume([m.parent for m in Path(run_folder).glob(f"*/{COMPLETE}")])
    return (str(path), int(read_state(path)["step"])) if path else (None, -1)


def run_align(cfg: AlignStageConfig, instances: Dataset | None = None, fault_inject: str | None = None,
              log: Callable[[str], None] = lambda _: None) -> Result:
    """Validate, build the dataset and trainer, resume if a complete checkpoint exists, ``fit()``.

    What ``jobs/align.py`` runs and the Ray tests test. Needs an initialized Ray (the caller's ``ray.init``).

    Args:
        cfg: resolved config.
        instances: optional INSTANCE-row dataset (default: the whole train split).
        fault_inject: ``step:N`` fault for the restart tests (see ``build_trainer``).
        log: progress printer (the resume point).

    Returns:
        The Ray ``Result``.
    """
    validate_prepared(cfg)
    ds = build_align_datasets(cfg, instances)
    resume = None
    if cfg.checkpoint.resume:
        resume = find_latest_complete(Path(cfg.run_dir) / "align")
        stale = retire_stale_snapshot(Path(cfg.run_dir) / "align" / RUN_NAME)
        if stale:
            log(f"align: Ray's checkpoint record names {', '.join(stale[1])}, which no longer exist: moved it to "
                f"{stale[0]}")
    if resume:
        log(f"align: resuming from {resume}")
    return build_trainer(cfg, ds, str(resume) if resume else None, fault_inject).fit()
