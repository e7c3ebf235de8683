"""Prepare instances, candidates, lookup tables and shards from raw logs, on Ray Data.

    python jobs/prepare_data.py --config jobs/configs/tiny.yaml [run_dir=/tmp/tiny prepare.shard_rows=500]
    ray job submit --working-dir . -- python jobs/prepare_data.py --config jobs/configs/tiny.yaml
"""

from __future__ import annotations

import json
import sys
import time

from _cli import init_ray, parse


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse("prepare", __doc__.splitlines()[0], argv)
    from lsvcr_dist.data.prepare import prepare, validate_inputs
    from lsvcr_dist.data.raw import RawDataError

    t0 = time.time()
    try:  # bad input fails here, before Ray starts: one clear line naming file/row/column, no traceback
        stats = validate_inputs(cfg)
    except (RawDataError, ValueError) as e:
        print(f"prepare_data: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    init_ray()
    manifest = prepare(cfg, stats=stats)
    print(json.dumps({"run_dir": cfg.run_dir, "wall_s": round(time.time() - t0, 2), "splits": manifest["splits"],
                      "filtered": manifest["filtered"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
