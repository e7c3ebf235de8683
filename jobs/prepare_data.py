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
    init_ray()
    from lsvcr_dist.data.prepare import prepare
    from lsvcr_dist.data.raw import RawDataError

    t0 = time.time()
    try:
        manifest = prepare(cfg)
    except RawDataError as e:  # bad input: one clear line naming file/row/column, no traceback
        print(f"prepare_data: raw data error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"run_dir": cfg.run_dir, "wall_s": round(time.time() - t0, 2), "splits": manifest["splits"],
                      "filtered": manifest["filtered"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
