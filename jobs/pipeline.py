"""The whole LSVCR pipeline: generate -> prepare -> encode(base) -> align -> encode(aligned) -> fine-tune -> evaluate.

    python jobs/pipeline.py --config jobs/configs/tiny.yaml [run_dir=/tmp/tiny finetune.max_epochs=5]
    python jobs/pipeline.py --config jobs/configs/tiny.yaml --source import:recbole:/data/ml-100k \
        --import-args "--title-field movie_title" run_dir=runs/ml100k

With ``--source import:FORMAT:DIR`` the first stage is ``jobs/import_logs.py`` into run_dir/raw; a run_dir/raw that
holds a recorded import (import.json) is used as it is: generation never overwrites imported logs.

Every stage runs as its own job process (the same command you would type by hand) and is skipped when its outputs
are complete and valid for the same configuration (marker with the config hash under run_dir/.pipeline/, written
last). Prints the results table at the end; run_dir/eval holds metrics.json, metrics.md and the plots.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from _cli import DEFAULT_ENV, ROOT

from lsvcr_dist.stages import Stage

JOBS = ROOT / "jobs"


def run_stage(stage: Stage, argv: list[str]) -> int:
    """The pipeline's stage runner: ``python jobs/<stage.job> argv...`` as its own process; returns its exit code.

    Output streams through. One process per stage gives each job its own Ray cluster and memory, exactly as a user
    running the stages by hand would.
    """
    return subprocess.call([sys.executable, str(JOBS / stage.job), *argv])


def results_lines(run_dir: Path) -> list[str]:
    """The metrics table plus the chance level and a sanity verdict (values in [0, 1], above chance)."""
    from lsvcr_dist.evaluate import HEADLINE, metrics_markdown
    from lsvcr_dist.metrics import chance_metrics

    table = json.loads((run_dir / "eval" / "metrics.json").read_text())
    lines = [metrics_markdown(table)]
    chance = chance_metrics(100)
    lines.append("chance (1 positive in 100 candidates): " + ", ".join(f"{k}={chance[k]:.4f}" for k in HEADLINE))
    for task in ("video", "comment"):
        if task in table:
            m = table[task]
            in_range = all(0.0 <= m[k] <= 1.0 for k in HEADLINE)
            lift = m["ndcg@10"] / chance["ndcg@10"]
            lines.append(f"{task}: values in [0, 1]: {in_range}; NDCG@10 = {m['ndcg@10']:.4f} = {lift:.1f}x chance")
    return lines


def main(argv: list[str] | None = None) -> int:
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="preset YAML under jobs/configs/")
    p.add_argument("--source", default="generate", help="raw logs: generate (default) or import:FORMAT:DIR "
                   "(runs jobs/import_logs.py into run_dir/raw first)")
    p.add_argument("--import-args", default="", help="extra jobs/import_logs.py options, one quoted string")
    p.add_argument("overrides", nargs="*", help="dotted overrides; stage-prefixed (finetune.max_epochs=5) or shared")
    args = p.parse_args(argv)
    from lsvcr_dist.config import ConfigError, check_overrides_known, load_config
    from lsvcr_dist.stages import StageError, run_pipeline

    try:
        check_overrides_known(args.overrides)
        run_dir = Path(load_config(args.config, "evaluate", [o for o in args.overrides
                                                              if o.startswith("run_dir=")]).run_dir)
        run_pipeline(args.config, args.overrides, run_stage, source=args.source,
                     import_args=shlex.split(args.import_args))
    except ConfigError as e:
        p.exit(2, f"config error: {e}\n")
    except StageError as e:
        print(f"pipeline: {e}", file=sys.stderr)
        return 1
    print("\n".join(results_lines(run_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
