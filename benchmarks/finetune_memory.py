"""Fine-tune worker memory against the number of texts: memory-mapped store reads vs the old fp32 copy.

    python benchmarks/finetune_memory.py --source /tmp/tiny --scratch /tmp/ftmem --texts 14264034 \
        --fractions 0.01,0.1,1 --old-fractions 0.01,0.1 --out /tmp/ft_mem.json

Writes a synthetic store of random fp16 vectors (``--dim`` wide, paper counts: 100,772 videos + the rest comments)
per fraction into ``--scratch`` (shards + a manifest with sizes; deleted at the end unless ``--keep``), then starts
``--workers`` processes (one DDP group over gloo on 127.0.0.1, as the fine-tune workers) that each build the
fine-tune model of ``--config`` over that store and train ``--steps`` steps on real tiny batches whose video and
comment ids are redrawn uniformly over the whole synthetic store. Per worker it reports the peak of the private
memory (``RssAnon``, sampled after setup and every step), the file-backed pages mapped at the end (``RssFile``: the
page cache shared by every process on the node, reclaimable) and ``VmHWM``. ``old`` rows load the whole store as
the fp32 tensor the workers used to hold (``EmbeddingStore.as_tensor``), registered as the model's non-persistent
buffer as it was (so DDP also broadcasts it from rank 0 at every forward, as it did).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PAPER_VIDEOS = 100_772


def write_synthetic_store(path: Path, count: int, num_videos: int, dim: int, shard_rows: int = 1_000_000) -> Path:
    """Random fp16 store of ``count`` texts (row 0 zeros), shards + manifest (sizes only: no sha256 to verify)."""
    from lsvcr_dist.embeddings import FORMAT, MANIFEST, shard_name

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards, rows = [], count + 1
    for s, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        arr = np.lib.format.open_memmap(path / shard_name(s), mode="w+", dtype=np.float16, shape=(n, dim))
        for lo in range(0, n, 200_000):
            hi = min(lo + 200_000, n)
            arr[lo:hi] = rng.standard_normal((hi - lo, dim), dtype=np.float32).astype(np.float16)
        if start == 0:
            arr[0] = 0
        arr.flush()
        del arr
        shards.append({"file": shard_name(s), "start": start, "rows": n,
                       "bytes": (path / shard_name(s)).stat().st_size})
    man = {"format": FORMAT, "dim": dim, "count": count, "num_videos": num_videos, "num_comments": count - num_videos,
           "dtype": "float16", "shard_rows": shard_rows, "shards": shards, "projected": False}
    (path / MANIFEST).write_text(json.dumps(man))
    return path


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _redraw(batch: dict, nv: int, nc: int, rng: np.random.Generator) -> dict:
    """The batch with every non-zero video / comment id replaced by a uniform draw over the synthetic store."""
    video_keys = ("video_hist", "comment_hist_video", "current_video", "target_video", "cand_videos")
    comment_keys = ("video_hist_comment", "comment_hist_comments", "train_comment_cands", "cand_comments",
                    "target_comments")
    out = dict(batch)
    for keys, hi in ((video_keys, nv), (comment_keys, nc)):
        for k in keys:
            if k in out:
                x = out[k]
                draw = torch.from_numpy(rng.integers(1, hi + 1, size=tuple(x.shape)))
                out[k] = torch.where(x > 0, draw, x)
    return out


def worker(rank: int, world: int, port: int, args: dict, store: str, mode: str, result: str) -> None:
    import torch.distributed as dist

    from lsvcr_dist.config import load_config
    from lsvcr_dist.embeddings import EmbeddingStore
    from lsvcr_dist.evaluate import iter_split
    from lsvcr_dist.finetuned import build_finetune_model, load_text_table
    from lsvcr_dist.losses import CommentRankLoss, FinetuneLoss, VRTLoss
    from lsvcr_dist.train.finetune_loop import train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    peak = 0
    base = _status()
    cfg = load_config(args["config"], "finetune", ["init=scratch", f"batch_size={args['batch']}"])
    st = EmbeddingStore.open(store, verify="size")
    text = st.as_tensor() if mode == "old" else load_text_table(store, verify="size")
    torch.manual_seed(0)
    model, _ = build_finetune_model(cfg, args["task"], num_videos=st.num_videos, text_table=text)
    if mode == "old":  # as the model held it before: a non-persistent buffer, which DDP broadcasts every forward
        model.register_buffer("text_table", text, persistent=False)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    peak = max(peak, _status()["RssAnon"])
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    task_loss = VRTLoss(cfg.loss.tau) if args["task"] == "video" else CommentRankLoss(cfg.loss.tau)
    batches = iter_split(Path(args["source"]) / "data", "train", args["task"], args["batch"] // world,
                         train_mode=True)
    rng = np.random.default_rng(rank)
    gen = torch.Generator().manual_seed(rank)
    t0 = time.perf_counter()
    for _ in range(args["steps"]):
        batch = _redraw(next(batches), st.num_videos, st.num_comments, rng)
        train_step(ddp, batch, args["task"], task_loss, FinetuneLoss.from_config(cfg.loss), opt, gen)
        peak = max(peak, _status()["RssAnon"])
    end = _status()
    Path(result).write_text(json.dumps({"rank": rank, "mode": mode, "peak_rss_anon": peak,
                                        "rss_file_end": end["RssFile"], "vm_hwm": end["VmHWM"],
                                        "rss_anon_before_setup": base["RssAnon"],
                                        "step_s": (time.perf_counter() - t0) / args["steps"]}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(store: Path, mode: str, args: argparse.Namespace) -> list[dict]:
    import torch.multiprocessing as mp

    out_dir = store / f"result_{mode}"
    out_dir.mkdir(exist_ok=True)
    conf = {"config": args.config, "source": args.source, "task": args.task, "batch": args.batch, "steps": args.steps}
    procs = []
    ctx = mp.get_context("spawn")
    port = _free_port()
    for r in range(args.workers):
        p = ctx.Process(target=worker, args=(r, args.workers, port, conf, str(store), mode, str(out_dir / f"{r}.json")))
        p.start()
        procs.append(p)
    for p in procs:
        p.join(timeout=1800)
        if p.exitcode != 0:
            raise RuntimeError(f"worker exited with {p.exitcode} ({mode}, {store})")
    return [json.loads((out_dir / f"{r}.json").read_text()) for r in range(args.workers)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "tiny.yaml"))
    p.add_argument("--source", required=True, help="a prepared tiny run (its train batches give the shapes)")
    p.add_argument("--scratch", required=True, help="folder for the synthetic stores (deleted unless --keep)")
    p.add_argument("--texts", type=int, default=14_264_034, help="texts at fraction 1 (paper: 100,772 + 14,163,262)")
    p.add_argument("--dim", type=int, default=64, help="store width (tiny LLM hidden size)")
    p.add_argument("--fractions", default="0.01,0.1,1")
    p.add_argument("--old-fractions", default="0.01,0.1", help="fractions also measured with the old fp32 copy")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--task", default="video")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    rows = []
    scratch = Path(args.scratch)
    try:
        for frac in [float(x) for x in args.fractions.split(",")]:
            count = max(int(args.texts * frac), PAPER_VIDEOS + 1)
            t0 = time.perf_counter()
            store = write_synthetic_store(scratch / f"store_{frac}", count, PAPER_VIDEOS, args.dim)
            made = time.perf_counter() - t0
            modes = ["mmap"] + (["old"] if str(frac) in args.old_fractions.split(",") or
                                frac in [float(x) for x in args.old_fractions.split(",")] else [])
            for mode in modes:
                res = measure(store, mode, args)
                row = {"fraction": frac, "texts": count, "dim": args.dim, "store_bytes": 2 * (count + 1) * args.dim,
                       "mode": mode, "write_s": round(made, 1),
                       "peak_rss_anon_mib": [round(r["peak_rss_anon"] / 2**20, 1) for r in res],
                       "rss_file_end_mib": [round(r["rss_file_end"] / 2**20, 1) for r in res],
                       "vm_hwm_mib": [round(r["vm_hwm"] / 2**20, 1) for r in res],
                       "step_s": [round(r["step_s"], 3) for r in res]}
                print(json.dumps(row), flush=True)
                rows.append(row)
            if not args.keep:
                shutil.rmtree(store)
    finally:
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "workers": args.workers,
                                              "rows": rows}, indent=1))
        if not args.keep and scratch.exists():
            shutil.rmtree(scratch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
