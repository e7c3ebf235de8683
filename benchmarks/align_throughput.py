"""Alignment-step throughput: ours (Ray Data -> Ray Train + DeepSpeed) vs the public code's recipe, side by side.

    python benchmarks/align_throughput.py --config jobs/configs/tiny.yaml --out /tmp/align_tp.json
    python benchmarks/align_throughput.py --config jobs/configs/tiny.yaml --out f.json --workers 1,2 --threads 1
    python benchmarks/align_throughput.py --config jobs/configs/tiny.yaml --out ab.json --ab 6   # paired A/B
    # GPU (bf16, ChatGLM3-6B shape, random weights); dotted overrides go LAST:
    python benchmarks/align_throughput.py --config jobs/configs/tiny.yaml --model chatglm3-6b-shaped \
        --workers 1 --warmup 3 --steps 10 --out gpu.json scaling.use_gpu=true deepspeed.micro_batch=2 \
        llm.gradient_checkpointing=true

Once: the Ray Data ingest rate (the same transformed dataset iterated by the driver without a model). For every
worker count W (weak scaling: fixed micro batch per worker, global batch = micro x W so every micro-step is an
optimizer step): (1) ours: ``align_bench.ray_bench_worker`` in the stage's ``TorchTrainer``, (2) the reference
recipe: ``reference_bench_worker`` under ``torch.multiprocessing.spawn`` with in-memory pre-transformed batches, local
negatives, padded prompts, full-vocabulary logits, ZeRO-2. Writes one JSON (top level = ours at the largest W) and
a PNG of the scaling. Tokens = real prompt tokens (instruction + target + eos) + real text-encoder tokens.
Generates and prepares the config's tiny data into ``run_dir`` first when ``run_dir/data`` is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))

from _cli import init_ray, parse  # noqa: E402 - also puts ROOT on sys.path: `benchmarks` is a package there

from benchmarks.align_bench import reference_bench_worker, summarize  # noqa: E402
from lsvcr_dist.config import AlignStageConfig  # noqa: E402

if TYPE_CHECKING:
    from ray.data import Dataset

CHATGLM3_6B_SHAPED = ["llm.kind=tiny_glm", "llm.hidden_size=4096", "llm.num_layers=28", "llm.num_heads=32",
                      "llm.num_kv_heads=2", "llm.ffn_size=13696", "llm.vocab_size=65024"]


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="result JSON path (a PNG of the scaling is written beside it)")
    p.add_argument("--warmup", type=int, default=2, help="untimed micro-steps per run")
    p.add_argument("--steps", type=int, default=8, help="timed micro-steps per run")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (weak scaling)")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the public code's recipe side by side")
    p.add_argument("--trim", action=argparse.BooleanOptionalAction, default=True,
                   help="ours: trim prompts/texts to the longest real length of the micro-batch")
    p.add_argument("--model", choices=["config", "tiny", "chatglm3-6b-shaped"], default="config",
                   help="config/tiny: the config's llm block (a real checkpoint via llm.kind=hf llm.path=...); "
                        "chatglm3-6b-shaped: random GLM with ChatGLM3-6B's shapes")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="per-device peak; 0 = H100/H200 bf16 989.4 by name on CUDA, fp32 matmul probe on CPU")
    p.add_argument("--ingest-rows", type=int, default=256,
                   help="rows of the ingest-rate measurement (at least the run's own rows)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker, both recipes (0 = CPU cores // workers); 1 = one core per worker")
    p.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                   help="instead: paired A/B of the speed-work items (trim, target_logits, sdpa, grad_checkpointing, "
                        "fused_adamw) "
                        "in one process for ROUNDS rounds")
    p.add_argument("--plot", default="", help="PNG path (default: --out with .png)")
    p.add_argument("--pools", default="", help="instead: contrastive_pool micro vs global at these pool sizes "
                   "(benchmarks/align_pool.py), on the last --workers count; --steps timed optimizer steps at the "
                   "largest pool, as many samples at the others")
    p.add_argument("--pool-micro", type=int, default=0, help="micro batch of the global mode (0 = the config's)")


def _init_ray(num_cpus: int, attempts: int = 3) -> None:
    """``init_ray`` with retries: on an overloaded shared box the local node can time out while starting."""
    import ray

    for i in range(attempts):
        try:
            init_ray(num_cpus=num_cpus)
            return
        except Exception as e:  # Ray raises a bare Exception for a node start time-out
            if i == attempts - 1 or "timed out" not in str(e):
                raise
            print(f"[bench] ray.init failed ({e}); retrying", flush=True)
            ray.shutdown()
            time.sleep(5)


def ensure_data(config: str, overrides: list[str], run_dir: Path) -> None:
    """Generate + prepare the preset's data into ``run_dir`` when ``run_dir/data/manifest.json`` is missing."""
    from lsvcr_dist.config import load_config, overrides_for

    if (run_dir / "data" / "manifest.json").is_file():
        return
    if not (run_dir / "raw").is_dir():
        from lsvcr_dist.data.generate import generate_logs

        print(f"[bench] generating logs into {run_dir / 'raw'}", flush=True)
        generate_logs(load_config(config, "generate", overrides_for("generate", overrides)))
    from lsvcr_dist.data.prepare import prepare

    print(f"[bench] preparing {run_dir / 'data'}", flush=True)
    prepare(load_config(config, "prepare", overrides_for("prepare", overrides)), log=lambda *_: None)


