"""Table 4 ablations and Table 2/3 baselines (SASRec, DSSM) in the same harness as LSVCR.

    python jobs/ablations.py --config jobs/configs/tiny.yaml [--only wo_reg,sasrec] [--seeds 3] [run_dir=/tmp/tiny ...]

Runs (or reuses) the full pipeline in run_dir, then each variant in run_dir/ablations/<variant>/ reusing the raw
logs, prepared data and base embeddings (and, for fine-tune-only variants, the alignment). Writes
run_dir/ablations/{table4.md, tables23.md, results.json} and prints both tables. ``--seeds N`` repeats the training
stages with N training seeds on the same data (run_dir/seeds/seed<k>/) and prints mean ± std
(run_dir/ablations/seeds.md).
"""

from __future__ import annotations

import argparse
import os
import sys

from _cli import DEFAULT_ENV
from pipeline import run_stage


def main(argv: list[str] | None = None) -> int:
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    from lsvcr_dist.ablation_seeds import run_seeds, seeds_markdown
    from lsvcr_dist.ablations import ALL, run_ablations, table4_markdown, tables23_markdown

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="preset YAML under jobs/configs/")
    p.add_argument("--only", default="", help=f"comma-separated variant slugs ({', '.join(v.slug for v in ALL)})")
    p.add_argument("--seeds", type=int, default=1, help="training seeds (>= 1); > 1 adds a mean ± std table")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    args = p.parse_args(argv)
    from lsvcr_dist.config import ConfigError, check_overrides_known
    from lsvcr_dist.stages import StageError

    slugs = [s for s in args.only.split(",") if s]
    unknown = sorted(set(slugs) - {v.slug for v in ALL})
    if unknown:
        p.exit(2, f"unknown variant(s) {unknown} (known: {', '.join(v.slug for v in ALL)})\n")
    variants = tuple(v for v in ALL if not slugs or v.slug in slugs)
    if args.seeds < 1:
        p.exit(2, f"--seeds must be >= 1, got {args.seeds}\n")
    try:
        check_overrides_known(args.overrides)
        if args.seeds > 1:
            print(seeds_markdown(run_seeds(args.config, args.overrides, run_stage, args.seeds, variants), args.seeds))
            return 0
        results = run_ablations(args.config, args.overrides, run_stage, variants)
    except ConfigError as e:
        p.exit(2, f"config error: {e}\n")
    except (StageError, FileNotFoundError) as e:
        print(f"ablations: {e}", file=sys.stderr)
        return 1
    print(table4_markdown(results))
    print(tables23_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
