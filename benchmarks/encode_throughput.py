"""Text-encoding throughput (LLM(t) into the store) on CPU, and its extrapolation to the paper's 14.26M texts.

    python benchmarks/encode_throughput.py --config jobs/configs/tiny.yaml --out /tmp/enc_tp.json run_dir=/tmp/slice

``run_dir`` holds prepared data (e.g. a 1 % slice of the paper's counts generated with the tiny preset: see
``benchmarks/RESULTS.md``). The base store is encoded in this process (``encode.encode_texts_local``, ``--threads``
torch threads, the config's batch size) into a scratch copy of the run, never into ``run_dir``. Reported: texts/s,
real tokens per text (the tokenizer's attention masks of every text), the FLOPs per text of the FLOP model
(``flops.align_step_flops`` with only text-encoder tokens and no gradients: ``2 N`` per token + ``4 L d T^2`` per
text) for the config's LLM and for ChatGLM3-6B's shape, the achieved FLOP/s against this process's measured fp32
matmul peak (``flops.cpu_matmul_probe``), and the time for ``--texts`` texts on ``--cores`` CPU cores at the
measured rate and on 1/8/64 GPUs at ``--gpu-mfu`` of the bf16 peak (an assumption, stated in the output).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))

from _cli import parse  # noqa: E402 - also puts ROOT on sys.path

import numpy as np  # noqa: E402
import torch  # noqa: E402

PAPER_TEXTS = 100_772 + 14_163_262


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1, help="torch threads (= CPU cores used)")
    p.add_argument("--texts", type=int, default=PAPER_TEXTS, help="texts to extrapolate to (paper: 14,264,034)")
    p.add_argument("--cores", type=int, default=2, help="CPU cores of the extrapolated CPU run")
    p.add_argument("--gpu-mfu", type=float, default=0.3, help="assumed fraction of the bf16 peak on GPU")


def text_lengths(data_dir: Path, llm) -> np.ndarray:
    """Real tokens of every text (titles then comments), as the encoder tokenizes them."""
    from lsvcr_dist.data.manifest import read_dims
    from lsvcr_dist.data.transforms import TextTokenizer

    dims = read_dims(data_dir)
    tok = TextTokenizer.from_data_dir(str(data_dir), llm)
    n = dims["num_videos"] + dims["num_comments"]
    out = []
    for lo in range(1, n + 1, 4096):
        _, mask = tok.tokenize(np.arange(lo, min(lo + 4096, n + 1)))
        out.append(mask.sum(1))
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    from lsvcr_dist.encode import encode_texts_local
    from lsvcr_dist.flops import CHATGLM3_6B, PEAK_TFLOPS, LLMShape, StepCounts, align_step_flops, cpu_matmul_probe

    cfg, args = parse("encode", __doc__.splitlines()[0], argv, extra=_extra)
    torch.set_num_threads(args.threads)
    src = Path(cfg.run_dir)
    lengths = text_lengths(src / "data", cfg.llm)
    with tempfile.TemporaryDirectory(prefix="enc_tp_") as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        os.symlink((src / "data").resolve(), run / "data")
        cfg = dataclasses.replace(cfg, run_dir=str(run), which="base", resume=False)
        t0 = time.perf_counter()
        man = encode_texts_local(cfg, log=lambda line: print(line, flush=True))
        wall = time.perf_counter() - t0
        shutil.rmtree(run / "embeddings")
    n, secs = int(man["count"]), float(man["seconds"])  # the encoding loop (model build and store close apart)
    rate = n / secs
    llm = cfg.llm
    tiny = LLMShape(n_layers=llm.num_layers, hidden=llm.hidden_size, n_heads=llm.num_heads,
                    n_kv_heads=llm.num_kv_heads, head_dim=llm.hidden_size // llm.num_heads, ffn=llm.ffn_size,
                    vocab=max(llm.vocab_size, 1))  # no LM head in encoding: the vocabulary costs nothing
    counts = StepCounts(samples=n, text_lengths=lengths.tolist())
    per_text = {name: align_step_flops(shape, counts, lora_r=0, text_grad=False)["total"] / n
                for name, shape in (("config_llm", tiny), ("chatglm3_6b_shape", CHATGLM3_6B))}
    peak_cpu = cpu_matmul_probe()
    achieved = per_text["config_llm"] * rate
    gpu_peak = PEAK_TFLOPS["H100"] * 1e12
    gpu = {name: {str(g): round(args.texts * f / (g * gpu_peak * args.gpu_mfu), 1) for g in (1, 8, 64)}
           for name, f in per_text.items()}
    out = {
        "date": time.strftime("%Y-%m-%d"), "texts": n, "seconds": round(secs, 2),
        "wall_s_with_setup_and_close": round(wall, 2), "threads": args.threads,
        "texts_per_s": round(rate, 1), "texts_per_s_per_core": round(rate / args.threads, 1),
        "tokens_per_text": {"mean": round(float(lengths.mean()), 2), "max": int(lengths.max())},
        "flops_per_text": {k: round(v) for k, v in per_text.items()},
        "achieved_gflops": round(achieved / 1e9, 3), "cpu_matmul_peak_gflops": round(peak_cpu / 1e9, 2),
        "cpu_mfu": round(achieved / peak_cpu, 4),
        "extrapolated_texts": args.texts,
        "cpu_hours": {"1_core": round(args.texts / (rate / args.threads) / 3600, 2),
                      f"{args.cores}_cores": round(args.texts / (rate / args.threads * args.cores) / 3600, 2)},
        "gpu_seconds_at_assumed_mfu": gpu,
        "gpu_assumption": f"H100/H200 bf16 peak {PEAK_TFLOPS['H100']} TFLOP/s x {args.gpu_mfu} MFU, linear in GPUs",
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
