"""Evaluation protocol (Section 4.1.3) and the 4.4.2 subsets, library side of ``jobs/evaluate.py``.

Reads the prepared Parquet shards of a split with pyarrow (evaluation runs on one process; the candidate sets are
fixed at preparation, so numbers are repeatable), applies the evaluation-mode ``FinetuneTransform`` (top-1 popular
comment) and scores the candidates with a fine-tuned model. Reported per task: Recall@5/10, NDCG@5/10, MRR
(untruncated; ``mrr@10`` beside it), plus, for the video task, a full ranking of the target against every video, and
the unseen-videos (``target_seen == 0``) and unseen-users (``user_seen == 0``) subsets with their row counts
(an empty subset is ``n = 0`` with zeros, never NaN). Section 4.4.2 scores those subsets with the ID embeddings
discarded; they are reported both ways (``subsets``: IDs as trained; ``ids_discarded``: text only, see
``finetune_model.ids_discarded``). Every run also reports the popularity baseline (training-target counts) on the
same candidates (``baselines.popularity``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from lsvcr_dist import schema
from lsvcr_dist.data.ft_transforms import FinetuneTransform
from lsvcr_dist.data.manifest import read_manifest, shard_files
from lsvcr_dist.metrics import MetricAccumulator, per_row_metrics
from lsvcr_dist.models.baselines import Popularity
from lsvcr_dist.models.finetune_model import IDOnlyModelError, ids_discarded
from lsvcr_dist.progress import Progress, emit

TASK_IDS = {"video": schema.TASK_VIDEO, "comment": schema.TASK_COMMENT}
HEADLINE = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "mrr")


def iter_split(data_dir: str | Path, split: str, task: str, batch_size: int, train_mode: bool = False,
               seed: int = 0, limit: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """FINETUNE_BATCH tensors of one split and task, read shard by shard in manifest order.

    Args:
        data_dir: prepared data folder.
        split: ``train``/``val``/``test``.
        task: ``video`` or ``comment``.
        batch_size: rows per yielded batch (the last one may be smaller).
        train_mode: random top-3 popular comments (training) instead of the top-1 (evaluation).
        seed: transform seed.
        limit: stop after this many rows (0 = all).

    Yields:
        dict of int64 tensors with the ``schema.FINETUNE_BATCH`` keys.
    """
    manifest = read_manifest(data_dir)
    tf = FinetuneTransform(str(data_dir), train=train_mode, seed=seed)
    want = TASK_IDS[task]
    seen = 0
    for path in shard_files(data_dir, manifest, "parquet", split):
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise schema.SchemaError(f"{path}: unreadable shard ({e})") from None
        if "task" not in table.column_names:
            raise schema.SchemaError(f"{path}: missing column 'task'")
        table = table.filter(pc.equal(table.column("task"), want))
        for start in range(0, table.num_rows, batch_size):
            part = table.slice(start, batch_size)
            if limit:
                if seen >= limit:
                    return
                part = part.slice(0, limit - seen)
            seen += part.num_rows
            yield {k: torch.from_numpy(v) for k, v in tf(part).items()}


def split_rows(data_dir: str | Path, split: str, task: str, limit: int = 0) -> int:
    """Rows of ``task`` in ``split`` by the manifest's counts (0 when it has none), capped by ``limit`` (0 = all)."""
    n = int(read_manifest(data_dir).get("splits", {}).get(split, {}).get(task, 0))
    return min(n, limit) if limit else n


def _score_pass(model: torch.nn.Module, data_dir, split: str, task: str, ks, batch_size: int, full_ranking: bool,
                subsets: bool, limit: int, prog: Progress | None = None) -> dict:
    """One pass over the split: accumulated metrics of every row, the full ranking and the two 4.4.2 subsets;
    ``prog`` counts a step per batch and its rows."""
    acc = {name: MetricAccumulator(ks) for name in ("metrics", "full", "unseen_videos", "unseen_users")}
    full = full_ranking and task == "video"
    with model.videos_fixed() if full and hasattr(model, "videos_fixed") else nullcontext():
        _score_batches(model, iter_split(data_dir, split, task, batch_size, limit=limit), acc, ks, full, subsets,
                       prog)
    if prog is not None:
        prog.done()
    return {k: a.result() for k, a in acc.items()}


