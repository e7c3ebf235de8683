"""Id -> text lookups (``data.transforms.TextLookup``) at a prepared run's scale: set-up time, memory, lookup latency.

    python benchmarks/text_lookup.py --data RUN/data --out lookup.json

Every encode actor and every online-text alignment worker builds one ``TextLookup``; at paper scale it holds
14,163,262 comments. Reported: set-up seconds, the process's peak RSS and private (anonymous) RSS after set-up,
Arrow pool bytes, and the median seconds of ``texts`` over 64 random text ids (alignment's access pattern) and over
64 consecutive ids (the encode job's). Run it with ``PYTHONPATH`` at another checkout to compare implementations on
the same data in one sitting.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]


def _rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="prepared data folder (run_dir/data)")
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    from lsvcr_dist.data.manifest import read_dims
    from lsvcr_dist.data.tables import TextLookup

    dims = read_dims(args.data)
    nv, nc = dims["num_videos"], dims["num_comments"]
    t0 = time.perf_counter()
    look = TextLookup(args.data, nv, nc)
    setup = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    random_ids = [rng.integers(1, nv + nc + 1, 64) for _ in range(args.reps)]
    start = int(rng.integers(nv + 1, nv + nc - 64))
    it = iter(random_ids)
    out = {
        "module": sys.modules["lsvcr_dist.data.transforms"].__file__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "videos": nv, "comments": nc, "setup_s": round(setup, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_anon_mb_after_setup": round(_rss_anon_mb(), 1),
        "arrow_pool_mb": round(pa.total_allocated_bytes() / 2**20, 1),
        "texts_64_random_s": _median_s(lambda: look.texts(next(it)), args.reps),
        "texts_64_consecutive_s": _median_s(lambda: look.texts(np.arange(start, start + 64)), args.reps),
    }
    print(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
