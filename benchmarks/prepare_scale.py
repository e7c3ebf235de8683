"""Preparation at fractions of a preset's scale: Ray Data prepare vs a single-process pyarrow baseline, side by side.

    python benchmarks/prepare_scale.py --config jobs/configs/paper.yaml --fractions 0.01,0.1,1 \\
        --out benchmarks/results/prepare_scale.json [--plot benchmarks/results/prepare_scale.png] [--workdir DIR]

For each fraction f every count of the preset's ``generate`` block (users, videos, comments, video and comment
interactions) is scaled by f (kept feasible: >= num_video_candidates videos, >= 4 video interactions per user),
logs are generated, and then, each in its own process while the process tree's RSS is sampled:

* ``ray``: ``lsvcr_dist.data.prepare.prepare`` on a local Ray (what ``jobs/prepare_data.py`` runs);
* ``baseline``: the same preparation in one process without Ray: pyarrow reads, the same table/plan/row functions
  called in a plain loop, the same shard writer.

The two outputs must be byte-identical shard files (``equal_to_baseline``); at small fractions the rows are also
checked against the per-user reference definition ``instances.build_user_instances`` (``equal_to_reference``).
Writes one JSON with an entry per fraction (``rows``, ``wall_s``, ``peak_rss_gb``, ``baseline_wall_s``, stage
times, rows/s per stage, RSS of driver and workers) and the log-log growth exponents between fractions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))

from _cli import DEFAULT_ENV  # noqa: E402

SCALED = ("num_users", "num_videos", "num_comments", "num_video_inter", "num_comment_inter")
REFERENCE_MAX_EVENTS = 20_000
"""Fractions with at most this many interactions are also checked against the per-user reference builder."""


def scaled_overrides(config: str, fraction: float) -> list[str]:
    """Dotted ``generate.*`` overrides scaling every count of the preset by ``fraction`` (kept feasible)."""
    from lsvcr_dist.config import load_config

    g = load_config(config, "generate", [])
    p = load_config(config, "prepare", [])
    n = {k: max(1, round(getattr(g, k) * fraction)) for k in SCALED}
    n["num_videos"] = max(n["num_videos"], g.num_topics, p.num_video_candidates)
    n["num_comments"] = max(n["num_comments"], n["num_videos"], p.num_comment_candidates)
    n["num_video_inter"] = max(n["num_video_inter"], 4 * n["num_users"])
    return [f"generate.{k}={v}" for k, v in n.items()]


# --------------------------------------------------------------------------------------------------- children
class _Stages:
    """``log`` callback that timestamps the ``[prepare] ... in`` lines of ``prepare``."""

    def __init__(self):
        self.t0, self.marks = time.perf_counter(), []

    def __call__(self, msg: str) -> None:
        self.marks.append((round(time.perf_counter() - self.t0, 3), msg[:160]))
        print(msg[:300], flush=True)


def run_ray(cfg) -> dict:
    from _cli import init_ray

    from lsvcr_dist.data.prepare import prepare

    log = _Stages()
    init_ray()
    log("[prepare] ray started")
    manifest = prepare(cfg, log=log)
    return {"marks": log.marks, "wall_s": time.perf_counter() - log.t0, "splits": manifest["splits"]}


def run_baseline(cfg, out: Path) -> dict:
    """The preparation of ``prepare.prepare`` in this process, no Ray; shards under ``out``."""
    from lsvcr_dist.data import prepare as prep
    from lsvcr_dist.data import raw as raw_mod
    from lsvcr_dist.data.plan import build_rows, count_plan, output_order, plan_chunks

    t0, marks = time.perf_counter(), []

    def mark(name: str) -> None:
        marks.append((round(time.perf_counter() - t0, 3), name))

    stats = prep.validate_inputs(cfg)
    mark("validated")
    raw_dir = Path(cfg.raw_dir) if cfg.raw_dir else Path(cfg.run_dir) / "raw"
    dims = prep.dims_from_config(cfg)
    shutil.rmtree(out, ignore_errors=True)
    cv, _ = prep.build_tables(raw_mod.raw_dir_paths(raw_dir), out / "tables", stats["num_videos"],
                              stats["num_comments"], dims["P"])
    mark("tables")
    plan, ev, ctx, _ = prep.build_instances(cfg, raw_dir, stats, cv, prep._split_days(stats["max_timestamp"], cfg))
    splits, _ = count_plan(plan)
    mark("planned")
    writer = prep._ShardWriter(out, cfg.formats, cfg.shard_rows, dims)
    t_build = 0.0
    for chunk in plan_chunks(plan, output_order(plan), prep.CHUNK_ROWS):
        t = time.perf_counter()
        rows = build_rows(chunk, ev, ctx)
        t_build += time.perf_counter() - t
        writer.add(rows)
    writer.close()
    mark("shards")
    return {"marks": marks, "wall_s": time.perf_counter() - t0, "splits": splits, "build_rows_s": t_build}


def child_main(mode: str, config: str, overrides: list[str]) -> None:
    from lsvcr_dist.config import load_config

    cfg = load_config(config, "prepare", overrides)
    res = run_ray(cfg) if mode == "ray" else run_baseline(cfg, Path(cfg.run_dir) / "baseline")
    print("RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------------------- parent
def _tree_rss(proc) -> tuple[int, int, int]:
    """(driver RSS, sum over the process tree, largest non-driver process) in bytes."""
    import psutil

    try:
        kids = proc.children(recursive=True)
        driver = proc.memory_info().rss
    except psutil.Error:
        return 0, 0, 0
    rss = []
    for k in kids:
        try:
            rss.append(k.memory_info().rss)
        except psutil.Error:
            pass
    return driver, driver + sum(rss), max(rss, default=0)


def run_child(mode: str, config: str, overrides: list[str], log: Path, timeout_s: float) -> dict:
    """Run one child, sampling its tree's RSS every 0.2 s; returns its RESULT plus peak RSS in GB."""
    import psutil

    env = {**os.environ, **DEFAULT_ENV, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--config", config, *overrides]
    peak = [0, 0, 0]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        proc = psutil.Process(p.pid)
        while p.poll() is None:
            if time.perf_counter() - t0 > timeout_s:
                p.kill()
                raise RuntimeError(f"{mode} prepare exceeded {timeout_s}s (log: {log})")
            peak = [max(a, b) for a, b in zip(peak, _tree_rss(proc))]
            time.sleep(0.2)
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} prepare failed (exit {p.returncode}); see {log}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["process_wall_s"] = time.perf_counter() - t0
    res["driver_peak_rss_gb"], res["tree_peak_rss_gb"], res["worker_peak_rss_gb"] = (x / 2**30 for x in peak)
    return res