def _score_batches(model, batches, acc: dict, ks, full: bool, subsets: bool, prog: Progress | None) -> None:
    """Accumulate every batch's per-row metrics into ``acc`` (``_score_pass``'s loop)."""
    rows_done = 0
    for batch in batches:
        s = model(batch)  # [B, d]: one SR forward serves the candidates and the full ranking
        scores, pos, mask = model.eval_scores(batch, s)
        rows = per_row_metrics(scores, pos, mask, ks, row_offset=rows_done)
        acc["metrics"].update(rows)
        if subsets:
            acc["unseen_videos"].update(rows, batch["target_seen"] == 0)
            acc["unseen_users"].update(rows, batch["user_seen"] == 0)
        if full:
            all_scores = model.video_scores(s)  # [B, V + 1], column 0 masked
            pos_all = torch.zeros_like(all_scores, dtype=torch.bool)
            pos_all[torch.arange(len(s)), batch["target_video"]] = True
            cand = torch.ones_like(pos_all)
            cand[:, 0] = False
            acc["full"].update(per_row_metrics(all_scores, pos_all, cand, ks, row_offset=rows_done))
        rows_done += scores.shape[0]
        if prog is not None:
            prog.update(1, scores.shape[0])


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, data_dir: str | Path, split: str, task: str, *, ks=(5, 10),
                   batch_size: int = 256, full_ranking: bool = False, subsets: bool = True, limit: int = 0,
                   progress: str = "", progress_every_s: float = 30.0, log=emit) -> dict:
    """Metrics of ``model`` on one split and task.

    Args:
        model: a ``FinetuneModel`` (or baseline with the same ``eval_scores`` / ``video_scores`` interface).
        data_dir: prepared data folder.
        split: split evaluated.
        task: ``video`` or ``comment``.
        ks: Recall/NDCG cut-offs.
        batch_size: rows per forward.
        full_ranking: video task only: also rank the target against every video.
        subsets: also report the unseen-videos / unseen-users subsets, and every row and both subsets again with
            the ID embeddings discarded (4.4.2, ``finetune_model.ids_discarded``).
        limit: rows evaluated at most (0 = all).
        progress: name of the progress lines (``"evaluate video"``), printed by ``log`` at most every
            ``progress_every_s`` seconds per pass (rows scored, rows/s, ETA from the manifest's split counts);
            "" = silent.
        progress_every_s: seconds between progress lines at most (plus one batch).
        log: line printer of the progress lines.

    Returns:
        ``{"metrics": {...,"n"}, "full": {...} (video + full_ranking), "subsets": {"unseen_videos": {...},
        "unseen_users": {...}}, "ids_discarded": {"all": .., "unseen_videos": .., "unseen_users": ..}}``; for an
        ID-only model ``ids_discarded`` is ``{"unsupported": reason}``.
    """
    was_training = model.training
    model.eval()
    total = split_rows(data_dir, split, task, limit)

    def prog(name: str) -> Progress | None:
        return Progress(name, 0, progress_every_s, log=log, unit="rows", total_samples=total) if progress else None

    full = full_ranking and task == "video"
    res = _score_pass(model, data_dir, split, task, ks, batch_size, full_ranking, subsets, limit,
                      prog(f"{progress} ({split}{', all videos ranked' if full else ''})"))
    out = {"metrics": res["metrics"]}
    if full:
        out["full"] = res["full"]
    if subsets:
        out["subsets"] = {"unseen_videos": res["unseen_videos"], "unseen_users": res["unseen_users"]}
        try:
            with ids_discarded(model):
                text = _score_pass(model, data_dir, split, task, ks, batch_size, False, True, limit,
                                   prog(f"{progress} ({split}, IDs discarded)"))
            out["ids_discarded"] = {"all": text["metrics"], "unseen_videos": text["unseen_videos"],
                                    "unseen_users": text["unseen_users"]}
        except IDOnlyModelError as e:
            out["ids_discarded"] = {"unsupported": str(e)}
    model.train(was_training)
    return out


def popularity_model(data_dir: str | Path, task: str) -> Popularity:
    """The popularity baseline of ``task``: counts of the task's targets over the TRAINING split.

    Reads only the ``task`` and target columns of the training shards (no transform).
    """
    man = read_manifest(data_dir)
    num_ids = int(man["num_videos"] if task == "video" else man["num_comments"])
    k = int(man["dims"]["K"])

    def targets():
        for path in shard_files(data_dir, man, "parquet", "train"):
            try:
                t = pq.read_table(path, columns=["task", "target_video", "target_comments"])
            except Exception as e:  # noqa: BLE001 - re-raised with the file named
                raise schema.SchemaError(f"{path}: unreadable shard or missing target columns ({e})") from None
            t = t.filter(pc.equal(t.column("task"), TASK_IDS[task]))
            comments = schema.fixed_list_to_numpy(t.column("target_comments"), (k,))
            yield {"target_video": torch.tensor(t.column("target_video").to_numpy()),
                   "target_comments": torch.tensor(comments)}

    return Popularity(Popularity.count_targets(targets(), task, num_ids), task)


def results_table(results: dict) -> dict:
    """Shape per-task evaluations into the ``metrics.json`` layout.

    ``{"video": {recall@5,..,mrr, mrr@10, n}, "comment": {...}, "video_full": {...},
    "subsets": {"video": {"unseen_videos": .., "unseen_users": ..}, "comment": {...}},
    "ids_discarded": {"video": {"all": .., "unseen_videos": .., "unseen_users": ..} or {"unsupported": ..}, ...}}``.
    """
    out: dict = {}
    for task, res in results.items():
        out[task] = res["metrics"]
        if "full" in res:
            out[f"{task}_full"] = res["full"]
        if "subsets" in res:
            out.setdefault("subsets", {})[task] = res["subsets"]
        if "ids_discarded" in res:
            out.setdefault("ids_discarded", {})[task] = res["ids_discarded"]
    return out


