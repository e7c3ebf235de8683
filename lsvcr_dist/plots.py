"""PNG plots of a run (matplotlib, Agg backend; no display needed), written into ``run_dir/eval/``.

* ``align_losses.png``: from ``run_dir/align/metrics.jsonl``, per step, the total loss and L_LM (left) and each
  contrastive loss beside its chance level (right): L_SR and L_SSC against ln(pool) (InfoNCE over a pool of N that
  has learned nothing sits at ln N), L_VCC against ln 2 (its two-way softmax);
* ``finetune_curves.png``: per task, training loss and validation NDCG@10 per epoch from
  ``run_dir/finetune/<task>/metrics.jsonl``;
* ``metrics.png``: the test metrics table (both tasks) as grouped bars beside the chance level.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lsvcr_dist.metrics import chance_metrics

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


CONTRASTIVE = (("loss_sr", "L_SR"), ("loss_ssc", "L_SSC"), ("loss_vcc", "L_VCC"))


def chance_levels(rows: list[dict]) -> dict[str, float]:
    """Chance level of each contrastive loss: ln(pool) for L_SR / L_SSC (the logged ``pool_size``), ln 2 for L_VCC."""
    pools = {int(r["pool_size"]) for r in rows if r.get("pool_size")}
    out = {"loss_vcc": math.log(2)}
    if len(pools) == 1:
        out["loss_sr"] = out["loss_ssc"] = math.log(pools.pop())
    return out


def plot_align_losses(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Alignment losses vs optimizer step: total and L_LM (left); L_SR, L_SSC, L_VCC with dashed chance lines."""
    rows = read_jsonl(metrics_jsonl)
    if not rows:
        raise ValueError(f"{metrics_jsonl}: no metric lines")
    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4))
    steps = [r.get("step", i) for i, r in enumerate(rows)]
    for part in ("loss", "loss_lm"):
        if any(part in r for r in rows):
            ax.plot(steps, [r.get(part, float("nan")) for r in rows], label=part, lw=2 if part == "loss" else 1)
    chance = chance_levels(rows)
    for key, name in CONTRASTIVE:
        if not any(key in r for r in rows):
            continue
        line, = bx.plot(steps, [r.get(key, float("nan")) for r in rows], label=name)
        if key in chance:
            label = f"chance ln {round(math.exp(chance[key]))} = {chance[key]:.2f}"
            bx.axhline(chance[key], ls="--", lw=1, c=line.get_color(), label=f"{name} {label}")
    ax.set(xlabel="alignment step", ylabel="loss", title="Alignment loss (Eq. 16) and L_LM (Eq. 14)")
    bx.set(xlabel="alignment step", ylabel="InfoNCE", title="Contrastive losses vs chance (Eq. 11-13, 15)")
    ax.legend()
    bx.legend(fontsize=7)
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
