"""What verifying an embedding store costs at open: sizes only vs sha256 + finite scan of every shard.

    python benchmarks/store_verify.py [--rows 200000 --dim 1024 --shard-rows 100000] [--out FILE.json]

Writes a store of random fp16 vectors under a temp folder (tiny-preset shapes first, then ``--rows x --dim``),
opens it with ``verify="size"`` and ``verify="full"`` (best of ``--repeat``; the files are in the page cache, so
this is the CPU cost, not the disk's), times sha256 alone beside it, and extrapolates the full check to the
paper-size stores from the measured bytes per second. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAPER_TEXTS = 1 + 100_772 + 14_163_262  # rows of a paper-size store (Table 1 videos + comments + padding row)
PAPER_STORES = {"base (ChatGLM3-6B hidden 4096)": 4096, "aligned (projected, sr.text_dim 256)": 256}


def _write(path: Path, rows: int, dim: int, shard_rows: int) -> int:
    from lsvcr_dist.embeddings import EmbeddingWriter

    w = EmbeddingWriter(path, dim, rows - 1, 0, shard_rows=shard_rows)
    rng = np.random.default_rng(0)
    for start in range(1, rows, 50_000):
        ids = np.arange(start, min(start + 50_000, rows))
        w.write(ids, rng.standard_normal((len(ids), dim), dtype=np.float32))
    w.close()
    return sum(p.stat().st_size for p in path.glob("shard-*.npy"))


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(root: Path, rows: int, dim: int, shard_rows: int, repeat: int) -> dict:
    from lsvcr_dist.checksums import sha256_file
    from lsvcr_dist.embeddings import EmbeddingStore

    path = root / f"store_{rows}x{dim}"
    nbytes = _write(path, rows, dim, shard_rows)
    EmbeddingStore.open(path, verify="full")  # warm the page cache
    store = EmbeddingStore.open(path, verify="size")
    shards = sorted(path.glob("shard-*.npy"))
    out = {
        "rows": rows, "dim": dim, "shards": len(shards), "bytes": nbytes,
        "open_size_s": _best(lambda: EmbeddingStore.open(path, verify="size"), repeat),
        "open_full_s": _best(lambda: EmbeddingStore.open(path, verify="full"), repeat),
        "sha256_only_serial_s": _best(lambda: [sha256_file(f) for f in shards], repeat),
    }
    del store
    out["full_gb_per_s"] = nbytes / out["open_full_s"] / 1e9
    shutil.rmtree(path)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--shard-rows", type=int, default=100_000, help="encode.shard_rows (its default)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="lsvcr-store-verify-"))
    try:
        runs = [measure(root, 4401, 64, 1000, args.repeat),  # tiny preset base store: 400 videos + 4000 comments
                measure(root, 4401, 32, 1000, args.repeat),  # tiny aligned store (sr.text_dim 32)
                measure(root, args.rows, args.dim, args.shard_rows, args.repeat)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rate = runs[-1]["full_gb_per_s"]
    paper = {name: {"bytes": PAPER_TEXTS * dim * 2, "open_full_s_est": PAPER_TEXTS * dim * 2 / 1e9 / rate}
             for name, dim in PAPER_STORES.items()}
    rec = {"runs": runs, "paper_extrapolated": paper, "cpus": __import__("os").cpu_count(),
           "python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    line = json.dumps(rec)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
