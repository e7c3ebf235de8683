"""Generate synthetic KuaiShou-like raw logs (no Ray needed) and print the counts as one JSON line.

    python jobs/generate_logs.py --config jobs/configs/tiny.yaml [run_dir=/tmp/tiny generate.seed=7]
    ray job submit --working-dir . -- python jobs/generate_logs.py --config jobs/configs/small.yaml
"""

from __future__ import annotations

import json
import sys
import time

from _cli import parse


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse("generate", __doc__.splitlines()[0], argv,
                      extra=lambda p: p.add_argument("--validate", action="store_true",
                                                     help="also run raw.validate_raw on the result"))
    from lsvcr_dist.data.generate import generate_logs
    from lsvcr_dist.data.raw import RawDataError, validate_raw

    t0 = time.time()
    try:
        counts = generate_logs(cfg)  # impossible sizes were refused by parse() already (exit 2, key named)
    except RawDataError as e:  # run_dir/raw holds imported or hand-placed tables: never overwritten
        print(f"generate_logs: {e}", file=sys.stderr)
        return 1
    counts["wall_s"] = round(time.time() - t0, 2)
    if args.validate:
        t1 = time.time()
        counts["validated"] = validate_raw(counts["raw_dir"])
        counts["validate_s"] = round(time.time() - t1, 2)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
