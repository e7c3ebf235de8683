"""Recommendation-oriented fine-tuning (Section 3.4): SR model only, one model per task, Ray Train + plain DDP.

    python jobs/finetune.py --config jobs/configs/tiny.yaml [run_dir=/tmp/tiny tasks=[video] max_epochs=5]
    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/tiny.yaml

Reads the aligned SR weights (run_dir/align/final/sr.safetensors) and the aligned embedding store (or, with
init=scratch, 'w/o Alignment', the base store); writes run_dir/finetune/<task>/{best/,metrics.jsonl}.
"""

from __future__ import annotations

import json
import sys
import time

from _cli import init_ray, parse


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse("finetune", __doc__.splitlines()[0], argv)
    init_ray(num_cpus=4)  # logical CPUs: 2 workers x 0.5 + the transform actor + reads fit on a 2-core box
    from lsvcr_dist.finetuned import FinetuneSetupError
    from lsvcr_dist.train.finetune_loop import fit_task

    summary = {}
    for task in cfg.tasks:
        t0 = time.time()
        try:
            meta = fit_task(cfg, task)
        except FinetuneSetupError as e:
            print(f"finetune: {e}", file=sys.stderr)
            return 1
        summary[task] = {"best_epoch": meta["epoch"], "val": meta["val"], "wall_s": round(time.time() - t0, 1)}
    print(json.dumps({"run_dir": cfg.run_dir, "init": cfg.init, "finetune": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