def _digest(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for sub in ("parquet", "wds") for f in sorted((root / sub).rglob("*")) if f.is_file()}


def _stage_times(marks: list) -> dict[str, float]:
    """Durations between consecutive ``prepare`` log marks, named by what finished."""
    names = {"ray started": "ray_start_s", "raw validated": "validate_s", "tables written": "tables_s", "instances planned": "plan_s",
             "shards written": "rows_and_shards_s", "validated": "validate_s", "tables": "tables_s",
             "planned": "plan_s", "shards": "rows_and_shards_s"}
    out, last = {}, 0.0
    for t, msg in marks:
        key = next((v for k, v in names.items() if msg.removeprefix("[prepare] ").startswith(k)), None)
        if key and key not in out:
            out[key], last = round(t - last, 2), t
    return out


def reference_check(run_dir: Path, config: str, overrides: list[str]) -> tuple[bool, float]:
    """Rows of the written shards equal ``instances.build_user_instances`` user by user (the definition).

    Returns:
        ``(equal, seconds of the per-user reference loop)``.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lsvcr_dist.config import load_config
    from lsvcr_dist.data import prepare as prep
    from lsvcr_dist.data import raw as raw_mod
    from lsvcr_dist.data.ingest import train_order_key
    from lsvcr_dist.data.instances import EVENT_SCHEMA, SPLIT_NAMES, build_user_instances
    from lsvcr_dist.data.manifest import read_manifest
    from lsvcr_dist.data.shards import to_instance_table

    cfg = load_config(config, "prepare", overrides)
    raw_dir = run_dir / "raw"
    stats = prep.validate_inputs(cfg)
    _, ev, ctx, _ = prep.build_instances(cfg, raw_dir, stats, np.asarray(_comment_video(raw_dir, stats)),
                                         prep._split_days(stats["max_timestamp"], cfg))
    vi = raw_mod.read_raw_table(raw_dir, "video_inter", ["user_id", "video_id", "timestamp"])
    ci = raw_mod.read_raw_table(raw_dir, "comment_inter", ["user_id", "video_id", "timestamp", "comment_ids"])
    ev_tab = pa.concat_tables([
        pa.table({**{c: vi[c] for c in ("user_id", "video_id", "timestamp")},
                  "is_comment": np.zeros(vi.num_rows, np.int64),
                  "comment_ids": pa.array([[]] * vi.num_rows, pa.list_(pa.int64()))}, schema=EVENT_SCHEMA),
        pa.table({**{c: ci[c] for c in ("user_id", "video_id", "timestamp")},
                  "is_comment": np.ones(ci.num_rows, np.int64),
                  "comment_ids": ci["comment_ids"].cast(pa.list_(pa.int64()))}, schema=EVENT_SCHEMA)]).sort_by("user_id")
    u = ev_tab["user_id"].to_numpy()
    cut = np.flatnonzero(np.diff(u)) + 1
    t0 = time.perf_counter()
    ref = pa.concat_tables([build_user_instances(ev_tab.slice(s, e - s), ctx)
                            for s, e in zip(np.r_[0, cut], np.r_[cut, len(u)])])
    secs = time.perf_counter() - t0
    split = ref["split"].to_numpy(zero_copy_only=False)
    uid, seq = ref["user_id"].to_numpy(), ref["_seq"].to_numpy()
    data = run_dir / "data"
    manifest = read_manifest(data)
    for i, name in enumerate(SPLIT_NAMES):
        idx = np.flatnonzero(split == name)
        key = train_order_key(cfg.seed, uid[idx], seq[idx]) if i == 0 else np.zeros(len(idx), np.int64)
        idx = idx[np.lexsort((seq[idx], uid[idx], key))]
        want = to_instance_table(ref.take(pa.array(idx)), manifest["dims"]) if len(idx) else None
        parts = [pq.read_table(data / r) for r in manifest["shards"]["parquet"][name]]
        got = pa.concat_tables(parts) if parts else None
        if (want is None) != (got is None) or (want is not None and not want.equals(got)):
            return False, secs
    return True, secs


def _comment_video(raw_dir: Path, stats: dict):
    import numpy as np

    from lsvcr_dist.data import raw as raw_mod

    cv = np.zeros(stats["num_comments"] + 1, np.int64)
    for _, _, b in raw_mod.iter_raw_batches(raw_dir, "comments", ["comment_id", "video_id"]):
        cv[b.column(0).to_numpy()] = b.column(1).to_numpy()
    return cv


def _reusable_raw(run_dir: Path, gcfg) -> dict | None:
    """The counts of ``run_dir/raw`` if a complete generation with this config's seed and sizes wrote it."""
    rec = run_dir / "raw" / "generated.json"
    if not rec.exists():
        return None
    meta = json.loads(rec.read_text())
    same = meta.get("complete") and meta.get("seed") == gcfg.seed and all(meta.get(k) == getattr(gcfg, k)
                                                                          for k in SCALED)
    return {k: meta[k] for k in SCALED} if same else None