def _fmt_row(name: str, m: dict, cols=HEADLINE) -> str:
    return f"| {name} | " + " | ".join(f"{m.get(c, 0.0):.4f}" for c in cols) + f" | {m.get('n', '')} |"


def metrics_markdown(table: dict, title: str = "LSVCR evaluation (test split, Section 4.1.3 protocol)") -> str:
    """The ``metrics.json`` content as Markdown: the model's rows (tasks, full ranking, 4.4.2 subsets with the IDs
    as trained and with the IDs discarded) and the popularity baseline's rows beside them."""
    head = ["| task | " + " | ".join(HEADLINE) + " | n |", "|---|" + "---|" * (len(HEADLINE) + 1)]
    lines = [f"## {title}", "", *head, *_model_rows(table)]
    pop = table.get("baselines", {}).get("popularity")
    if pop:
        lines += ["", "### Popularity baseline (training-target counts, no training, same candidates)", "", *head,
                  *_model_rows(pop)]
    return "\n".join(lines) + "\n"


def _model_rows(table: dict) -> list[str]:
    lines = []
    for task in ("video", "comment", "video_full"):
        if task in table:
            lines.append(_fmt_row(task + (" (all videos ranked)" if task == "video_full" else ""), table[task]))
    for task, subs in table.get("subsets", {}).items():
        for name, m in subs.items():
            lines.append(_fmt_row(f"{task} / {name.replace('_', ' ')} (with IDs)", m))
    for task, subs in table.get("ids_discarded", {}).items():
        if "unsupported" in subs:
            lines.append(f"| {task} / IDs discarded | n/a: {subs['unsupported']} |" + " |" * len(HEADLINE))
            continue
        for name, m in subs.items():
            lines.append(_fmt_row(f"{task} / {name.replace('_', ' ')} (IDs discarded, 4.4.2)", m))
    return lines


def write_results(table: dict, out_dir: str | Path) -> Path:
    """``metrics.json`` + ``metrics.md`` into ``out_dir``; json written last as the completion signal."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.md").write_text(metrics_markdown(table))
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
    tmp.replace(out / "metrics.json")
    return out / "metrics.json"


class EvaluationError(RuntimeError):
    """Nothing was evaluated for a task (the message names the split and task); no metrics file is written."""


def evaluate_run(cfg, export: bool = True) -> dict:
    """Evaluate every fine-tuned task of ``cfg.run_dir`` on the test split and write ``run_dir/eval``.

    Args:
        cfg: ``EvalConfig``.
        export: also export each task's TorchScript scorer into ``run_dir/export/<task>/``.

    Returns:
        The ``metrics.json`` table.

    Raises:
        FileNotFoundError: no fine-tuned model at all (names the folder).
        EvaluationError: a task has 0 test instances (names the split and task).
    """
    from lsvcr_dist.finetuned import load_finetuned

    run_dir = Path(cfg.run_dir)
    data_dir = run_dir / "data"
    results = {}
    for task in ("video", "comment"):
        best = run_dir / "finetune" / task / "best"
        if not best.exists():
            continue
        model, args = load_finetuned(best)
        if getattr(model, "sr", None) is not None and export:  # what ships: TorchScript scorer beside the store
            from lsvcr_dist.models.export import export_scorer

            example = next(iter_split(data_dir, "test", task, 4), None)
            if example is None:
                raise EvaluationError(f"{data_dir}: the 'test' split has no {task} instances; no metrics written")
            export_scorer(model, example, run_dir / "export" / task, {"text_store": args["text_store"]})
        results[task] = evaluate_model(model, data_dir, "test", task, ks=tuple(cfg.ks), batch_size=cfg.batch_size,
                                       full_ranking=cfg.full_ranking, progress=f"evaluate {task}",
                                       progress_every_s=cfg.progress_every_s)
        if not results[task]["metrics"]["n"]:  # all-zero metrics for nothing evaluated would read as a result
            raise EvaluationError(f"{data_dir}: 0 {task} instances evaluated on the 'test' split (batch_size="
                                  f"{cfg.batch_size}); no metrics written")
    if not results:
        raise FileNotFoundError(f"{run_dir / 'finetune'}: no fine-tuned model (run jobs/finetune.py first)")
    table = results_table(results)
    popular = {task: evaluate_model(popularity_model(data_dir, task), data_dir, "test", task, ks=tuple(cfg.ks),
                                    batch_size=cfg.batch_size, full_ranking=cfg.full_ranking,
                                    progress=f"evaluate popularity {task}", progress_every_s=cfg.progress_every_s)
               for task in results}
    table["baselines"] = {"popularity": results_table(popular)}
    write_results(table, run_dir / "eval")
    return table