def _align_dataset(cfg: AlignStageConfig, rows: int) -> Dataset:
    """The training pipeline (``align_run.build_align_dataset``) over the first ``rows`` train INSTANCE rows."""
    from lsvcr_dist.data.ingest import read_instances
    from lsvcr_dist.train.align_run import build_align_dataset

    data_dir = Path(cfg.run_dir) / "data"
    return build_align_dataset(cfg, read_instances(data_dir, "train", fmt=cfg.ingest.format).limit(rows))


def measure_ingest(cfg: AlignStageConfig, manifest: dict, rows: int) -> dict:
    """Rows/s Ray Data delivers of the transformed ALIGN dataset (same pipeline as training, no model).

    ``rows_per_s`` counts from the call (actor start and tokenizer load included: a lower bound);
    ``rows_per_s_after_first_batch`` from the first batch on (rows already buffered then make it an upper bound).
    """
    ds = _align_dataset(cfg, rows)
    t0 = time.perf_counter()
    first, n, n0 = None, 0, 0
    for b in ds.iter_batches(batch_size=cfg.deepspeed.micro_batch, batch_format="numpy"):
        n += len(b["task"])
        if first is None:
            first, n0 = time.perf_counter(), n
    end = time.perf_counter()
    after = (n - n0) / (end - first) if first and end > first and n > n0 else float("nan")
    return {"rows": n, "first_batch_s": (first or end) - t0, "rows_per_s": n / max(end - t0, 1e-9),
            "rows_per_s_after_first_batch": after}


def run_ours(cfg: AlignStageConfig, manifest: dict, args: argparse.Namespace, threads: int, tmp: Path) -> dict:
    """One Ray Train fit of ``ray_bench_worker`` in the stage's trainer; returns ``summarize`` of the ranks."""
    from ray.train import RunConfig

    from benchmarks.align_bench import ray_bench_worker
    from lsvcr_dist.config import to_dict
    from lsvcr_dist.train.align_run import align_trainer

    w = cfg.scaling.num_workers
    out = tmp / f"ours_w{w}.json"
    ds = _align_dataset(cfg, (args.warmup + args.steps) * cfg.deepspeed.micro_batch * w)
    loop = {"cfg": to_dict(cfg), "data_dir": str(Path(cfg.run_dir) / "data"), "warmup": args.warmup,
            "steps": args.steps, "trim": args.trim and cfg.trim_padding, "peak_flops": _peak(args), "out": str(out),
            "threads": threads, "prefetch_batches": cfg.ingest.prefetch_batches}
    run_config = RunConfig(name=f"bench_w{w}_{int(time.time())}", storage_path=str(tmp / "ray"))
    result = align_trainer(cfg, ray_bench_worker, loop, {"train": ds}, run_config).fit()
    if result.error:
        raise RuntimeError(f"ours with {w} workers failed: {result.error}")
    return summarize(json.loads(out.read_text()))


