"""Personalized preference alignment (Section 3.3): Ray Data streaming -> Ray Train workers -> DeepSpeed ZeRO-2/3.

    python jobs/align.py --config jobs/configs/tiny.yaml run_dir=/tmp/tiny scaling.num_workers=2 deepspeed.zero_stage=3
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/align.py --config jobs/configs/tiny.yaml

Validates the prepared data on the driver, then fits; resumes from the latest complete checkpoint under
run_dir/align unless checkpoint.resume=false. Writes run_dir/align/{metrics.jsonl,checkpoints/,final/}.
Fault injection for tests: LSVCR_FAULT_INJECT=step:N makes rank 1 fail once at step N.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from _cli import init_ray, parse


def _summary(cfg, wall_s: float) -> dict:
    align = Path(cfg.run_dir) / "align"
    lines = [json.loads(ln) for ln in (align / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    first, last = (lines[0], lines[-1]) if lines else ({}, {})
    return {
        "run_dir": cfg.run_dir, "steps": last.get("step"), "workers": cfg.scaling.num_workers,
        "zero_stage": cfg.deepspeed.zero_stage, "first_loss": first.get("loss"), "last_loss": last.get("loss"),
        "samples_per_s": last.get("samples_per_s"), "adapter": str(align / "final" / "adapter"),
        "sr_weights": str(align / "final" / "sr.safetensors"), "wall_s": round(wall_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse("align", __doc__.splitlines()[0], argv)
    if not cfg.enabled:
        print("align: enabled=false ('w/o Alignment'): alignment is skipped; fine-tune starts from scratch")
        return 0
    from lsvcr_dist.data.manifest import ManifestError
    from lsvcr_dist.schema import SchemaError
    from lsvcr_dist.train.align_run import run_align, validate_prepared

    try:
        validate_prepared(cfg)  # fail in seconds, before Ray starts (run_align checks again: shard footers only)
    except (FileNotFoundError, ManifestError, SchemaError, ValueError) as e:
        print(f"align: {e}", file=sys.stderr)
        return 1
    # 4 logical CPUs on a small box: 2 workers at 0.5 CPU + Ray Data read/transform tasks (cpu_stack_notes 2).
    init_ray(num_cpus=4)
    t0 = time.time()
    result = run_align(cfg, log=print)
    if result.error:
        print(f"align: training failed: {result.error}", file=sys.stderr)
        return 1
    print(json.dumps(_summary(cfg, time.time() - t0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
