"""Prepared shards -> ``ray.data.Dataset`` of INSTANCE rows, validated on the driver; per-epoch worker iteration.

Driver side::

    ds = read_instances(run_dir / "data", "train", fmt="parquet")       # checks every shard first
    ds = ds.map_batches(SomeTransform, batch_format="pyarrow", ...)      # uses to_numpy_batch inside
    TorchTrainer(..., datasets={"train": ds}, dataset_config=ingest_data_config())

Worker side (both training stages)::

    shard = ray.train.get_dataset_shard("train")
    for batch in epoch_iterator(shard, batch_size, epoch, shuffle_seed(cfg), cfg.ingest.shuffle_window, rank): ...

How training data is mixed across users, deterministically (one path for alignment and fine-tune):

1. Preparation writes the train split in a seeded global order (``train_order_key``: a splitmix64 hash of
   ``(seed, user_id, chronological index)``, as the sort key of the sort preparation runs anyway), so any run of
   consecutive rows is a uniform sample over all users. The manifest records it (``train_order``);
   ``read_instances(split="train")`` refuses train shards written in user order.
2. Every epoch each worker permutes consecutive windows of ``shuffle_window`` rows of its stream with a generator
   seeded by ``(seed, epoch, rank)`` (``epoch_iterator``), so batch composition changes every epoch.

Both steps are pure functions of (data, seed, epoch, rank): a resumed or restarted run re-streams exactly the rows of
the uninterrupted one (the loops skip the micro-batches a checkpoint already consumed). Alternatives rejected after
reading Ray 2.60's source: Ray's ``local_shuffle_buffer_size`` shuffles whatever blocks have arrived (timing-
dependent); ``FileShuffleConfig(seed)`` and ``random_shuffle(seed)`` reseed per execution from a counter local to
the process that executes the dataset (``DataContext._execution_idx``, ``hash((seed, execution_idx))``), which
restarts at 0 in a resumed trainer, and ``random_shuffle`` moves the whole split through the object store every
epoch (about 5 GB at paper scale, 900k rows with 50-long histories, on a 24 GiB box), where the write-time order
costs nothing extra and the window costs ``shuffle_window`` rows of memory per worker.

Ray Train's ``DataConfig`` splits every dataset with ``streaming_split(world_size, equal=True)``: each worker gets a
disjoint part with the same number of rows (at most ``world_size - 1`` remainder rows of an epoch are left out so
all workers take the same number of steps; ``drop_last`` also drops each worker's last partial batch). With
``preserve_order`` on (``ingest_data_config``) blocks go to workers greedily by rows received, so the split is
deterministic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.collate_fn import ArrowBatchCollateFn

from lsvcr_dist.data.epoch_cache import EpochCache
from lsvcr_dist.data.manifest import dims_of, read_manifest, shard_files
from lsvcr_dist.data.shards import WDS_SUFFIX, ShardError, check_parquet_file, check_wds_file, decode_records, \
    flatten_nested, records_to_table
from lsvcr_dist.schema import INSTANCE, TASK_COMMENT, TASK_VIDEO, SchemaError, resolve_shape

FORMATS = {"parquet": "parquet", "webdataset": "webdataset", "wds": "webdataset"}
TASKS = {"video": TASK_VIDEO, "comment": TASK_COMMENT}


def _fmt(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown shard format '{fmt}' (use parquet or webdataset)")
    return FORMATS[fmt]


def validate_shards(data_dir: str | Path, split: str, fmt: str = "parquet") -> dict:
    """Check, on the driver, that every shard of ``split`` listed in the manifest exists, is complete, has the
    manifest's row count and the INSTANCE schema (Parquet footer / first WebDataset sample).

    Returns:
        The manifest.

    Raises:
        ShardError: naming the file (and the column for a schema mismatch).
        ManifestError: missing manifest, unknown split or format.
    """
    fmt = _fmt(fmt)
    manifest = read_manifest(data_dir)
    dims = dims_of(manifest)
    paths = shard_files(data_dir, manifest, fmt, split)
    counts = manifest.get("shard_rows", {}).get(split, [None] * len(paths))
    for path, n in zip(paths, counts):
        if fmt == "parquet":
            check_parquet_file(path, INSTANCE, dims, expect_rows=n)
        else:
            check_wds_file(path, dims, expect_rows=n)
    return manifest


def _decode_wds(batch: pa.Table, dims: dict[str, int]) -> pa.Table:
    """map_batches UDF: Ray ``read_webdataset`` rows (``inst.npy`` bytes) -> INSTANCE table."""
    urls = batch.column("__url__").to_pylist() if "__url__" in batch.column_names else []
    source = f"{urls[0]}" if urls else "webdataset batch"
    if WDS_SUFFIX not in batch.column_names:
        raise ShardError(f"{source}: no '{WDS_SUFFIX}' member in samples (columns {batch.column_names})")
    return flatten_nested(records_to_table(decode_records(batch.column(WDS_SUFFIX).to_pylist(), dims, source), dims))


def _filter_tasks(batch: pa.Table, codes: list[int]) -> pa.Table:
    return batch.filter(pc.is_in(batch["task"], pa.array(codes, pa.int64())))


TRAIN_ORDER = "splitmix64(seed, user_id, seq)"
"""Manifest ``train_order.kind`` of a train split written in the seeded global order of ``train_order_key``."""

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a bijection with good avalanche."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return x ^ (x >> np.uint64(31))


def train_order_key(seed: int, user_id: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """Sort key of the train split's seeded global order: ``[N]`` int64 from ``[N]`` user ids and per-user indices.

    A hash, so the order is a pseudo-random permutation of all rows whatever the block layout; sorting by
    ``(key, user_id, seq)`` is a total order (ties in the 63-bit key are broken by the unique row identity).
    """
    u = np.asarray(user_id).astype(np.uint64)
    q = np.asarray(seq).astype(np.uint64)
    h = _splitmix64(_splitmix64(np.full(u.shape, np.uint64(seed & 0xFFFFFFFFFFFFFFFF))) ^ u)
    return (_splitmix64(h ^ q) >> np.uint64(1)).astype(np.int64)


def check_train_order(manifest: dict, data_dir: str | Path) -> None:
    """Refuse a train split written in user order (prepared before the global order existed).

    Raises:
        ShardError: naming the manifest and the fix.
    """
    order = manifest.get("train_order") or {}
    if order.get("kind") != TRAIN_ORDER:
        raise ShardError(
            f"{Path(data_dir) / 'manifest.json'}: the train split is not in the seeded global order (train_order="
            f"{order or 'missing'}): shards written in (user, time) order put one user's overlapping instances in "
            "the same batch; re-run jobs/prepare_data.py")


def read_instances(data_dir: str | Path, split: str, fmt: str = "parquet", tasks: list[str] | None = None,
                   validate: bool = True, override_num_blocks: int | None = None) -> "ray.data.Dataset":
    """Stream the INSTANCE rows of ``split`` (Arrow ``fixed_size_list`` columns) as a Ray Dataset.

    Args:
        data_dir: ``run_dir/data``.
        split: ``train``, ``val`` or ``test``.
        fmt: ``parquet`` or ``webdataset`` (same rows, same order).
        tasks: keep only these tasks (``["video"]``, ``["comment"]``); None = both.
        validate: run ``validate_shards`` on the driver first (before any worker starts).
        override_num_blocks: Ray read parallelism (default: Ray's choice).

    Returns:
        A lazy ``ray.data.Dataset`` of the INSTANCE columns, except that the one nested column,
        ``comment_hist_comments`` ``[L, K]``, travels flattened as a ``fixed_size_list[L*K]`` (pyarrow 26 corrupts
        nested fixed lists in the take/filter kernels Ray uses; see ``shards.flatten_nested``).
        ``to_numpy_batch(batch, dims)`` and ``InstanceCollate(dims)`` give it back as ``[B, L, K]``.

    Raises:
        ShardError / ManifestError: from ``validate_shards``; a train split not in the seeded global order.
        ValueError: unknown format or task.
    """
    fmt = _fmt(fmt)
    manifest = validate_shards(data_dir, split, fmt) if validate else read_manifest(data_dir)
    if split == "train":
        check_train_order(manifest, data_dir)
    dims = dims_of(manifest)
    paths = [str(p) for p in shard_files(data_dir, manifest, fmt, split)]
    if not paths:
        raise ShardError(f"{data_dir}: split '{split}' has no {fmt} shards")
    if fmt == "parquet":
        ds = ray.data.read_parquet(paths, override_num_blocks=override_num_blocks)
        ds = ds.map_batches(flatten_nested, batch_format="pyarrow")
    else:  # decoder=None: bytes stay bytes (no pickle path); we decode with allow_pickle=False
        ds = ray.data.read_webdataset(paths, decoder=None, override_num_blocks=override_num_blocks)
        ds = ds.map_batches(_decode_wds, fn_kwargs={"dims": dims}, batch_format="pyarrow")
    if tasks is not None:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown} (known: {list(TASKS)})")
        ds = ds.map_batches(_filter_tasks, fn_kwargs={"codes": [TASKS[t] for t in tasks]}, batch_format="pyarrow")
    return ds


def with_block_size(ds, block_mb: int):
    """``ds`` with Ray Data's target block size set to ``block_mb`` MiB for its whole plan (0: unchanged).

    The dataset's own ``DataContext`` copy is changed, so other datasets of the process keep theirs. Outputs of a
    map are cut at this size as they are produced, so a consumer gets the first rows after one block instead of
    after the default 128 MiB.
    """
    if block_mb:
        ds.context.target_max_block_size = block_mb << 20
    return ds


# --------------------------------------------------------------------------------------------------- batches
def _fixed_shape(t: pa.DataType) -> tuple[int, ...]:
    shape = []
    while pa.types.is_fixed_size_list(t):
        shape.append(t.list_size)
        t = t.value_type
    return tuple(shape)


def to_numpy_batch(batch: pa.Table | dict, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Arrow batch (or dict of arrays) -> ``{column: ndarray}`` with fixed-size-list columns as ``[B, ...]``.

    Shapes come from the Arrow types; for INSTANCE columns they are checked against ``dims`` when given, and a
    flattened ``comment_hist_comments`` ``[B, L*K]`` (as ``read_instances`` streams it) becomes ``[B, L, K]``.
    Use this inside ``map_batches(batch_format="pyarrow")`` instead of pyarrow ``take``/``filter`` on nested lists. Scalar
    columns become ``[B]`` arrays; string columns stay object arrays. A dict input may hold object arrays of
    per-row arrays (Ray's numpy format for fixed lists): they are stacked.

    Raises:
        SchemaError: a column's shape differs from the one ``dims`` implies (column named).
    """
    out: dict[str, np.ndarray] = {}
    if isinstance(batch, dict):
        for name, x in batch.items():
            x = np.asarray(x)
            out[name] = np.stack(list(x)) if x.dtype == object and len(x) and isinstance(x[0], np.ndarray) else x
    else:
        for name in batch.column_names:
            col = batch.column(name)
            shape = _fixed_shape(col.type)
            if shape:
                from lsvcr_dist.schema import fixed_list_to_numpy

                out[name] = fixed_list_to_numpy(col, shape)
            else:
                out[name] = col.to_numpy() if not pa.types.is_string(col.type) else \
                    np.asarray(col.to_pylist(), dtype=object)
    if dims:
        for name, x in out.items():
            if name in INSTANCE:
                want = resolve_shape(INSTANCE[name].shape, dims)
                if len(want) > 1 and x.shape[1:] == (int(np.prod(want)),):
                    x = out[name] = x.reshape((len(x), *want))  # flattened inside Ray (shards.flatten_nested)
                if x.shape[1:] != want:
                    raise SchemaError(f"column '{name}': expected per-row shape {want}, got {x.shape[1:]}")
    return out


class InstanceCollate(ArrowBatchCollateFn):
    """``iter_torch_batches`` collate: Arrow batch -> ``{column: torch.Tensor}`` (fixed lists as ``[B, ...]``).

    Args:
        dtypes: optional ``{column: torch.dtype}`` casts (default: the numpy dtype, int64 for ids).
        columns: keep only these columns (default all numeric columns).
        dims: manifest dims; reshapes the flattened ``comment_hist_comments`` to ``[B, L, K]`` (else ``[B, L*K]``).
    """

    def __init__(self, dtypes: dict | None = None, columns: list[str] | None = None, dims: dict | None = None):
        super().__init__()
        self.dtypes = dtypes or {}
        self.columns = columns
        self.dims = dims

    def __call__(self, batch: pa.Table) -> dict:
        import torch

        arrays = to_numpy_batch(batch if self.columns is None else batch.select(self.columns), self.dims)
        out = {}
        for name, x in arrays.items():
            if x.dtype == object:
                continue  # strings never reach the model
            # Arrow buffers are read-only; torch needs writable memory (one copy per batch)
            x = np.ascontiguousarray(x)
            t = torch.from_numpy(x if x.flags.writeable else x.copy())
            out[name] = t.to(self.dtypes[name]) if name in self.dtypes else t
        return out


def shuffled_batches(windows, batch_size: int, rng: np.random.Generator | None, drop_last: bool = True):
    """Re-batch a stream of tensor windows, permuting rows inside each window with ``rng``.

    Args:
        windows: iterable of ``{column: Tensor[W, ...]}`` (consecutive rows of the stream).
        batch_size: rows per yielded batch (rows carry over between windows).
        rng: permutation source; None keeps the stream order.
        drop_last: drop the final partial batch.

    Yields:
        ``{column: Tensor[batch_size, ...]}``. Deterministic given the window stream and the rng seed.
    """
    import torch

    carry = None
    for w in windows:
        n = len(next(iter(w.values())))
        if rng is not None:
            perm = torch.from_numpy(rng.permutation(n))
            w = {k: v[perm] for k, v in w.items()}
        if carry is not None:
            w = {k: torch.cat([carry[k], v]) for k, v in w.items()}
            n = len(next(iter(w.values())))
        full = n // batch_size * batch_size
        for start in range(0, full, batch_size):
            yield {k: v[start:start + batch_size] for k, v in w.items()}
        carry = {k: v[full:] for k, v in w.items()} if full < n else None
    if carry is not None and not drop_last:
        yield carry


def epoch_generator(seed: int, epoch: int, rank: int) -> np.random.Generator:
    """The window-permutation generator of one worker in one epoch: a function of ``(seed, epoch, rank)`` only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(rank)]))


def epoch_iterator(shard, batch_size: int, epoch: int, seed: int, window: int = 4096, rank: int = 0,
                   collate_fn=None, dtypes: dict | None = None, prefetch_batches: int = 2, drop_last: bool = True,
                   device: str = "auto", dims: dict | None = None, cache: EpochCache | None = None):
    """One epoch over a worker's dataset shard (``ray.train.get_dataset_shard(name)``): the training loops' only
    way to read data (see the module docstring for why this shuffle).

    Consecutive windows of ``window`` rows are permuted by ``epoch_generator(seed, epoch, rank)`` and re-batched, so
    an epoch replays exactly from ``(seed, epoch, rank)`` (the split itself is deterministic with
    ``ingest_data_config``).

    Args:
        shard: the worker's ``DataIterator``.
        batch_size: per-worker batch size.
        epoch: epoch index.
        seed: base seed (``shuffle_seed(cfg)``).
        window: rows per shuffle window (rounded up to ``batch_size``); 0 = stream order, the same every epoch.
        rank: the worker's rank (workers permute independently).
        collate_fn: Arrow batch -> tensors; None = ``InstanceCollate(dtypes, dims=dims)`` when ``dims`` is given
            (INSTANCE rows: fixed-size-list columns, which Ray's default collate cannot convert), else Ray's default
            collate with ``dtypes`` (rows of a ``map_batches`` transform, tensor columns).
        dtypes: torch dtypes (one, or per column).
        prefetch_batches: windows (or batches when ``window`` is 0) prefetched in the background.
        drop_last: drop the last partial batch (every worker takes the same number of steps).
        device: where Ray moves the tensors (``auto``: the worker's GPU if any).
        dims: manifest dims (INSTANCE rows: ``comment_hist_comments`` as ``[B, L, K]``).
        cache: the worker's ``EpochCache`` for this shard (kept across epochs): replays the windows of a complete
            pass instead of starting the pipeline again; the per-epoch permutation is applied after it, so a
            replayed epoch is the streamed one. ``window`` 0 turns it off.

    Returns:
        An iterable of ``{column: torch.Tensor}`` batches of ``batch_size`` rows.
    """
    if collate_fn is None and dims is not None:
        collate_fn, dtypes = InstanceCollate(dtypes, dims=dims), None
    kw = dict(prefetch_batches=prefetch_batches, collate_fn=collate_fn, dtypes=dtypes, device=device)
    if window <= 0:
        if cache is not None:  # stream order hands out the windows themselves: no copy to replay safely
            cache.off = True  # a config decision, so every worker takes it alike and settle needs no collective
        return shard.iter_torch_batches(batch_size=batch_size, drop_last=drop_last, **kw)
    window = -(-max(window, batch_size) // batch_size) * batch_size

    def stream():
        return shard.iter_torch_batches(batch_size=window, drop_last=False, **kw)

    windows = stream() if cache is None else cache.wrap(stream)
    return shuffled_batches(windows, batch_size, epoch_generator(seed, epoch, rank), drop_last)


def shuffle_seed(cfg) -> int:
    """Seed of the per-epoch windows of a stage config: the run's ``seed`` plus ``ingest.shuffle_seed``."""
    return int(cfg.seed) * 1_000_003 + int(cfg.ingest.shuffle_seed)


def ingest_data_config(preserve_order: bool = True):
    """Ray Train ``DataConfig`` splitting every dataset with ``streaming_split(equal=True)``, in deterministic
    order (``preserve_order``): the same data and seed give every worker the same rows in the same order."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    opts = DataConfig.default_ingest_options()
    opts.preserve_order = preserve_order
    return DataConfig(datasets_to_split="all", execution_options=ExecutionOptions(
        resource_limits=opts.resource_limits, exclude_resources=opts.exclude_resources,
        preserve_order=preserve_order, verbose_progress=opts.verbose_progress))


def probe_loop(config: dict) -> None:
    """Ray Train loop that only consumes data (the ingest test and ``benchmarks/data_throughput.py``).

    Per epoch each worker writes ``out_dir/rank{r}_epoch{e}.json`` with rows, batches, seconds, time to the
    first batch and (``record_keys``) the ``(user_id, timestamp, task, sum of comment_hist_comments)`` of every row
    in the order seen, and whether the epoch was ``replayed`` from the ``EpochCache``. Config keys: ``out_dir``,
    ``batch_size``, ``epochs``, ``seed``, ``shuffle_window``, ``dims``, ``record_keys``, ``dataset`` (default
    ``train``), ``cache_mb`` (default 0: stream every epoch).
    """
    import json
    import time

    import ray.train
    import torch
    import torch.distributed as dist

    def agree(ok: bool) -> bool:  # the training loops' all_true, kept here so data/ never imports train/
        t = torch.tensor([int(ok)])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard(config.get("dataset", "train"))
    out = Path(config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    cache = EpochCache(int(config.get("cache_mb", 0)))
    for epoch in range(int(config.get("epochs", 1))):
        t0 = time.perf_counter()
        keys, rows, batches, first, replayed = [], 0, 0, None, cache.replaying
        for batch in epoch_iterator(shard, int(config["batch_size"]), epoch, int(config.get("seed", 0)),
                                    int(config.get("shuffle_window", 0)), rank, dims=config.get("dims"),
                                    cache=cache):
            if first is None:
                first = time.perf_counter() - t0
            n = int(batch["user_id"].shape[0])
            rows, batches = rows + n, batches + 1
            if config.get("record_keys", True):
                chc = batch["comment_hist_comments"]
                sums = chc.reshape(n, -1).sum(1).tolist()
                keys += [[int(u), int(t), int(k), int(s), list(chc.shape[1:])] for u, t, k, s in
                         zip(batch["user_id"].tolist(), batch["timestamp"].tolist(), batch["task"].tolist(), sums)]
        if not cache.decided:
            cache.settle(agree)
        rec = {"rank": rank, "epoch": epoch, "rows": rows, "batches": batches, "seconds": time.perf_counter() - t0,
               "first_batch_s": first, "replayed": replayed, "keys": keys}
        (out / f"rank{rank}_epoch{epoch}.json").write_text(json.dumps(rec))