def reference_batches(cfg: AlignStageConfig, manifest: dict, world: int, per_rank: int) -> list[list[dict]]:
    """Pre-transformed micro-batches in memory (no Ray): the first rows of the train shards through AlignTransform."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lsvcr_dist.data.manifest import shard_files
    from lsvcr_dist.data.transforms import AlignTransform

    data_dir = Path(cfg.run_dir) / "data"
    need, mb = world * per_rank * cfg.deepspeed.micro_batch, cfg.deepspeed.micro_batch
    tables, have = [], 0
    for path in shard_files(data_dir, manifest, "parquet", "train"):
        tables.append(pq.read_table(path))
        have += tables[-1].num_rows
        if have >= need:
            break
    if have < need:
        raise ValueError(f"{data_dir}: train split has {have} rows, the reference run needs {need}")
    rows = AlignTransform(str(data_dir), dataclasses.asdict(cfg.llm), dataclasses.asdict(cfg.comdiv),
                          seed=cfg.seed)(pa.concat_tables(tables).slice(0, need))
    # Rank r takes micro-batches r, r + world, ... (a DistributedSampler-like interleave).
    mbs = [{k: v[i * mb:(i + 1) * mb] for k, v in rows.items()} for i in range(need // mb)]
    return [mbs[r::world] for r in range(world)]


def run_reference(cfg: AlignStageConfig, manifest: dict, args: argparse.Namespace, threads: int, tmp: Path) -> dict:
    """The public code's recipe with ``world`` spawned processes; returns ``summarize`` of the ranks."""
    import torch.multiprocessing as mp

    from lsvcr_dist.config import to_dict

    w = cfg.scaling.num_workers
    ref = to_dict(cfg)
    ref["deepspeed"]["zero_stage"] = 2  # the public code's ds_z2 config
    batches = reference_batches(cfg, manifest, w, args.warmup + args.steps)
    out = tmp / f"reference_w{w}.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(reference_bench_worker, nprocs=w, join=True,
                 args=(w, port, ref, str(Path(cfg.run_dir) / "data"), batches, args.warmup, args.steps,
                       _peak(args), str(out), threads))
    except mp.ProcessExitedException as e:
        # Seen once in ~10 CPU runs: a child aborted ("terminate called without an active exception") in gloo
        # teardown AFTER rank 0 had written every rank's timings. Keep such a complete result, say so in the JSON;
        # a child that died before the write still fails the run.
        rows = json.loads(out.read_text()) if out.is_file() else []
        if len(rows) != w:
            raise
        print(f"[bench] reference W={w}: a process died after writing its results ({e}); results kept", flush=True)
        res = summarize(rows)
        res["teardown_error"] = str(e)
        return res
    return summarize(json.loads(out.read_text()))


def _cpu_peak(threads: int) -> float:
    """fp32 matmul probe (``flops.cpu_matmul_probe``) with ``threads`` torch threads, in FLOP/s."""
    import torch

    from lsvcr_dist.flops import cpu_matmul_probe

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return cpu_matmul_probe(n=512, seconds=1.0)
    finally:
        torch.set_num_threads(old)


def _peak(args: argparse.Namespace) -> float:
    """Per-device peak FLOP/s handed to the workers (0 = they detect it by CUDA device name)."""
    return args.peak_tflops * 1e12 if args.peak_tflops else getattr(args, "cpu_peak_flops", 0.0)


def run_ab(cfg: AlignStageConfig, manifest: dict, args: argparse.Namespace) -> dict:
    """``align_ab.ab_compare`` in this process inside a one-rank gloo/nccl group (no Ray)."""
    import torch
    import torch.distributed as dist

    from benchmarks.align_ab import ab_compare

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    try:
        batches = reference_batches(cfg, manifest, 1, min(args.ab + 1, 8))[0]
        return ab_compare(cfg, str(Path(cfg.run_dir) / "data"), batches, rounds=args.ab, threads=os.cpu_count() or 1)
    finally:
        dist.destroy_process_group()


