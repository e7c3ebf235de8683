"""Contrastive pool benchmark: ``contrastive_pool=micro`` vs ``global`` (gradient caching) at several pool sizes.

    python benchmarks/align_throughput.py --config jobs/configs/tiny.yaml --pools 8,32,128 --workers 2 \
        --steps 2 --out pool.json

For a pool of P rows on W workers, both modes train on the same P rows per optimizer step:

* ``micro``: the pool is the micro-batch, so ``micro_batch = P / W`` and no accumulation (memory grows with P);
* ``global``: ``micro_batch`` stays the config's (``--pool-micro``), ``A = P / (micro_batch * W)`` accumulated
  micro-batches, every query against all P rows by ``grad_cache.grad_cache_step`` (one extra no-grad forward).

Speed is reported per wall second and per CPU second of the workers (``time.process_time``, one torch thread per
worker by default): on a box shared with other jobs the wall rate swings with their load, the CPU rate much less.
Every (mode, P) runs in freshly spawned processes (gloo / nccl, no Ray) over the same pre-transformed rows, so the
per-process peak memory (``max_memory_allocated`` on GPU, ``ru_maxrss`` on CPU, which includes the ~constant
imports and weights: ``rss_after_setup`` is reported beside it) belongs to that configuration alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from benchmarks.align_bench import _gather_and_write, _peak_memory_bytes, build_parts
from lsvcr_dist.config import AlignStageConfig


def _split(raw: dict, n: int) -> list[dict]:
    """``raw`` (rows on axis 0) cut into consecutive micro-batches of ``n`` rows."""
    rows = len(raw["task"])
    return [{k: v[i:i + n] for k, v in raw.items()} for i in range(0, rows, n)]


def _one_step(parts, cfg: AlignStageConfig, chunk: dict, first_index: int, device: str) -> dict[str, float]:
    """One optimizer step on ``chunk`` (P / W rows of this rank) in the config's mode; the step's reduced metrics."""
    from lsvcr_dist.train import distributed
    from lsvcr_dist.train.align_step import (micro_step, reduce_metrics, seed_micro_step, text_inputs, to_tensors,
                                             trim_prompts, trim_text)
    from lsvcr_dist.train.grad_cache import Micro, grad_cache_step

    queued = []
    for j, raw in enumerate(_split(chunk, cfg.deepspeed.micro_batch)):
        batch = trim_prompts(to_tensors(raw, device))
        text = trim_text(text_inputs(raw, parts.num_videos, parts.encode, device))
        queued.append(Micro(first_index + j, batch, text))
    if cfg.contrastive_pool == "global":
        metrics = grad_cache_step(parts.engine, parts.loss_fn, queued, cfg.seed, cfg.rand_pos)
    else:
        metrics = []
        for m in queued:
            seed_micro_step(cfg.seed, distributed.rank(), m.index)
            metrics.append(micro_step(parts.engine, parts.loss_fn, m.batch, m.text, cfg.rand_pos))
    return reduce_metrics(metrics, cfg.loss.lm_reduction, device)


def pool_worker(rank: int, world: int, port: int, cfg_dict: dict, data_dir: str, chunks: list[list[dict]],
                out: str, threads: int) -> None:
    """``mp.spawn`` entry: build the engine, one untimed step, then one timed step per remaining chunk."""
    import torch.distributed as dist

    from lsvcr_dist.config import from_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    if threads:
        torch.set_num_threads(threads)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        cfg = from_dict("align", cfg_dict)
        device = "cuda" if cuda else "cpu"
        mine = chunks[rank]
        parts = build_parts(cfg, data_dir, world, device, len(mine), reference=False)
        setup_mem = _peak_memory_bytes(cuda)
        accum, losses, samples, t0 = cfg.grad_accum_steps(world), {"loss": [], "loss_sr": [], "loss_ssc": []}, 0, 0.0
        for i, chunk in enumerate(mine):
            if i == 1:  # the first step is warm-up (allocator, kernels, DeepSpeed buffers)
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
            reduced = _one_step(parts, cfg, chunk, i * accum, device)
            for k, v in losses.items():
                v.append(reduced[k])
            samples += int(reduced["samples"]) if i else 0
        if cuda:
            torch.cuda.synchronize()
        cpu_s = time.process_time() - c0  # before the barrier: this rank's own work, not its wait for the others
        dist.barrier()
        elapsed = time.perf_counter() - t0
        _gather_and_write({"rank": rank, "elapsed_s": elapsed, "cpu_s": cpu_s, "samples": samples, "losses": losses,
                           "peak_memory_bytes": _peak_memory_bytes(cuda), "memory_after_setup_bytes": setup_mem},
                          out)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Seen on the loaded 2-core box: rank 0 spinning for minutes in gloo's destroy_process_group after every result
    # was written. Nothing is left to flush, so leave without the teardown.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pool(cfg: AlignStageConfig, manifest: dict, pool: int, world: int, mode: str, micro: int, steps: int,
             threads: int, tmp: Path) -> dict:
    """One (mode, pool) measurement in ``world`` fresh processes; the same rows for both modes."""
    from benchmarks.align_throughput import reference_batches
    from lsvcr_dist.config import to_dict

    mb = pool // world if mode == "micro" else micro
    scaling = dataclasses.replace(cfg.scaling, num_workers=world)
    # replace() re-validates: a pool that does not split into micro-batches over the workers is refused here
    run_cfg = dataclasses.replace(cfg, global_batch=pool, contrastive_pool=mode, scaling=scaling,
                                  deepspeed=dataclasses.replace(cfg.deepspeed, micro_batch=mb))
    rows_cfg = dataclasses.replace(run_cfg, deepspeed=dataclasses.replace(cfg.deepspeed, micro_batch=pool // world))
    chunks = reference_batches(rows_cfg, manifest, world, steps + 1)  # [rank][step] of pool / world rows
    out = tmp / f"{mode}_p{pool}.json"
    mp.spawn(pool_worker, nprocs=world, join=True,
             args=(world, _free_port(), to_dict(run_cfg), str(Path(cfg.run_dir) / "data"), chunks, str(out),
                   threads))
    ranks = json.loads(out.read_text())
    elapsed = max(r["elapsed_s"] for r in ranks)
    return {"mode": mode, "pool": pool, "micro_batch": mb, "accum": run_cfg.grad_accum_steps(world),
            "timed_steps": steps, "samples_per_s": sum(r["samples"] for r in ranks) / elapsed,
            "samples_per_cpu_s": sum(r["samples"] for r in ranks) / sum(r["cpu_s"] for r in ranks),
            "peak_memory_mib_per_worker": [r["peak_memory_bytes"] / 2**20 for r in ranks],
            "memory_after_setup_mib_per_worker": [r["memory_after_setup_bytes"] / 2**20 for r in ranks],
            "losses": ranks[0]["losses"]}


def pool_main(args: argparse.Namespace, overrides: list[str], cfg: AlignStageConfig, manifest: dict,
              command: str) -> dict:
    """``--pools P1,P2,..``: micro vs global at every pool, side by side; ratios global / micro per pool."""
    pools = [int(p) for p in args.pools.split(",") if p.strip()]
    world = [int(x) for x in args.workers.split(",") if x.strip()][-1]
    micro = args.pool_micro or cfg.deepspeed.micro_batch
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    tmp = Path(tempfile.mkdtemp(prefix="lsvcr-pool-"))
    rows, load_before = [], os.getloadavg()[0]
    for pool in pools:
        row, steps = {}, max(1, args.steps * max(pools) // pool)  # every pool times the same number of samples
        for mode in ("micro", "global"):
            print(f"[bench] pool {pool}: {mode}", flush=True)
            row[mode] = run_pool(cfg, manifest, pool, world, mode, micro, steps, threads, tmp)
        g, m = row["global"], row["micro"]
        row["speed_global_over_micro"] = g["samples_per_s"] / m["samples_per_s"]
        row["cpu_speed_global_over_micro"] = g["samples_per_cpu_s"] / m["samples_per_cpu_s"]
        row["peak_memory_global_over_micro"] = float(np.max(g["peak_memory_mib_per_worker"])
                                                     / np.max(m["peak_memory_mib_per_worker"]))
        print(f"[bench] pool {pool}: micro {m['samples_per_s']:.2f} samples/s ({m['samples_per_cpu_s']:.2f} per CPU s)"
              f" {max(m['peak_memory_mib_per_worker']):.0f} MiB, global {g['samples_per_s']:.2f} samples/s "
              f"({g['samples_per_cpu_s']:.2f} per CPU s) {max(g['peak_memory_mib_per_worker']):.0f} MiB", flush=True)
        rows.append({"pool": pool, **row})
    return {"pools": rows, "workers": world, "global_micro_batch": micro, "timed_samples": args.steps * max(pools),
            "threads_per_worker": threads, "model": args.model, "device": "cuda" if torch.cuda.is_available()
            else "cpu", "load_avg_1m": [load_before, os.getloadavg()[0]], "command": command}