def run_fraction(config: str, fraction: float, work: Path, extra: list[str], timeout_s: float,
                 reuse_raw: bool = False, with_baseline: bool = True) -> dict:
    from lsvcr_dist.config import load_config
    from lsvcr_dist.data.generate import generate_logs

    run_dir = work / f"f{fraction:g}"
    ov = [f"run_dir={run_dir}", *scaled_overrides(config, fraction), *extra]
    gcfg = load_config(config, "generate", ov)
    t0 = time.perf_counter()
    counts, gen_s = _reusable_raw(run_dir, gcfg) if reuse_raw else None, None
    if counts is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        counts = generate_logs(gcfg)
        gen_s = time.perf_counter() - t0
    print(f"[bench] f={fraction:g}: generated in {gen_s}s (None: reused): {counts}", flush=True)
    base = None
    if with_baseline:
        base = run_child("baseline", config, ov, run_dir / "baseline.log", timeout_s)
        print(f"[bench] f={fraction:g}: baseline {base['wall_s']:.1f}s", flush=True)
    for attempt in range(3):  # Ray's raylet must register within a fixed 30 s: a loaded box can miss that
        try:
            ray_res = run_child("ray", config, ov, run_dir / "ray.log", timeout_s)
            ray_res["retried"] = attempt
            break
        except RuntimeError as e:
            if attempt == 2 or "timed out during startup" not in (run_dir / "ray.log").read_text(errors="replace"):
                raise
            print(f"[bench] f={fraction:g}: Ray start-up timed out ({e}); retrying", flush=True)
            shutil.copy(run_dir / "ray.log", run_dir / f"ray.failed{attempt}.log")
    print(f"[bench] f={fraction:g}: ray {ray_res['wall_s']:.1f}s", flush=True)
    rows = sum(sum(s.values()) for s in ray_res["splits"].values())
    events = counts["num_video_inter"] + counts["num_comment_inter"]
    entry = {"fraction": fraction, "rows": rows, "events": events, "comments": counts["num_comments"],
             "wall_s": round(ray_res["wall_s"], 2), "baseline_wall_s": base and round(base["wall_s"], 2),
             "ratio_ray_to_baseline": base and round(ray_res["wall_s"] / base["wall_s"], 2),
             "peak_rss_gb": round(ray_res["tree_peak_rss_gb"], 3),
             "driver_peak_rss_gb": round(ray_res["driver_peak_rss_gb"], 3),
             "worker_peak_rss_gb": round(ray_res["worker_peak_rss_gb"], 3),
             "baseline_peak_rss_gb": base and round(base["driver_peak_rss_gb"], 3),
             "process_wall_s": round(ray_res["process_wall_s"], 2), "generate_wall_s": gen_s and round(gen_s, 2),
             "stages_s": _stage_times(ray_res["marks"]), "baseline_stages_s": base and _stage_times(base["marks"]),
             "baseline_build_rows_s": base and round(base["build_rows_s"], 2), "ray_retried": ray_res.get("retried", False)}
    entry["rows_per_s"] = {k.removesuffix("_s"): round((counts["num_comments"] if k == "tables_s" else
                                                         events if k in ("validate_s", "plan_s") else rows) / v)
                           for k, v in entry["stages_s"].items() if v > 0}
    entry["equal_to_baseline"] = base and _digest(run_dir / "data") == _digest(run_dir / "baseline")
    entry["equal_to_reference"], entry["reference_wall_s"] = None, None
    if events <= REFERENCE_MAX_EVENTS:
        eq, secs = reference_check(run_dir, config, ov)
        entry["equal_to_reference"], entry["reference_wall_s"] = eq, round(secs, 2)
    return entry


