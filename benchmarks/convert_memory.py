"""Peak memory and time of the ChatGLM3 -> Glm conversion on ChatGLM3-6B-wide synthetic checkpoints.

    python benchmarks/convert_memory.py --layers 2,6 --out benchmarks/results/convert_memory_cpu.json

Writes a checkpoint in the ChatGLM3 release layout (hidden 4096, 32 heads, 2 KV groups, FFN 13696, vocabulary
65024, fp16, ~1.9 GB shards with an index) for each layer count and format, converts it in a child process
(``jobs/convert_checkpoint.py``) and records the child's peak RSS and wall time. Streaming makes the peak depend
on the shard sizes, not on the layer count: two layer counts show it, and 28 layers (ChatGLM3-6B) is extrapolated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "models"))
from _chatglm_fakes import chatglm_config, chatglm_tensors, write_chatglm_checkpoint  # noqa: E402

SHAPE = dict(hidden=4096, heads=32, groups=2, kv_channels=128, ffn=13696, padded_vocab=65024)


def convert_once(src: Path, out: Path, shard_gib: float) -> dict:
    """Run the converter in a child process; its peak RSS comes from ``getrusage(RUSAGE_CHILDREN)``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "convert_checkpoint.py"), "--from", "chatglm",
                           "--src", str(src), "--out", str(out), "--no-tokenizer", "--max-shard-gib", str(shard_gib)],
                          capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib <= before:
        raise RuntimeError("child peak RSS not above an earlier child's: run one conversion per process")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"peak_rss_gib": round(peak_kib / 2**20, 3), "wall_s": round(wall, 1), "out_bytes": info["bytes"],
            "out_shards": len(info["shards"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="2,6", help="comma-separated layer counts (each run in its own process)")
    p.add_argument("--formats", default="bin,safetensors")
    p.add_argument("--shard-gib", type=float, default=2.0, help="converter output shard size")
    p.add_argument("--workdir", default="", help="scratch folder (default: a temp dir, removed at the end)")
    p.add_argument("--out", required=True)
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # one measurement per process, so RUSAGE_CHILDREN's maximum is this conversion's
        src, out = args.child.split(",")
        print(json.dumps(convert_once(Path(src), Path(out), args.shard_gib)))
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert-mem-", dir="/tmp"))
    rows = []
    try:
        for layers in [int(x) for x in args.layers.split(",")]:
            for fmt in args.formats.split(","):
                cfg = chatglm_config(layers=layers, **SHAPE)
                src, out = work / f"src-{layers}-{fmt}", work / f"out-{layers}-{fmt}"
                t0 = time.time()
                write_chatglm_checkpoint(src, cfg, chatglm_tensors(cfg, std=0.02), fmt=fmt, shard_bytes=1_900_000_000)
                src_bytes = sum(f.stat().st_size for f in src.iterdir())
                made = time.time() - t0
                child = subprocess.run([sys.executable, __file__, "--out", "-", "--shard-gib", str(args.shard_gib),
                                        "--child", f"{src},{out}"], capture_output=True, text=True, check=True)
                row = {"layers": layers, "format": fmt, "src_gib": round(src_bytes / 2**30, 2),
                       "build_s": round(made, 1), **json.loads(child.stdout.strip().splitlines()[-1])}
                print(json.dumps(row), flush=True)
                rows.append(row)
                shutil.rmtree(src)
                shutil.rmtree(out)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    layer_gib = 4096 * (4608 + 4096 + 2 * 13696) * 2 / 2**30 + 4096 * 13696 * 2 / 2**30
    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_avg": os.getloadavg(), "shard_gib": args.shard_gib, "rows": rows,
              "chatglm3_6b_checkpoint_gib": round(28 * layer_gib + 2 * 65024 * 4096 * 2 / 2**30, 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
