"""Fine-tune throughput: the Ray Train stage (``fit_task``) vs a plain single-process PyTorch loop, same run.

    python benchmarks/finetune_throughput.py --config jobs/configs/tiny.yaml --source /tmp/tiny --out /tmp/ft_tp.json
    python benchmarks/finetune_throughput.py --config jobs/configs/tiny.yaml --source /tmp/tiny --out f.json \
        --tasks video --epochs 2 finetune.batch_size=256

``--source`` is a run that finished alignment and the aligned encode (``jobs/pipeline.py``): its ``data/``,
``embeddings/`` and ``align/final`` are linked (not copied) into a scratch run, so the benchmark never writes into
it. For every task:

1. plain loop: one process, ``--threads`` torch threads, the same model (``build_finetune_model``, same init), the
   same loss, optimizer and global batch, over the same training rows (pyarrow reads + the same training
   ``FinetuneTransform``), timed per step as data (read + transform) and compute (forward, backward, step);
2. the stage: ``finetune_loop.fit_task`` (Ray Data -> Ray Train DDP workers) for ``--epochs`` epochs; the workers'
   own per-epoch training time and samples/s (``metrics.jsonl``: ``train_s``, ``samples_per_s``), validation apart.

Reported per task: samples/s of each, per core (the stage's cores = workers x torch threads per worker), and
``ratio_per_core`` = plain per core / stage per core (1.0 = the stage costs nothing over the loop); the plain loop
runs right before and right after the stage (the mean is used: the load of a shared box drifts). The stage's epoch
time includes its first step, which waits for the epoch's Ray Data pipeline to start (``first_step_s``);
``ratio_per_core_steady`` leaves that step out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))

from _cli import init_ray, parse  # noqa: E402 - also puts ROOT on sys.path

import torch  # noqa: E402

from lsvcr_dist.config import FinetuneStageConfig  # noqa: E402


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="a run with data/, embeddings/ and align/final (read only)")
    p.add_argument("--out", required=True, help="result JSON path")
    p.add_argument("--tasks", default="video,comment", help="comma-separated tasks")
    p.add_argument("--epochs", type=int, default=2, help="stage epochs (the first includes the data start-up)")
    p.add_argument("--steps", type=int, default=30, help="timed plain-loop steps per task")
    p.add_argument("--warmup", type=int, default=3, help="untimed plain-loop steps per task")
    p.add_argument("--threads", type=int, default=1, help="plain loop torch threads (= cores it uses)")


def scratch_run(source: Path, dest: Path, init: str) -> Path:
    """A run folder whose inputs are links into ``source`` (outputs go to ``dest/finetune`` only)."""
    need = [source / "data", source / "embeddings", source / "align" / "final"]
    for p in need:
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: --source must be a run past alignment and encoding "
                                    "(python jobs/pipeline.py --config jobs/configs/tiny.yaml run_dir=...)")
    (dest / "align").mkdir(parents=True)
    os.symlink(source / "data", dest / "data")
    os.symlink(source / "embeddings", dest / "embeddings")
    os.symlink(source / "align" / "final", dest / "align" / "final")
    return dest


def plain_loop(cfg: FinetuneStageConfig, task: str, steps: int, warmup: int, threads: int) -> dict:
    """Single-process training of the stage's model on the stage's rows; seconds split into data and compute."""
    from lsvcr_dist.data.manifest import dims_of, read_manifest
    from lsvcr_dist.evaluate import iter_split
    from lsvcr_dist.finetuned import build_finetune_model, load_text_table, store_dir
    from lsvcr_dist.losses import CommentRankLoss, FinetuneLoss, VRTLoss
    from lsvcr_dist.train.finetune_loop import train_step

    torch.set_num_threads(threads)
    run = Path(cfg.run_dir)
    man = read_manifest(run / "data")
    torch.manual_seed(cfg.seed)
    model, _ = build_finetune_model(cfg, task, num_videos=int(man["num_videos"]),
                                    text_table=load_text_table(store_dir(run, cfg.init, cfg.text_mlp)),
                                    align_final=run / "align" / "final", la=dims_of(man)["LA"],
                                    generator=torch.Generator().manual_seed(cfg.seed))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                            weight_decay=cfg.optim.weight_decay)
    task_loss = VRTLoss(cfg.loss.tau) if task == "video" else CommentRankLoss(cfg.loss.tau)
    ft_loss, gen = FinetuneLoss.from_config(cfg.loss), torch.Generator().manual_seed(cfg.seed)

    def batches():
        while True:  # epochs over the split, full batches only (the stage drops the last partial one)
            for b in iter_split(run / "data", "train", task, cfg.batch_size, train_mode=True, seed=cfg.seed):
                if len(b["task"]) == cfg.batch_size:
                    yield b

    it = batches()
    data_s = compute_s = 0.0
    losses = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        m = train_step(model, batch, task, task_loss, ft_loss, opt, gen, cfg.optim.grad_clip)
        t2 = time.perf_counter()
        if i >= warmup:
            data_s, compute_s = data_s + t1 - t0, compute_s + t2 - t1
            losses.append(m["loss"])
    total = data_s + compute_s
    rate = steps * cfg.batch_size / total
    return {"steps": steps, "batch": cfg.batch_size, "threads": threads, "cores": threads, "data_s": round(data_s, 3),
            "compute_s": round(compute_s, 3), "samples_per_s": round(rate, 2), "per_core": round(rate / threads, 2),
            "loss_first": losses[0], "loss_last": losses[-1]}


def stage(cfg: FinetuneStageConfig, task: str, epochs: int) -> dict:
    """``fit_task`` for ``epochs`` epochs; the workers' per-epoch training time from ``metrics.jsonl``."""
    from lsvcr_dist.train.finetune_loop import fit_task, task_dir

    cfg.max_epochs, cfg.patience = epochs, epochs + 1
    t0 = time.perf_counter()
    fit_task(cfg, task)
    wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in (task_dir(cfg.run_dir, task) / "metrics.jsonl").read_text().splitlines()]
    ep = [x for x in lines if x["epoch"] >= 1]
    cores = cfg.scaling.num_workers * max(1, int(cfg.scaling.cpus_per_worker))  # Ray: OMP threads = CPUs, >= 1
    keys = ("epoch", "steps", "train_s", "first_step_s", "samples_per_s", "steady_samples_per_s", "loss")
    best = max(x["samples_per_s"] for x in ep)
    steady = max(x.get("steady_samples_per_s") or 0.0 for x in ep)
    return {"workers": cfg.scaling.num_workers, "cores": cores, "wall_s": round(wall, 1),
            "epochs": [{k: x.get(k) for k in keys} for x in ep],
            "samples_per_s": best, "per_core": round(best / cores, 2),
            "steady_samples_per_s": steady, "steady_per_core": round(steady / cores, 2),
            "time_s_total": round(lines[-1]["time_s"], 1)}


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse("finetune", __doc__.splitlines()[0], argv, extra=_extra)
    out: dict = {"date": datetime.date.today().isoformat(), "host_cpus": os.cpu_count(), "argv": sys.argv[1:],
                 "batch": cfg.batch_size, "loadavg_start": os.getloadavg(), "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="ft_tp_") as tmp:
        cfg.run_dir = str(scratch_run(Path(args.source).resolve(), Path(tmp) / "run", cfg.init))
        init_ray(num_cpus=4)
        for task in args.tasks.split(","):
            # plain loop before and after the stage: on a shared box the load drifts, the mean of both brackets it
            before = plain_loop(cfg, task, args.steps, args.warmup, args.threads)
            print(f"plain {task} (before): {before}", flush=True)
            st = stage(dataclasses.replace(cfg), task, args.epochs)
            print(f"stage {task}: {st}", flush=True)
            after = plain_loop(cfg, task, args.steps, args.warmup, args.threads)
            print(f"plain {task} (after): {after}", flush=True)
            plain = round((before["per_core"] + after["per_core"]) / 2, 2)
            out["tasks"][task] = {"plain_before": before, "plain_after": after, "plain_per_core": plain, "stage": st,
                                  "ratio_per_core": round(plain / st["per_core"], 2),
                                  "ratio_per_core_steady": round(plain / max(st["steady_per_core"], 1e-9), 2)}
        out["loadavg_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({t: {k: v[k] for k in ("plain_per_core", "ratio_per_core", "ratio_per_core_steady")}
                      for t, v in out["tasks"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
