"""Evaluate the fine-tuned models on the test split (Section 4.1.3 protocol, 4.4.2 unseen subsets).

    python jobs/evaluate.py --config jobs/configs/tiny.yaml [run_dir=/tmp/tiny]

Writes run_dir/eval/metrics.json ({"video": {recall@5, recall@10, ndcg@5, ndcg@10, mrr, ...}, "comment": {...},
"video_full": ..., "subsets": ...}), metrics.md and plots; prints the Markdown table. No Ray, no LLM.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _cli import parse


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse("evaluate", __doc__.splitlines()[0], argv)
    from lsvcr_dist.evaluate import evaluate_run, metrics_markdown

    try:
        table = evaluate_run(cfg)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 1
    try:
        from lsvcr_dist.plots import plot_run

        plot_run(cfg.run_dir)
    except Exception as e:  # noqa: BLE001 - plots are a by-product; the metrics are written already
        print(f"evaluate: plots skipped ({e})", file=sys.stderr)
    print(metrics_markdown(table))
    print(f"wrote {Path(cfg.run_dir) / 'eval' / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
