"""Data ingest throughput: Ray Data -> 2 Ray Train workers from Parquet and WebDataset vs plain local reads.

    python benchmarks/data_throughput.py --config jobs/configs/tiny.yaml run_dir=/tmp/tiny --out /tmp/data_tp.json

Needs a prepared ``run_dir/data`` (jobs/prepare_data.py). Measures, on the same ``split`` shards, side by side:
plain pyarrow read (and read + numpy ``[B, ...]`` conversion), plain WebDataset tar decode, and rows/s arriving
as torch batches in 2 TorchTrainer workers (``ingest.probe_loop``) per format. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))

from _cli import DEFAULT_ENV, init_ray  # noqa: E402


def _local_reads(data: Path, manifest: dict, split: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lsvcr_dist.data.ingest import to_numpy_batch
    from lsvcr_dist.data.shards import read_wds_file

    dims = manifest["dims"]
    pq_files = [data / r for r in manifest["shards"]["parquet"][split]]
    t0 = time.perf_counter()
    tables = [pq.read_table(f) for f in pq_files]
    t_read = time.perf_counter() - t0
    for t in tables:
        to_numpy_batch(t, dims)
    t_np = time.perf_counter() - t0
    rows = sum(t.num_rows for t in tables)
    out = {"rows": rows, "pyarrow_rows_per_s": rows / t_read, "pyarrow_numpy_rows_per_s": rows / t_np}
    if "webdataset" in manifest["shards"]:
        t0 = time.perf_counter()
        n = sum(read_wds_file(data / r, dims).num_rows for r in manifest["shards"]["webdataset"][split])
        out["webdataset_local_rows_per_s"] = n / (time.perf_counter() - t0)
    return out


def _ray_ingest(data: Path, manifest: dict, split: str, fmt: str, batch_size: int, epochs: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lsvcr_dist.data.ingest import ingest_data_config, probe_loop, read_instances

    with tempfile.TemporaryDirectory(prefix="lsvcr-bench-") as tmp:
        out = Path(tmp) / "probe"
        t0 = time.perf_counter()
        TorchTrainer(probe_loop, train_loop_config={"out_dir": str(out), "batch_size": batch_size, "epochs": epochs,
                                                    "seed": 0, "shuffle_window": 0, "record_keys": False,
                                                    "dims": manifest["dims"]},
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                     datasets={"train": read_instances(data, split, fmt=fmt)}, dataset_config=ingest_data_config(),
                     run_config=RunConfig(storage_path=str(Path(tmp) / "st"), name=f"bench_{fmt}")).fit()
        wall = time.perf_counter() - t0
        recs = [json.loads(p.read_text()) for p in sorted(out.glob("rank*_epoch*.json"))]
    last = [r for r in recs if r["epoch"] == epochs - 1]
    rows = sum(r["rows"] for r in last)
    secs = max(r["seconds"] for r in last)
    return {"rows_per_epoch": rows, f"rows_per_s_epoch{epochs - 1}": rows / secs,
            "first_batch_s_epoch0": max(r["first_batch_s"] or 0 for r in recs if r["epoch"] == 0),
            "fit_wall_s": wall, "rows_per_s_incl_startup": sum(r["rows"] for r in recs) / wall}


def main(argv: list[str] | None = None) -> int:
    import os

    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "jobs/configs/tiny.yaml"))
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="epoch 0 includes warm-up; the last epoch is reported")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from lsvcr_dist.config import load_config
    from lsvcr_dist.data.manifest import read_manifest

    cfg = load_config(args.config, "prepare", args.overrides)
    data = Path(cfg.run_dir) / "data"
    manifest = read_manifest(data)
    result = {"config": args.config, "run_dir": cfg.run_dir, "split": args.split, "batch_size": args.batch_size,
              "workers": 2, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "local": _local_reads(data, manifest, args.split)}
    init_ray()
    for fmt in manifest["shards"]:
        result[f"ray_{fmt}"] = _ray_ingest(data, manifest, args.split, fmt, args.batch_size, args.epochs)
    line = json.dumps(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
