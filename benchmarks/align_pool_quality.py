"""Alignment losses under ``contrastive_pool=micro`` vs ``global`` on the same rows, without Ray.

    python benchmarks/align_pool_quality.py jobs/configs/tiny.yaml /tmp/gc_micro 30 /tmp/pool_quality.json

Trains the preset's alignment for STEPS optimizer steps of ``global_batch`` rows in 2 spawned gloo workers
(``align_pool.pool_worker``; the run_dir must hold prepared data and, for ``llm.text_norm=standardize``, the base
store), once per mode on the same rows, and prints L_SR / L_SSC over the first and last 5 steps against ln(pool).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "jobs"))


def main(config: str, run_dir: str, steps: int, out_path: str) -> None:
    import torch.multiprocessing as mp

    from benchmarks.align_pool import _free_port, pool_worker
    from benchmarks.align_throughput import reference_batches
    from lsvcr_dist.config import load_config, to_dict
    from lsvcr_dist.data.manifest import read_manifest

    out = {}
    for mode in ("micro", "global"):
        cfg = load_config(config, "align", [f"run_dir={run_dir}", f"contrastive_pool={mode}", f"max_steps={steps}",
                                            "scaling.num_workers=2"])
        rows_cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed,
                                                                          micro_batch=cfg.global_batch // 2))
        chunks = reference_batches(rows_cfg, read_manifest(Path(run_dir) / "data"), 2, steps)
        f = Path(tempfile.mkdtemp()) / "r.json"
        mp.spawn(pool_worker, nprocs=2, join=True,
                 args=(2, _free_port(), to_dict(cfg), str(Path(run_dir) / "data"), chunks, str(f), 1))
        losses = json.loads(f.read_text())[0]["losses"]
        pool = cfg.global_batch if mode == "global" else 2 * cfg.deepspeed.micro_batch
        out[mode] = {"pool": pool, **losses}
        for k in ("loss_sr", "loss_ssc"):
            v = losses[k]
            print(f"{mode} pool {pool} ln {math.log(pool):.3f} {k} first5 {sum(v[:5]) / 5:.3f} last5 "
                  f"{sum(v[-5:]) / 5:.3f} last5/ln {sum(v[-5:]) / 5 / math.log(pool):.3f}", flush=True)
    Path(out_path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
