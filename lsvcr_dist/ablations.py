"""Table 4 ablations and Table 2/3 baselines in the pipeline harness (``jobs/ablations.py``).

The full LSVCR run is the ordinary pipeline in ``run_dir``. Every variant runs into ``run_dir/ablations/<slug>/``,
which links to the main run's raw logs, prepared data and base embedding store (never regenerated); variants that
change only fine-tuning also link the main run's alignment outputs and aligned store, so only fine-tune + evaluate
rerun. Results: ``run_dir/ablations/{results.json, table4.md, tables23.md, figure4.md}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lsvcr_dist.config import load_config
from lsvcr_dist.stages import STAGES, Runner, Stage, run_pipeline


@dataclass(frozen=True)
class Variant:
    """One row: display name, folder slug and the overrides that define it."""

    name: str
    slug: str
    overrides: tuple[str, ...]


TABLE4 = (
    Variant("w/o L_SSC", "wo_ssc", ("align.loss.use_ssc=false",)),
    Variant("w/o L_VCC", "wo_vcc", ("align.loss.use_vcc=false",)),
    Variant("w/o ComDiv", "wo_comdiv", ("align.comdiv.enabled=false",)),
    Variant("w/o RandPosi", "wo_randposi", ("align.rand_pos=false", "finetune.position_extension=random")),
    Variant("w/o Alignment", "wo_alignment", ("finetune.init=scratch",)),
    Variant("w/o L_REG", "wo_reg", ("finetune.loss.use_reg=false",)),
)
BASELINES = (
    Variant("SASRec", "sasrec", ("finetune.init=scratch", "finetune.model=sasrec", "finetune.tasks=[video]")),
    Variant("DSSM", "dssm", ("finetune.init=scratch", "finetune.model=dssm", "finetune.tasks=[comment]")),
    # 4.4.2 as the public code runs it (disable_id): fine-tuned without ID embeddings, text only
    Variant("LSVCR w/o IDs", "no_ids", ("finetune.use_id=false",)),
)
ALL = TABLE4 + BASELINES
SHARED = ("raw", "data", "embeddings/base")
ALIGNED = ("align", "embeddings/aligned")


def stages_for(variant: Variant) -> list[Stage]:
    """Stages a variant reruns: alignment onwards when it changes alignment, else fine-tune + evaluate."""
    by_name = {s.name: s for s in STAGES}
    scratch = "finetune.init=scratch" in variant.overrides
    touches_align = any(o.startswith("align.") for o in variant.overrides)
    names = ["align", "encode_aligned", "finetune", "evaluate"] if touches_align and not scratch else [
        "finetune", "evaluate"]
    return [by_name[n] for n in names]


def link_shared(main: Path, sub: Path, variant: Variant) -> None:
    """Symlink the main run's reusable outputs into the variant folder (replacing stale links)."""
    names = list(SHARED)
    if stages_for(variant)[0].name == "finetune" and "finetune.init=scratch" not in variant.overrides:
        names += ALIGNED  # fine-tune-only variant: reuse the main alignment and aligned store
    link_dirs(main, sub, names, f"ablation '{variant.name}'")


def link_dirs(main: Path, sub: Path, names: list[str] | tuple[str, ...], needed_by: str) -> None:
    """Symlink ``main/<rel>`` to ``sub/<rel>`` for each name (a stale link is replaced, a real folder kept).

    Raises:
        FileNotFoundError: ``main/<rel>`` does not exist (names it and ``needed_by``).
    """
    for rel in names:
        src, dst = (main / rel).resolve(), sub / rel
        if not src.exists():
            raise FileNotFoundError(f"{src}: needed by {needed_by} (run the main pipeline first)")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink():
            dst.unlink()
        if not dst.exists():
            os.symlink(src, dst, target_is_directory=True)


def run_ablations(config: str | Path, overrides: list[str], runner: Runner, variants: tuple[Variant, ...] = ALL,
                  log: Callable[[str], None] = print) -> dict:
    """Main pipeline, then every variant; returns ``{variant name: metrics.json content}`` ("LSVCR" = main run).

    ``runner`` runs one stage's job (see ``stages.run_pipeline``).
    """
    main = Path(load_config(config, "evaluate", overrides).run_dir).resolve()
    base = [o for o in overrides if not o.startswith("run_dir=")]
    return run_variant_set(config, base, runner, variants, main, [], None, log)