def plot(result: dict, path: Path) -> None:
    """Samples/s vs workers (ours, reference, ideal) with the ingest rate; efficiency in the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = result["scaling"]
    ws = sc["workers"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(ws, sc["samples_per_s"], "o-", label="ours (Ray Data + Ray Train + DeepSpeed)")
    ax.plot(ws, [sc["samples_per_s"][0] * w for w in ws], "k:", label="ideal (linear)")
    if sc.get("reference_samples_per_s"):
        ax.plot(ws, sc["reference_samples_per_s"], "s--", label="reference recipe")
    if sc.get("ingest_rows_per_s"):
        ax.plot(ws, sc["ingest_rows_per_s"], "^-.", label="Ray Data ingest (rows/s after first batch, no model)")
    for w, y, e in zip(ws, sc["samples_per_s"], sc["efficiency"]):
        ax.annotate(f"eff {e:.2f}", (w, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xlabel("workers")
    ax.set_ylabel("samples/s (ingest: rows/s)")
    ax.set_yscale("log")
    ax.set_xticks(ws)
    ax.set_title(f"alignment step, {result['model']}, micro batch {result['micro_batch']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def ab_main(args: argparse.Namespace, overrides: list[str], base_cfg: AlignStageConfig, manifest: dict,
            command: str) -> int:
    """``--ab ROUNDS``: paired A/B of the speed-work items at one worker; writes ``--out``, prints the speed-ups."""
    from lsvcr_dist.config import load_config

    cfg = load_config(args.config, "align", overrides + ["scaling.num_workers=1",
                                                         f"global_batch={base_cfg.deepspeed.micro_batch}"])
    load_before = os.getloadavg()[0]
    ab = run_ab(cfg, manifest, args)
    res = {"ab": ab, "rounds": args.ab, "model": args.model, "micro_batch": base_cfg.deepspeed.micro_batch,
           "load_avg_1m": [load_before, os.getloadavg()[0]], "date": _now(), "command": command}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: round(v["speedup_with"], 3) if "speedup_with" in v else v for k, v in ab.items()}))
    return 0


def run_scaling(args: argparse.Namespace, overrides: list[str], base_cfg: AlignStageConfig, manifest: dict,
                workers: list[int]) -> tuple[list[dict], dict, dict]:
    """The ingest measurement once, then ours (and the reference) at every worker count.

    Returns:
        ``(runs, ingest, phase_wall_s)``: one row per worker count, the ingest rates, and the wall time per phase.
    """
    from lsvcr_dist.config import load_config

    cpus = os.cpu_count() or 1
    runs, tmp = [], Path(tempfile.mkdtemp(prefix="lsvcr-bench-"))
    mb = base_cfg.deepspeed.micro_batch
    # One ingest measurement (the driver iterates the same transformed pipeline, no model), --ingest-rows so the
    # steady rate is not three batches; the first-batch latency (actor start, tokenizer load) is reported apart.
    print("[bench] ingest", flush=True)
    t0 = time.perf_counter()
    ingest = measure_ingest(base_cfg, manifest, max(args.ingest_rows, (args.warmup + args.steps) * mb * max(workers)))
    phases = {"ingest": time.perf_counter() - t0}
    for w in workers:
        cfg = load_config(args.config, "align", overrides + [f"scaling.num_workers={w}", f"global_batch={mb * w}"])
        threads = args.threads or max(1, cpus // w)  # same thread budget for both recipes
        if not args.peak_tflops and not cfg.scaling.use_gpu:
            # One CPU "peak" per W, probed here with the workers' thread count, shared by both recipes so their
            # MFUs have the same denominator (a probe inside each worker is at the mercy of the box's load).
            args.cpu_peak_flops = _cpu_peak(threads)
        print(f"[bench] W={w}: ours", flush=True)
        t0 = time.perf_counter()
        ours = run_ours(cfg, manifest, args, threads, tmp)
        phases[f"ours_w{w}"] = time.perf_counter() - t0
        row = {"workers": w, "ingest": ingest, "ours": ours}
        if args.reference:
            print(f"[bench] W={w}: reference", flush=True)
            t0 = time.perf_counter()
            row["reference"] = run_reference(cfg, manifest, args, threads, tmp)
            phases[f"reference_w{w}"] = time.perf_counter() - t0
            row["ratio_ours_over_reference"] = ours["samples_per_s"] / row["reference"]["samples_per_s"]
        print(f"[bench] W={w}: ours {ours['samples_per_s']:.2f} samples/s"
              + (f", reference {row['reference']['samples_per_s']:.2f}" if args.reference else ""), flush=True)
        runs.append(row)
    return runs, ingest, phases


def scaling_result(runs: list[dict], ingest: dict, args: argparse.Namespace, base_cfg: AlignStageConfig) -> dict:
    """The result JSON: ours at the largest worker count on top, the scaling series, ingest over consumption."""
    one = runs[0]["ours"]["samples_per_s"] / runs[0]["workers"]  # per-worker rate at the smallest W
    top = runs[-1]
    consumption = top["ours"]["samples_per_s"]
    breakdown = top["ours"]["step_time_breakdown_s"]
    return {
        **top["ours"],
        "reference": top.get("reference"),
        "ratio_ours_over_reference": top.get("ratio_ours_over_reference"),
        "tokens_counted": "real prompt tokens (instruction + target + eos) + real text-encoder tokens",
        "flops_counted": "model FLOPs of real tokens (lsvcr_dist/flops.py); padding/recompute not counted",
        "model": args.model, "micro_batch": base_cfg.deepspeed.micro_batch, "warmup": args.warmup,
        "steps": args.steps, "threads_per_worker": args.threads or "cores // workers", "trim": args.trim,
        "zero_stage": base_cfg.deepspeed.zero_stage,
        "scaling": {
            "workers": [r["workers"] for r in runs],
            "samples_per_s": [r["ours"]["samples_per_s"] for r in runs],
            "efficiency": [r["ours"]["samples_per_s"] / (r["workers"] * one) for r in runs],
            "reference_samples_per_s": [r["reference"]["samples_per_s"] for r in runs] if args.reference else [],
            "ingest_rows_per_s": [r["ingest"]["rows_per_s_after_first_batch"] for r in runs],
        },
        "ingest": ingest,
        # Steady delivery rate over the step's consumption (> 1: data is not the bottleneck once started); the
        # start-up (actor spawn, tokenizer load) is reported apart and is paid once per run, not per step.
        "ingest_over_consumption": ingest["rows_per_s_after_first_batch"] / consumption,
        "ingest_over_consumption_incl_startup": ingest["rows_per_s"] / consumption,
        "data_wait_share": breakdown["data_wait"] / max(sum(breakdown.values()), 1e-12),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    base_cfg, args = parse("align", __doc__.splitlines()[0], argv, extra=_extra)
    # The shape first, so a dotted override can still change it (e.g. llm.num_layers=1 for a CPU smoke run).
    overrides = (CHATGLM3_6B_SHAPED if args.model == "chatglm3-6b-shaped" else []) + list(args.overrides)
    workers = [int(x) for x in args.workers.split(",") if x.strip()]
    if not workers or min(workers) < 1 or args.steps < 1 or args.warmup < 0:
        print("bench: --workers must list positive counts, --steps >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    from lsvcr_dist.data.manifest import read_manifest

    run_dir = Path(base_cfg.run_dir)
    if not (args.ab or args.pools) or not (run_dir / "data" / "manifest.json").is_file():
        _init_ray(max(4, 2 * max(workers)))
    ensure_data(args.config, overrides, run_dir)
    manifest = read_manifest(run_dir / "data")
    command = "python benchmarks/align_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.ab:
        return ab_main(args, overrides, base_cfg, manifest, command)
    if args.pools:
        from benchmarks.align_pool import pool_main

        res = {**pool_main(args, overrides, base_cfg, manifest, command), "date": _now()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
        return 0
    load_before = os.getloadavg()[0]
    runs, ingest, phases = run_scaling(args, overrides, base_cfg, manifest, workers)
    result = {**scaling_result(runs, ingest, args, base_cfg), "phase_wall_s": phases, "date": _now(),
              "load_avg_1m": [load_before, os.getloadavg()[0]],  # box load at start / end: context for CPU timings
              "host": f"{os.cpu_count() or 1} CPU cores" + (", GPU" if base_cfg.scaling.use_gpu else ", no GPU"),
              "command": command}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    plot(result, Path(args.plot) if args.plot else out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("samples_per_s", "tokens_per_s", "tflops", "mfu",
                                             "ratio_ours_over_reference", "phase_wall_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
