"""Data preparation on Ray Data: raw logs -> lookup tables, split instances with candidates, sharded outputs.

Steps (``prepare(cfg)``):

1. On the driver: ``raw.validate_raw`` checks every raw part file (schema, ids, order); a truncated part fails
   here naming the file, before any Ray task starts.
2. Lookup tables, streamed on the driver (O(batch) memory plus id-indexed int arrays): comments by id
   (``data/tables/comments.parquet`` + an Arrow IPC twin for memory mapping; Ray Data sorts them first if the raw
   parts are not in id order), per-video top-P popular comments by one lexsort (``data/tables/videos.parquet``).
3. Instance plan, on the driver (``plan.plan_instances``): both interaction tables (a few int64 columns per
   interaction) become one narrow row per instance with its split, filter reason, ``_seq`` and history offsets,
   vectorised over all users at once. The time split is by calendar day (UTC) of the target: the last
   ``test_days`` days are test, the ``val_days`` before validation.
4. The kept rows are sorted by their narrow keys into shard order (val/test by ``(user_id, _seq)``; train by a
   seeded hash, ``ingest.train_order_key``, so training batches mix users), cut into chunks of ``CHUNK_ROWS``, and
   Ray Data builds the wide rows (histories, candidates) of each chunk in one task (``plan.build_rows``), in order.
   The driver streams them into Parquet and WebDataset shards of ``shard_rows`` rows per split; the manifest
   records counts, dims, shards, filter reasons. No group-by and no sort of wide rows: at paper scale the old
   per-user ``groupby().map_groups()`` plus a global sort of ~5 GB of rows spent minutes in Ray's all-to-all
   exchanges; the narrow keys sort in well under a second. Shard bytes do not depend on the block layout.

Inside Ray the nested ``comment_hist_comments`` column is flattened (``shards.flatten_nested``: pyarrow 26
corrupts sliced nested fixed lists in take/filter); shards on disk have the exact nested INSTANCE schema.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pyarrow.parquet as pq
import ray

from lsvcr_dist.config import PrepareConfig
from lsvcr_dist.data import raw as raw_mod
from lsvcr_dist.data.ingest import TRAIN_ORDER
from lsvcr_dist.data.instances import SECONDS_PER_DAY, SPLIT_NAMES, PrepContext
from lsvcr_dist.data.manifest import write_manifest
from lsvcr_dist.data.plan import EventIndex, build_rows, count_plan, index_events, output_order, plan_chunks, \
    plan_instances
from lsvcr_dist.data.shards import to_instance_table, write_parquet_shard, write_wds_shard
from lsvcr_dist.schema import COMMENT_TABLE, INSTANCE, SCHEMA_VERSION, TASK_COMMENT, TASK_VIDEO, VIDEO_TABLE, \
    fixed_list_to_numpy, to_arrow_schema

TASK_NAMES = {TASK_VIDEO: "video", TASK_COMMENT: "comment"}
CHUNK_ROWS = 4096
"""Output rows per Ray task of the row builder (about 22 MB of wide rows at paper dims)."""


def dims_from_config(cfg: PrepareConfig) -> dict[str, int]:
    """The manifest ``dims`` implied by a PrepareConfig."""
    return {"L": cfg.finetune_hist_len, "LA": cfg.align_hist_len, "K": cfg.max_comments_per_record,
            "P": cfg.popular_comments, "NV": cfg.num_video_candidates, "NC": cfg.num_comment_candidates,
            "NT": cfg.train_comment_negatives + 1}


# --------------------------------------------------------------------------------------------------- tables
def _ids_in_order(paths: list[Path]) -> bool:
    """True if the comment ids of the part files, read in order, are 1, 2, 3, ... (reads only that column)."""
    expect = 1
    for f in paths:
        ids = pq.read_table(f, columns=["comment_id"]).column(0).to_numpy()
        if len(ids) and not np.array_equal(ids, np.arange(expect, expect + len(ids))):
            return False
        expect += len(ids)
    return True


def _write_table(table: pa.Table, path: Path) -> None:
    """Parquet (the contract) plus an uncompressed Arrow IPC twin that ``tables.TextLookup`` memory-maps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    feather.write_feather(table, path.with_suffix(".arrow"), compression="uncompressed")


