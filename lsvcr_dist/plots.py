"""PNG plots of a run (matplotlib, Agg backend; no display needed), written into ``run_dir/eval/``.

* ``align_losses.png``: the alignment loss and its parts (L_LM, L_SR, L_SSC, L_VCC) per step from
  ``run_dir/align/metrics.jsonl``;
* ``finetune_curves.png``: per task, training loss and validation NDCG@10 per epoch from
  ``run_dir/finetune/<task>/metrics.jsonl``;
* ``metrics.png``: the test metrics table (both tasks) as grouped bars beside the chance level.
"""

from __future__ import annotations

import json
from pathlib import Path

from lsvcr_dist.metrics import chance_metrics

ALIGN_PARTS = ("loss", "loss_lm", "loss_sr", "loss_ssc", "loss_vcc")
HEADLINE = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "mrr")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file.

    Raises:
        ValueError: a malformed line (names the file and line number).
    """
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e})") from None
    return out


def plot_align_losses(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Alignment loss parts vs optimizer step (one line per part present in the log)."""
    rows = read_jsonl(metrics_jsonl)
    if not rows:
        raise ValueError(f"{metrics_jsonl}: no metric lines")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r.get("step", i) for i, r in enumerate(rows)]
    for part in ALIGN_PARTS:
        if any(part in r for r in rows):
            ax.plot(steps, [r.get(part, float("nan")) for r in rows], label=part, lw=2 if part == "loss" else 1)
    ax.set_xlabel("alignment step")
    ax.set_ylabel("loss")
    ax.set_title("Personalized preference alignment (Eq. 16)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def plot_finetune_curves(run_dir: str | Path, out_png: str | Path) -> Path:
    """Training loss and validation NDCG@10 per epoch of every fine-tuned task."""
    run_dir = Path(run_dir)
    logs = {t: run_dir / "finetune" / t / "metrics.jsonl" for t in ("video", "comment")}
    logs = {t: read_jsonl(p) for t, p in logs.items() if p.is_file()}
    if not logs:
        raise ValueError(f"{run_dir / 'finetune'}: no metrics.jsonl")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for task, rows in logs.items():
        tr = [r for r in rows if r.get("loss") is not None]
        axes[0].plot([r["epoch"] for r in tr], [r["loss"] for r in tr], marker="o", label=task)
        axes[1].plot([r["epoch"] for r in rows], [r["val"]["ndcg@10"] for r in rows], marker="o", label=task)
    axes[1].axhline(chance_metrics(100)["ndcg@10"], ls="--", c="grey", label="chance (100 cand.)")
    axes[0].set(xlabel="epoch", ylabel="training loss (L_FT)", title="Fine-tune loss")
    axes[1].set(xlabel="epoch (0 = before fine-tuning)", ylabel="val NDCG@10", title="Validation")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def plot_metrics_table(metrics_json: str | Path, out_png: str | Path) -> Path:
    """Grouped bars of the headline test metrics per task, with the chance level of 100 candidates."""
    table = json.loads(Path(metrics_json).read_text())
    tasks = [t for t in ("video", "comment", "video_full") if t in table]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / (len(tasks) + 1)
    chance = chance_metrics(100)
    series = [(t, [table[t][m] for m in HEADLINE]) for t in tasks] + [("chance", [chance[m] for m in HEADLINE])]
    for i, (name, vals) in enumerate(series):
        ax.bar([j + i * width for j in range(len(HEADLINE))], vals, width, label=name)
    ax.set_xticks([j + width * len(tasks) / 2 for j in range(len(HEADLINE))], HEADLINE)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test metric")
    ax.set_title("LSVCR test metrics (Section 4.1.3 protocol)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def plot_run(run_dir: str | Path) -> dict[str, str]:
    """Every plot whose input exists into ``run_dir/eval``; returns ``{name: path or 'skipped: reason'}``."""
    run_dir = Path(run_dir)
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    done = {}
    jobs = {
        "align_losses": (run_dir / "align" / "metrics.jsonl",
                         lambda: plot_align_losses(run_dir / "align" / "metrics.jsonl", out / "align_losses.png")),
        "finetune_curves": (run_dir / "finetune",
                            lambda: plot_finetune_curves(run_dir, out / "finetune_curves.png")),
        "metrics": (out / "metrics.json", lambda: plot_metrics_table(out / "metrics.json", out / "metrics.png")),
    }
    for name, (needed, fn) in jobs.items():
        if not needed.exists():
            done[name] = f"skipped: {needed} missing"
            continue
        done[name] = str(fn())
    return done
