"""Per-request serving latency of the exported LSVCR scorer vs a SASRec of the same size (paper 3.4.2 claim).

    python benchmarks/serve_latency.py --run-dir runs/tiny [--requests 300] [--threads 1] [--out FILE.json]

Needs a finished pipeline run (``run_dir/export/video`` and ``run_dir/data``). Requests are the test split's
video-task histories, one user per request, top-10 over ALL videos. LSVCR = embedding-store lookups of titles and
comments + the TorchScript SR scorer + scoring every video. SASRec = the same Transformer size (d, layers, heads,
FFN) over IDs only, also traced, also scoring every video. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def video_requests(run: Path, limit: int) -> list[tuple[list[int], list[tuple[int, list[int]]]]]:
    """One request per test video-task row: ``(video history, [(video, [comment ids]), ...])`` without padding."""
    from lsvcr_dist.evaluate import iter_split

    requests = []
    for batch in iter_split(run / "data", "test", "video", 256, limit=limit):
        for i in range(len(batch["video_hist"])):
            vh = [int(v) for v in batch["video_hist"][i] if v > 0]
            ch = [(int(v), [int(c) for c in cs if c > 0])
                  for v, cs in zip(batch["comment_hist_video"][i], batch["comment_hist_comments"][i]) if v > 0]
            requests.append((vh, ch))
    return requests


def sasrec_server(num_videos: int, margs: dict, hist_len: int) -> Callable:
    """A SASRec of the scorer's size, traced like the exported scorer: ``request(video_hist, comments) -> top-10``.

    Untrained weights: latency does not depend on them.
    """
    import torch

    from lsvcr_dist.models.baselines import SASRec

    class Normalized(torch.nn.Module):
        """SASRec's user vector, L2-normalized as the exported scorer's."""

        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, video_hist: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(self.m(video_hist=video_hist)["s"], dim=-1)

    sas = SASRec(num_videos, margs["dim"], margs["n_layers"], margs["n_heads"], margs["inner_size"], 0.0,
                 margs["max_position"]).eval()
    ex = torch.zeros(1, hist_len, dtype=torch.long)
    ex[0, :3] = torch.tensor([1, 2, 3])
    traced = torch.jit.trace(Normalized(sas), (ex,), check_trace=False)
    with torch.no_grad():
        items = torch.nn.functional.normalize(sas.item.weight[1:], dim=-1)

    @torch.no_grad()
    def request(vh: list[int], ch: list) -> torch.return_types.topk:
        x = torch.zeros(1, hist_len, dtype=torch.long)
        recent = vh[-hist_len:]
        x[0, : len(recent)] = torch.tensor(recent)
        return torch.topk((traced(x) @ items.T)[0], 10)

    return request


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = one serving core)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)

    import torch

    from lsvcr_dist.serve import Recommender, time_requests

    torch.set_num_threads(args.threads)
    run = Path(args.run_dir)
    rec = Recommender.load(run)
    margs = json.loads((run / "finetune" / "video" / "best" / "model_args.json").read_text())["sr"]
    requests = video_requests(run, args.requests)
    lsvcr = time_requests(lambda vh, ch: rec.top_k_videos(vh, ch, k=10), requests)
    sasrec = time_requests(sasrec_server(rec.num_videos, margs, rec.hist_len), [r for r in requests if r[0]])
    out = {"benchmark": "serve_latency", "run_dir": str(run), "requests": len(requests), "threads": args.threads,
           "num_videos": rec.num_videos, "hist_len": rec.hist_len, "dim": margs["dim"], "n_layers": margs["n_layers"],
           "lsvcr": lsvcr, "sasrec": sasrec, "p50_ratio": lsvcr["p50_ms"] / sasrec["p50_ms"],
           "machine": f"{platform.machine()} {torch.get_num_threads()} torch thread(s)",
           "date": time.strftime("%Y-%m-%d", time.gmtime())}
    line = json.dumps(out)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
