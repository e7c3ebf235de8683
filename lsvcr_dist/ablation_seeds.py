"""Ablations and baselines over several training seeds: mean and standard deviation (``jobs/ablations.py --seeds``).

Seed 0 is the ordinary harness in ``run_dir`` (the config's own ``align.seed`` / ``finetune.seed``). Seed k > 0 runs
in ``run_dir/seeds/seed<k>/`` with both training seeds shifted by k and the main run's raw logs, prepared data and
base store linked, so every seed trains and is scored on the same data and candidates: the spread is the training
randomness (initialisation, dropout, randomized positions, ComDiv, data order), not a different dataset.
Results: ``run_dir/ablations/{seeds.json, seeds.md}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from lsvcr_dist.ablations import ALL, SHARED, Variant, link_dirs, run_ablations, run_variant_set
from lsvcr_dist.config import load_config
from lsvcr_dist.stages import STAGES, Runner

SEED_STAGES = ("align", "encode_aligned", "finetune", "evaluate")
"""What a seed k > 0 reruns for its main run (data and the base store are shared)."""
METRICS = ("recall@10", "ndcg@10")


def seed_overrides(config: str | Path, overrides: list[str], k: int) -> list[str]:
    """Stage-prefixed overrides shifting both training seeds by ``k`` (the data stages keep theirs)."""
    a = load_config(config, "align", overrides).seed
    f = load_config(config, "finetune", overrides).seed
    return [f"align.seed={a + k}", f"finetune.seed={f + k}"]


def run_seeds(config: str | Path, overrides: list[str], runner: Runner, seeds: int,
              variants: tuple[Variant, ...] = ALL, log: Callable[[str], None] = print) -> dict:
    """``seeds`` full ablation sets; returns ``summarize`` of them and writes ``seeds.json`` / ``seeds.md``."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    main = Path(load_config(config, "evaluate", overrides).run_dir).resolve()
    base = [o for o in overrides if not o.startswith("run_dir=")]
    runs = [run_ablations(config, overrides, runner, variants, log)]
    stages = [s for s in STAGES if s.name in SEED_STAGES]
    for k in range(1, seeds):
        sub = main / "seeds" / f"seed{k}"
        link_dirs(main, sub, SHARED, "the seed runs")
        extra = seed_overrides(config, overrides, k)
        log(f"[ablations] seed {k}: {' '.join(extra)}")
        runs.append(run_variant_set(config, base, runner, variants, sub, extra, stages, log))
    summary = summarize(runs)
    out = main / "ablations"
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=1, sort_keys=True))
    (out / "seeds.md").write_text(seeds_markdown(summary, seeds))
    return summary


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for one value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def summarize(runs: list[dict]) -> dict:
    """``{name: {task: {metric: [mean, std, n]}}}`` over the seed runs, popularity included (the same each seed)."""
    out: dict = {}
    for run in runs:
        pop = run.get("LSVCR", {}).get("baselines", {}).get("popularity")
        for name, res in ({**run, "Popularity": pop} if pop else run).items():
            for task in ("video", "comment"):
                for metric in METRICS:
                    if res and task in res and metric in res[task]:
                        out.setdefault(name, {}).setdefault(task, {}).setdefault(metric, []).append(
                            float(res[task][metric]))
    return {name: {task: {m: [*mean_std(v), len(v)] for m, v in ms.items()} for task, ms in tasks.items()}
            for name, tasks in out.items()}


def seeds_markdown(summary: dict, seeds: int) -> str:
    """Methods x (video R@10, N@10, comment R@10, N@10) as ``mean ± std`` over the seeds."""
    lines = [f"## LSVCR, baselines and ablations over {seeds} training seed(s) (test split, mean ± sample std)", "",
             "| method | video R@10 | video N@10 | comment R@10 | comment N@10 |", "|---|---|---|---|---|"]
    order = ["Popularity", "SASRec", "DSSM", "LSVCR"] + [v.name for v in ALL if v.name not in ("SASRec", "DSSM")]
    for name in [n for n in order if n in summary]:
        cells = []
        for task in ("video", "comment"):
            for metric in METRICS:
                cell = summary[name].get(task, {}).get(metric)
                cells.append(f"{cell[0]:.4f} ± {cell[1]:.4f}" if cell else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