def build_tables(files: dict[str, list[Path]], tables_dir: Path, num_videos: int, num_comments: int,
                 p: int) -> tuple[np.ndarray, dict[str, str]]:
    """Write ``videos``/``comments`` lookup tables; returns (comment_video [C+1], relative table paths)."""
    comment_video = np.zeros(num_comments + 1, np.int64)
    popularity = np.zeros(num_comments + 1, np.int64)
    target = to_arrow_schema(COMMENT_TABLE)
    # Raw parts written by generate/importers are already in id order: stream them (O(batch) memory). Otherwise
    # let Ray Data sort them.
    batches = (b for _, _, b in raw_mod.iter_raw_batches(files["comments"][0].parent.parent, "comments"))
    if not _ids_in_order(files["comments"]):
        ds = ray.data.read_parquet([str(f) for f in files["comments"]]).sort("comment_id")
        batches = ds.iter_batches(batch_size=65_536, batch_format="pyarrow")
    path = tables_dir / "comments.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    expect = 1
    with pq.ParquetWriter(path, target) as pw, pa.ipc.new_file(str(path.with_suffix(".arrow")), target) as iw:
        for batch in batches:
            batch = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
            batch = batch.select(target.names).cast(target)
            ids = batch.column("comment_id").to_numpy()
            if len(ids) and not np.array_equal(ids, np.arange(expect, expect + len(ids))):
                raise ValueError(f"{files['comments'][0].parent}: comment ids are not dense 1..{num_comments}")
            comment_video[ids] = batch.column("video_id").to_numpy()
            popularity[ids] = batch.column("popularity").to_numpy()
            expect += len(ids)
            pw.write_table(batch)
            iw.write_table(batch)
    # top-P per video by (popularity desc, id asc): one lexsort over the id-indexed arrays gathered above
    popular = np.zeros((num_videos + 1, p), np.int64)
    ids = np.arange(1, num_comments + 1, dtype=np.int64)
    order = np.lexsort((ids, -popularity[1:], comment_video[1:]))
    cv = comment_video[1:][order]
    starts = np.searchsorted(cv, cv, side="left")
    rank = np.arange(len(cv)) - starts
    keep = rank < p
    popular[cv[keep], rank[keep]] = ids[order][keep]
    videos = pa.concat_tables([pq.read_table(f, columns=["video_id", "title"]) for f in files["videos"]])
    videos = videos.sort_by("video_id")
    vids = videos.column("video_id").to_numpy()
    counts = np.bincount(comment_video[1:], minlength=num_videos + 1)
    from lsvcr_dist.schema import numpy_to_fixed_list
    vt = pa.table({"video_id": pa.array(vids, pa.int64()), "title": videos.column("title").cast(pa.string()),
                   "popular_comments": numpy_to_fixed_list(popular[vids]),
                   "num_comments": pa.array(counts[vids], pa.int64())}, schema=to_arrow_schema(VIDEO_TABLE, {"P": p}))
    _write_table(vt, tables_dir / "videos.parquet")
    return comment_video, {"videos": "tables/videos.parquet", "comments": "tables/comments.parquet",
                           "videos_arrow": "tables/videos.arrow", "comments_arrow": "tables/comments.arrow"}


# --------------------------------------------------------------------------------------------------- events
def _event_stats(raw_dir: Path, val_start_ts: int, k: int, num_videos: int) -> tuple[np.ndarray, int]:
    """Driver-side column scan: videos in any interaction before validation starts ([V+1] bool, for
    ``target_seen``) and the number of comment records longer than K (counted as ``truncated_comments``)."""
    seen = np.zeros(num_videos + 1, bool)
    for table in ("video_inter", "comment_inter"):
        for _, _, b in raw_mod.iter_raw_batches(raw_dir, table, ["video_id", "timestamp"]):
            v = b.column(0).to_numpy()
            seen[v[b.column(1).to_numpy() < val_start_ts]] = True
    over = 0
    for _, _, b in raw_mod.iter_raw_batches(raw_dir, "comment_inter", ["comment_ids"]):
        over += int(pc.sum(pc.greater(pc.list_value_length(b.column(0)), k)).as_py() or 0)
    return seen, over