def growth(entries: list[dict]) -> list[dict]:
    """Log-log slopes (d log y / d log rows) of wall time and peak RSS between consecutive fractions."""
    import math

    out = []
    for a, b in zip(entries, entries[1:]):
        r = math.log(b["rows"] / a["rows"])
        out.append({"from": a["fraction"], "to": b["fraction"],
                    **{f"{k}_exponent": round(math.log(b[k] / a[k]) / r, 2)
                       for k in ("wall_s", "baseline_wall_s", "peak_rss_gb", "baseline_peak_rss_gb") if a[k] and b[k]}})
    return out


def plot(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [e["rows"] for e in entries]
    entries = [{k: (float("nan") if v is None else v) for k, v in e.items()} for e in entries]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.loglog(rows, [e["wall_s"] for e in entries], "o-", label="Ray Data prepare")
    ax1.loglog(rows, [e["baseline_wall_s"] for e in entries], "s--", label="1-process pyarrow baseline")
    ax1.set(xlabel="instance rows", ylabel="wall s", title="time")
    ax2.loglog(rows, [e["peak_rss_gb"] for e in entries], "o-", label="Ray: driver + workers")
    ax2.loglog(rows, [e["driver_peak_rss_gb"] for e in entries], "^:", label="Ray: driver")
    ax2.loglog(rows, [e["baseline_peak_rss_gb"] for e in entries], "s--", label="baseline")
    ax2.set(xlabel="instance rows", ylabel="peak RSS GB", title="memory")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main(argv: list[str] | None = None) -> int:
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "jobs/configs/paper.yaml"))
    p.add_argument("--fractions", default="0.01", help="comma-separated fractions of the preset, e.g. 0.01,0.1,1")
    p.add_argument("--out", help="JSON result file")
    p.add_argument("--plot", help="optional PNG of the log-log growth")
    p.add_argument("--workdir", help="where runs go (default: a temp dir, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the generated runs")
    p.add_argument("--timeout-s", type=float, default=7200, help="per prepare run")
    p.add_argument("--reuse-raw", action="store_true", help="keep WORKDIR/f<fraction>/raw when a complete "
                   "generation with the same seed and sizes wrote it (saves the generation time)")
    p.add_argument("--no-baseline", action="store_true", help="Ray preparation only (baseline keys are null)")
    p.add_argument("--child", choices=["ray", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. prepare.shard_rows=20000")
    args = p.parse_args(argv)
    if args.child:
        child_main(args.child, args.config, args.overrides)
        return 0
    if not args.out:
        p.error("--out is required")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lsvcr-prepscale-"))
    entries = []
    try:
        for f in [float(x) for x in args.fractions.split(",")]:
            entries.append(run_fraction(args.config, f, work, args.overrides, args.timeout_s, args.reuse_raw,
                                        not args.no_baseline))
            print(json.dumps(entries[-1]), flush=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result = {"config": args.config, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "cpus": os.cpu_count(), "entries": entries, "growth": growth(entries)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot and len(entries) > 1:
        plot(entries, Path(args.plot))
    print(json.dumps({k: v for k, v in result.items() if k != "entries"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