def run_variant_set(config: str | Path, base: list[str], runner: Runner, variants: tuple[Variant, ...], main: Path,
                    extra: list[str], main_stages: list[Stage] | None, log: Callable[[str], None] = print) -> dict:
    """The main run in ``main`` (``main_stages``: default every stage), then each variant under
    ``main/ablations/<slug>``, all with ``base + extra`` overrides; writes the tables and returns the results."""
    run_pipeline(config, [*base, f"run_dir={main}", *extra], runner=runner, stages=main_stages, log=log)
    results = {"LSVCR": json.loads((main / "eval" / "metrics.json").read_text())}
    for v in variants:
        sub = main / "ablations" / v.slug
        link_shared(main, sub, v)
        log(f"[ablations] {v.name}: {' '.join(v.overrides)}")
        run_pipeline(config, [*base, f"run_dir={sub}", *extra, *v.overrides], runner=runner, stages=stages_for(v),
                     log=log)
        results[v.name] = json.loads((sub / "eval" / "metrics.json").read_text())
    write_tables(results, main / "ablations")
    return results


def _cell(results: dict, name: str, task: str, metric: str) -> str:
    m = results.get(name, {}).get(task)
    return f"{m[metric]:.4f}" if m else "-"


def table4_markdown(results: dict) -> str:
    """Table 4 layout: variants x (video R@10, N@10, comment R@10, N@10)."""
    lines = ["## Ablations (Table 4 layout; test split)", "",
             "| variant | video R@10 | video N@10 | comment R@10 | comment N@10 |", "|---|---|---|---|---|"]
    for name in ["LSVCR"] + [v.name for v in TABLE4]:
        if name in results:
            cells = [_cell(results, name, t, m) for t in ("video", "comment") for m in ("recall@10", "ndcg@10")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tables23_markdown(results: dict) -> str:
    """Table 2 (video) and Table 3 (comment) layout: methods x (R@5, R@10, N@5, N@10, MRR).

    The popularity row (training-target counts, no training) comes from the main run's ``metrics.json``.
    """
    cols = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "mrr")
    pop = results.get("LSVCR", {}).get("baselines", {}).get("popularity")
    results = {**results, "Popularity": pop} if pop and "Popularity" not in results else results
    out = []
    for task, title, methods in (("video", "Video recommendation (Table 2 layout)", ("Popularity", "SASRec", "LSVCR")),
                                 ("comment", "Comment recommendation (Table 3 layout)", ("Popularity", "DSSM",
                                                                                          "LSVCR"))):
        out += [f"## {title}", "", "| method | R@5 | R@10 | N@5 | N@10 | MRR |", "|---|---|---|---|---|---|"]
        for name in methods:
            if name in results:
                out.append(f"| {name} | " + " | ".join(_cell(results, name, task, c) for c in cols) + " |")
        out.append("")
    return "\n".join(out)


# Figure 4 rows: (label, results entry, where its subsets are: "subsets" = as scored, "ids_discarded" = the same
# weights scored without IDs)
FIGURE4_ROWS = (
    ("LSVCR, trained without IDs (public code's disable_id)", "LSVCR w/o IDs", "subsets"),
    ("LSVCR, IDs discarded at scoring", "LSVCR", "ids_discarded"),
    ("LSVCR, with IDs", "LSVCR", "subsets"),
    ("SASRec, with IDs (ID-only: nothing to score without them)", "SASRec", "subsets"),
    ("DSSM (text only)", "DSSM", "subsets"),
    ("Popularity, with IDs", "Popularity", "subsets"),
)


def figure4_markdown(results: dict) -> str:
    """Section 4.4.2 / Figure 4 layout: NDCG@10 (rows) on the unseen-videos and unseen-users subsets per task."""
    pop = results.get("LSVCR", {}).get("baselines", {}).get("popularity")
    results = {**results, "Popularity": pop} if pop and "Popularity" not in results else results
    cols = [(t, sub) for t in ("video", "comment") for sub in ("unseen_videos", "unseen_users")]
    lines = ["## Unseen videos / users (Section 4.4.2, Figure 4 layout; test NDCG@10, n rows)", "",
             "| model | " + " | ".join(f"{t} {sub.replace('_', ' ')}" for t, sub in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for label, name, where in FIGURE4_ROWS:
        block = (results.get(name) or {}).get(where, {})
        cells = []
        for task, sub in cols:
            m = block.get(task, {})
            m = {} if "unsupported" in m else m.get(sub, {})
            cells.append(f"{m['ndcg@10']:.4f} ({m['n']})" if m else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(results: dict, out_dir: str | Path) -> None:
    """``results.json``, ``table4.md``, ``tables23.md`` and ``figure4.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    (out / "table4.md").write_text(table4_markdown(results))
    (out / "tables23.md").write_text(tables23_markdown(results))
    (out / "figure4.md").write_text(figure4_markdown(results))