def _np_rows(col: pa.ChunkedArray, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of a scalar or one-level fixed-list column as numpy (``[n]`` or ``[n, W]``)."""
    t = col.type
    if pa.types.is_fixed_size_list(t):
        return fixed_list_to_numpy(col, (t.list_size,))[idx]
    return col.to_numpy()[idx]


class _ShardWriter:
    """Cuts the sorted stream into shards of ``shard_rows`` rows per split, in both formats."""

    def __init__(self, data_dir: Path, formats: list[str], shard_rows: int, dims: dict[str, int]):
        self.data_dir, self.formats, self.shard_rows, self.dims = data_dir, formats, shard_rows, dims
        self.shards = {fmt: {s: [] for s in SPLIT_NAMES} for fmt in formats}
        self.counts: dict[str, list[int]] = {s: [] for s in SPLIT_NAMES}
        self.pending: dict[int, list[pa.Table]] = {i: [] for i in range(len(SPLIT_NAMES))}
        self.schema = to_arrow_schema(INSTANCE, dims)

    def add(self, batch: pa.Table) -> None:
        """Route rows to their split's buffer; write every full shard."""
        code = batch["_split"].to_numpy()
        for i in np.unique(code).tolist():
            # rows are selected in numpy, never with pyarrow take/filter (see shards.flatten_nested)
            idx = np.flatnonzero(code == i)
            cols = {n: batch[n] for n in INSTANCE}
            rows = to_instance_table({n: _np_rows(c, idx) for n, c in cols.items()}, self.dims)
            self.pending[i].append(rows)
            buf = pa.concat_tables(self.pending[i])
            while buf.num_rows >= self.shard_rows:
                self._write(i, buf.slice(0, self.shard_rows))
                buf = buf.slice(self.shard_rows)
            self.pending[i] = [buf] if buf.num_rows else []

    def close(self) -> None:
        """Write the last, shorter shard of each split."""
        for i, bufs in self.pending.items():
            if bufs:
                self._write(i, pa.concat_tables(bufs))
            self.pending[i] = []

    def _write(self, i: int, table: pa.Table) -> None:
        split = SPLIT_NAMES[i]
        n = len(self.counts[split])
        table = to_instance_table(table, self.dims)  # fresh, unsliced arrays
        if "parquet" in self.formats:
            rel = f"parquet/{split}/part-{n:05d}.parquet"
            write_parquet_shard(self.data_dir / rel, table, self.dims)
            self.shards["parquet"][split].append(rel)
        if "webdataset" in self.formats:
            rel = f"wds/{split}/shard-{n:05d}.tar"
            write_wds_shard(self.data_dir / rel, table, self.dims)
            self.shards["webdataset"][split].append(rel)
        self.counts[split].append(table.num_rows)


def _csr(comment_video: np.ndarray, num_videos: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(1, len(comment_video), dtype=np.int64)
    order = np.argsort(comment_video[1:], kind="stable")
    offsets = np.zeros(num_videos + 2, np.int64)
    offsets[1:] = np.cumsum(np.bincount(comment_video[1:], minlength=num_videos + 1))
    return offsets, ids[order]


# --------------------------------------------------------------------------------------------------- main
def validate_inputs(cfg: PrepareConfig) -> dict:
    """Driver-side checks before Ray starts: every raw part file (``raw.validate_raw``) against the config.

    Returns:
        The raw statistics of ``validate_raw``.

    Raises:
        raw.RawDataError: a raw file is corrupt/truncated or malformed (names file, row, column).
        ValueError: fewer videos than ``num_video_candidates``.
    """
    raw_dir = Path(cfg.raw_dir) if cfg.raw_dir else Path(cfg.run_dir) / "raw"
    stats = raw_mod.validate_raw(raw_dir)
    if stats["num_videos"] < cfg.num_video_candidates:
        raise ValueError(f"prepare.num_video_candidates={cfg.num_video_candidates} exceeds the "
                         f"{stats['num_videos']} videos in {raw_dir}")
    return stats


def prepare(cfg: PrepareConfig, log: Callable[[str], None] = print, stats: dict | None = None) -> dict:
    """Run the whole preparation (needs an initialised Ray); returns the manifest written.

    Args:
        cfg: the stage config.
        log: progress printer.
        stats: the result of ``validate_inputs(cfg)`` if the caller already ran it (skips a second scan).

    Raises:
        raw.RawDataError: a raw file is corrupt/truncated or malformed (names file, row, column).
        ValueError: too few videos/comments for the candidate counts.
    """
    t0 = time.time()
    stats = stats or validate_inputs(cfg)  # driver-side, file by file: bad input fails before any task starts
    run_dir = Path(cfg.run_dir)
    raw_dir = Path(cfg.raw_dir) if cfg.raw_dir else run_dir / "raw"
    data_dir = run_dir / "data"
    files = raw_mod.raw_dir_paths(raw_dir)
    dims = dims_from_config(cfg)
    log(f"[prepare] raw validated in {time.time() - t0:.1f}s: {stats}")
    if data_dir.exists():
        for sub in ("parquet", "wds", "tables", "manifest.json"):
            p = data_dir / sub
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    comment_video, table_paths = build_tables(files, data_dir / "tables", stats["num_videos"], stats["num_comments"],
                                              dims["P"])
    log(f"[prepare] tables written in {time.time() - t0:.1f}s")
    split_days = _split_days(stats["max_timestamp"], cfg)
    plan, ev, ctx, truncated = build_instances(cfg, raw_dir, stats, comment_video, split_days)
    splits, filtered = count_plan(plan)
    filtered = {"truncated_comments": truncated, **filtered}
    log(f"[prepare] instances planned in {time.time() - t0:.1f}s")
    shards, shard_counts = write_shards(plan, ev, ctx, data_dir, cfg, dims, splits, log)
    log(f"[prepare] shards written in {time.time() - t0:.1f}s: {splits}")

    manifest = {
        "schema_version": SCHEMA_VERSION, "num_users": int(stats["max_user_id"]),
        "num_videos": int(stats["num_videos"]), "num_comments": int(stats["num_comments"]), "dims": dims,
        "splits": splits, "shards": shards, "shard_rows": shard_counts, "tables": table_paths, "filtered": filtered,
        "seed": cfg.seed, "raw_dir": str(raw_dir), "split_days": split_days, "comment_pad": cfg.comment_pad,
        "raw_stats": stats, "train_order": {"kind": TRAIN_ORDER, "seed": cfg.seed},
        "wds_encoding": "one <key>.inst.npy per sample: a (1,) structured int64 record, fields = INSTANCE columns",
    }
    write_manifest(data_dir, manifest)
    log(f"[prepare] done in {time.time() - t0:.1f}s -> {data_dir}")
    return manifest


def _split_days(max_timestamp: int, cfg: PrepareConfig) -> dict[str, int]:
    """Calendar days (UTC) where validation and test start: the last ``test_days`` are test, ``val_days`` before."""
    last_day = max_timestamp // SECONDS_PER_DAY
    test_start = last_day - cfg.test_days + 1
    return {"val_start_day": int(test_start - cfg.val_days), "test_start_day": int(test_start),
            "last_day": int(last_day)}


def build_instances(cfg: PrepareConfig, raw_dir: Path, stats: dict, comment_video: np.ndarray,
                    split_days: dict[str, int]) -> tuple[dict, EventIndex, PrepContext, int]:
    """The narrow plan of every instance (``plan.plan_instances``), computed on the driver from the two
    interaction tables (a few int64 columns per interaction).

    Returns:
        ``(plan, events, ctx, truncated)``: the plan columns, the sorted ``EventIndex`` and ``PrepContext`` the
        row builders need, and the comment records longer than K (cut to K, counted as ``truncated_comments``).
    """
    nv, ncm = stats["num_videos"], stats["num_comments"]
    val_start, test_start = split_days["val_start_day"], split_days["test_start_day"]
    train_videos, truncated = _event_stats(raw_dir, val_start * SECONDS_PER_DAY, cfg.max_comments_per_record, nv)
    offsets, by_video = _csr(comment_video, nv)
    ctx = PrepContext(num_videos=nv, num_comments=ncm, comment_video=comment_video, video_offsets=offsets,
                      video_comments=by_video, train_videos=train_videos, val_start_day=int(val_start),
                      test_start_day=int(test_start), dims=dims_from_config(cfg), seed=cfg.seed,
                      comment_pad=cfg.comment_pad, unseen_user_frac=cfg.unseen_user_frac)
    cols = ["user_id", "video_id", "timestamp"]
    ev = index_events(raw_mod.read_raw_table(raw_dir, "video_inter", cols),
                      raw_mod.read_raw_table(raw_dir, "comment_inter", cols + ["comment_ids"]),
                      cfg.max_comments_per_record)
    return plan_instances(ev, ctx), ev, ctx, truncated


def write_shards(plan: dict, ev: EventIndex, ctx: PrepContext, data_dir: Path, cfg: PrepareConfig,
                 dims: dict[str, int], splits: dict, log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Build the wide rows on Ray Data, chunk by chunk in shard order, and cut them into shards of both formats.

    The kept plan rows are put in their final order first (``plan.output_order``: a sort of narrow keys), so each
    Ray task builds a run of consecutive output rows and the shard bytes do not depend on the block layout or the
    number of workers; no all-to-all exchange of wide rows happens.

    Returns:
        ``(shard paths by format and split, rows of each shard by split)``.

    Raises:
        RuntimeError: a split's written rows differ from its counted rows.
    """
    order = output_order(plan)
    chunk = max(1, -(-len(order) // cfg.num_partitions)) if cfg.num_partitions else CHUNK_ROWS
    chunks = plan_chunks(plan, order, chunk)
    writer = _ShardWriter(data_dir, cfg.formats, cfg.shard_rows, dims)
    if chunks:
        ds = ray.data.from_arrow(chunks).map_batches(build_rows, fn_kwargs={"ev": ev, "ctx": ctx}, batch_size=None,
                                                     batch_format="pyarrow")
        t_write = 0.0
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            t = time.perf_counter()
            writer.add(batch)
            t_write += time.perf_counter() - t
        log(f"[prepare] {len(order)} rows built in {len(chunks)} Ray tasks; shard writing took {t_write:.1f}s of it")
    writer.close()
    for split in SPLIT_NAMES:
        written = sum(writer.counts[split])
        if written != sum(splits[split].values()):
            raise RuntimeError(f"split {split}: wrote {written} rows, counted {sum(splits[split].values())}")
    return writer.shards, writer.counts
