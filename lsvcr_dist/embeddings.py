"""EmbeddingStore: text vectors of every title and comment, sharded fp16 ``.npy`` files, memory-mapped.

Layout of ``run_dir/embeddings/<which>/``::

    manifest.json        model id/kind, adapter (or null), pooling, dim, count, num_videos, num_comments,
                         projected, dtype, shard_rows, shards [{file, start, rows, bytes, sha256}]
    shard-00000.npy      rows [0, shard_rows) in text-id order; row 0 (text id 0, padding) is zeros
    shard-00001.npy      ...

Row ``i`` is text id ``i``: the title of video ``v`` is row ``v``, comment ``c`` is row ``num_videos + c``.
``EmbeddingWriter`` accepts rows in any order (Ray Data batch inference does not keep order), writes them into
pre-sized memory-mapped shards, refuses a second write of an id and NaN/inf vectors (naming the text id), and at
``close()`` checks that every id 1..count was written exactly once before it writes the manifest.

Disk: ``(1 + count) * dim * 2`` bytes (fp16).

The writer also measures, in the same pass, how much the vectors differ (``StoreStats``, manifest ``stats``): per group
(titles, comments) the mean pairwise cosine, the norm of the mean vector against the spread around it, and the
spread of every dimension. A near-constant store (information only under a large shared offset, e.g. every title at
cosine 0.997 of every other) warns naming the store and the numbers; a degenerate one (rows differ by less than
``MIN_RELATIVE_SPREAD`` of their norm, below fp16 resolution for practical purposes) is refused at ``close`` unless
``allow_degenerate``.

``standardize=True`` (the base store under ``llm.text_norm=standardize``) rewrites the shards at ``close`` as
``(x - center) / scale`` with the per-dimension mean and standard deviation over every title and comment, saved as
``center.npy`` / ``scale.npy`` (``manifest["text_norm"]``) so that the online alignment path and the aligned encoder
apply the same map to fresh LLM(t) vectors (``load_text_norm``); ``stats_raw`` keeps the statistics before it.

Resume: the writer marks each shard complete (flushed, size and sha256 recorded atomically, ``store_progress``) as
soon as all its rows are written; ``EmbeddingWriter(..., resume=True)`` keeps those shards of an interrupted write
with the same settings and ``pending()`` gives the text ids left. The statistics (and the standardisation) are
computed at ``close`` in one pass in id order, so a resumed store is byte-identical to an uninterrupted one.

Integrity: ``close()`` records each shard's size and sha256. ``open()`` checks every shard's size, and with
``verify="full"`` (the default; ``LSVCR_STORE_VERIFY=size`` makes ``"size"`` the default) also its sha256 and that
every vector is finite, naming the shard and the text id. Full verification reads the whole store once (shards in
parallel): measured in ``benchmarks/RESULTS.md``.

A run records its store relative to the run directory (``store_ref``/``resolve_store``), so a copied or moved run
reads its own store.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lsvcr_dist import store_progress as progress
from lsvcr_dist.checksums import BLOCK, check_record, file_record
from lsvcr_dist.store_stats import (  # noqa: F401 - thresholds re-exported: one import path for the store
    MIN_RELATIVE_SPREAD,
    NEAR_CONSTANT_COSINE,
    StoreStats,
    judge_stats,
)

MANIFEST = "manifest.json"
FORMAT = "lsvcr-embeddings/1"
VERIFY_MODES = ("full", "size")


class EmbeddingError(ValueError):
    """A store is incomplete, inconsistent with its manifest, or was given a bad vector (names file / text id)."""


def shard_name(i: int) -> str:
    """File name of shard ``i``."""
    return f"shard-{i:05d}.npy"


def _chunks(shards: list[np.ndarray], shard_rows: int, size: int = 65_536):
    """``(shard, lo, ids)`` over every row in id order, ``size`` rows at a time (bounded memory)."""
    for s, arr in enumerate(shards):
        for lo in range(0, arr.shape[0], size):
            yield s, lo, np.arange(s * shard_rows + lo, s * shard_rows + min(lo + size, arr.shape[0]))


def load_text_norm(path: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """``(center [dim], scale [dim])`` float32 of a standardised store, or None when it is stored raw.

    Raises:
        FileNotFoundError: no manifest; EmbeddingError: a listed file missing or of the wrong shape.
    """
    path = Path(path)
    man_path = path / MANIFEST
    if not man_path.exists():
        raise FileNotFoundError(f"{man_path}: no embedding store manifest (run jobs/encode_text.py)")
    manifest = json.loads(man_path.read_text())
    norm = manifest.get("text_norm")
    if not norm or norm.get("kind") != "standardize":
        return None
    out = []
    for key in ("center", "scale"):
        f = path / norm[key]
        if not f.is_file():
            raise EmbeddingError(f"{f}: listed in the manifest's text_norm but missing")
        arr = np.load(f, allow_pickle=False)
        if arr.shape != (manifest["dim"],):
            raise EmbeddingError(f"{f}: shape {arr.shape}, expected ({manifest['dim']},)")
        out.append(arr.astype(np.float32))
    return out[0], out[1]


class EmbeddingWriter:
    """Incremental, order-free writer of a store.

    Args:
        path: store folder (created; an existing manifest there is replaced only at ``close``).
        dim: vector width.
        num_videos: V.
        num_comments: C (``count = V + C`` texts, rows ``0..count``).
        shard_rows: rows per shard file.
        meta: manifest fields (model, kind, adapter, pooling, projected, which, ...).
        standardize: rewrite the store per-dimension standardised at ``close`` (module docstring).
        resume: keep the shards an interrupted write of the same settings completed (``store_progress``); their
            rows must not be written again (``pending()`` lists the rest). False = start over.
    """

    def __init__(self, path: str | Path, dim: int, num_videos: int, num_comments: int, shard_rows: int = 100_000,
                 meta: dict | None = None, standardize: bool = False, resume: bool = False) -> None:
        if dim <= 0 or shard_rows <= 0:
            raise ValueError(f"dim={dim} and shard_rows={shard_rows} must be positive")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        stale = self.path / MANIFEST
        if stale.exists():
            stale.unlink()  # a half-rewritten store must not look complete
        self.dim, self.num_videos, self.num_comments = int(dim), int(num_videos), int(num_comments)
        self.count = self.num_videos + self.num_comments
        self.shard_rows = int(shard_rows)
        self.meta = dict(meta or {})
        self.standardize = bool(standardize)
        rows = self.count + 1
        bounds = [(start, min(self.shard_rows, rows - start)) for start in range(0, rows, self.shard_rows)]
        signature = {"format": FORMAT, "dim": self.dim, "count": self.count, "num_videos": self.num_videos,
                     "num_comments": self.num_comments, "shard_rows": self.shard_rows,
                     "standardize": self.standardize, "meta": self.meta}
        keep, self.resume_note = {}, "resume off"
        if resume:
            keep, self.resume_note = progress.completed(self.path, signature, [shard_name(i) for i in
                                                                              range(len(bounds))])
        if not keep:
            progress.start(self.path, signature)
        self.resumed = sorted(keep)
        """Shards kept from an interrupted write (their rows are never written again)."""
        self.written = np.zeros(rows, dtype=bool)
        self.written[0] = True  # row 0 is the padding row, zeros by construction
        self.shards, self.done = [], np.zeros(len(bounds), dtype=bool)
        for s, (start, n) in enumerate(bounds):
            f = self.path / shard_name(s)
            if s in keep:
                arr = np.load(f, mmap_mode="r+", allow_pickle=False)
                if arr.dtype != np.float16 or arr.shape != (n, dim):
                    raise EmbeddingError(f"{f}: {arr.dtype} {arr.shape}, expected float16 ({n}, {dim})")
                self.written[start:start + n] = True
                self.done[s] = True
            else:
                progress.unmark(self.path, shard_name(s))
                # "w+" truncates and re-creates the file: it reads as zeros without writing them (sparse until
                # written), so opening a fresh store costs no pass over its bytes
                arr = np.lib.format.open_memmap(f, mode="w+", dtype=np.float16, shape=(n, dim))
            self.shards.append(arr)

    @staticmethod
    def interrupted_dim(path: str | Path) -> int | None:
        """Vector width of an interrupted write in ``path`` (its ``progress.json``), None when there is none."""
        prog = Path(path) / progress.PROGRESS
        try:
            return int(json.loads(prog.read_text())["dim"]) if prog.is_file() else None
        except (ValueError, KeyError, TypeError):
            return None

    def pending(self) -> list[tuple[int, int]]:
        """Text-id ranges ``[first, end)`` still to write: every shard not kept from an interrupted write."""
        out: list[tuple[int, int]] = []
        for s, arr in enumerate(self.shards):
            if self.done[s]:
                continue
            lo, hi = max(1, s * self.shard_rows), s * self.shard_rows + arr.shape[0]
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi)
            elif hi > lo:
                out.append((lo, hi))
        return out

    def write(self, text_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store ``vectors[i]`` at row ``text_ids[i]``.

        Args:
            text_ids: ``[N]`` ids in 1..count.
            vectors: ``[N, dim]`` float.

        Raises:
            EmbeddingError: wrong shape, id out of range or written twice, NaN/inf before or after the fp16 cast.
        """
        ids = np.asarray(text_ids, dtype=np.int64).reshape(-1)
        vec = np.asarray(vectors)
        if vec.shape != (len(ids), self.dim):
            raise EmbeddingError(f"{self.path}: vectors of shape {vec.shape} for {len(ids)} ids of dim {self.dim}")
        bad = (ids < 1) | (ids > self.count)
        if bad.any():
            raise EmbeddingError(f"{self.path}: text id {int(ids[bad][0])} outside 1..{self.count}")
        uniq, counts = np.unique(ids, return_counts=True)
        if self.written[ids].any() or (counts > 1).any():
            dup = ids[self.written[ids]] if self.written[ids].any() else uniq[counts > 1]
            raise EmbeddingError(f"{self.path}: text id {int(dup[0])} written twice")
        with np.errstate(over="ignore"):  # overflow to inf is caught right below, naming the text id
            half = vec.astype(np.float16)
        for name, arr in (("input", vec), ("fp16 cast", half)):
            finite = np.isfinite(arr).all(axis=1)
            if not finite.all():
                raise EmbeddingError(f"{self.path}: non-finite vector ({name}) for text id {int(ids[~finite][0])}")
        touched = np.unique(ids // self.shard_rows)
        for s in touched:
            sel = ids // self.shard_rows == s
            self.shards[s][ids[sel] - s * self.shard_rows] = half[sel]
        self.written[ids] = True
        for s in touched:  # a shard whose rows are all written is flushed and marked: a resumed write keeps it
            s = int(s)
            if self.written[s * self.shard_rows:s * self.shard_rows + self.shards[s].shape[0]].all():
                self.shards[s].flush()
                progress.mark(self.path, shard_name(s))
                self.done[s] = True

    def close(self, allow_degenerate: bool = False) -> dict:
        """Flush shards, check completeness and spread, write ``manifest.json`` (with ``stats`` and ``warnings``).

        Args:
            allow_degenerate: write the manifest even when a group of vectors is degenerate (``judge_stats``).

        Returns:
            The manifest dict.

        Raises:
            EmbeddingError: some text ids were never written (the first few are named), or a degenerate group
                (names the store, the group and its numbers) without ``allow_degenerate``; no manifest is written.
        """
        missing = np.flatnonzero(~self.written)
        if len(missing):
            raise EmbeddingError(f"{self.path}: {len(missing)} text ids never written, e.g. {missing[:5].tolist()}")
        stats = raw = self._stats()
        extra = {}
        if self.standardize:
            _, errors = judge_stats(raw, self.path)
            if not errors:  # a degenerate store is not rescaled (its noise would become unit variance)
                progress.clear(self.path)  # the shards are rewritten: their completion records no longer hold
                stats, extra = self._standardize(), {"stats_raw": raw}
        warns, errors = judge_stats(stats, self.path, raw)
        if errors and not allow_degenerate:
            raise EmbeddingError("; ".join(errors) + " (encode.allow_degenerate=true writes it anyway)")
        for w in warns + errors:
            warnings.warn(w, stacklevel=2)
        shards = []
        for arr in self.shards:
            arr.flush()
        with ThreadPoolExecutor(4) as pool:  # sha256 releases the GIL: shards hash in parallel
            records = list(pool.map(lambda i: file_record(self.path / shard_name(i)), range(len(self.shards))))
        for s, (arr, rec) in enumerate(zip(self.shards, records)):
            shards.append({"file": shard_name(s), "start": s * self.shard_rows, "rows": int(arr.shape[0]), **rec})
        manifest = {
            "format": FORMAT, "model": None, "kind": None, "adapter": None, "pooling": "mean", "projected": False,
            **self.meta,
            "dim": self.dim, "count": self.count, "num_videos": self.num_videos, "num_comments": self.num_comments,
            "dtype": "float16", "shard_rows": self.shard_rows, "shards": shards, "stats": stats,
            "warnings": warns + errors, **extra,
        }
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.replace(self.path / MANIFEST)  # atomic: a store with a manifest is complete
        progress.clear(self.path)
        self.shards = []
        return manifest

    def _stats(self) -> dict:
        """``StoreStats`` summaries of titles and comments from one pass in id order: the same numbers whatever
        order the rows were written in, and whether or not the write was resumed."""
        st = {"titles": StoreStats(self.dim), "comments": StoreStats(self.dim)}
        for s, lo, ids in _chunks(self.shards, self.shard_rows):
            half = np.asarray(self.shards[s][lo:lo + len(ids)])
            st["titles"].add(half[(ids > 0) & (ids <= self.num_videos)])
            st["comments"].add(half[ids > self.num_videos])
        return {k: v.summary() for k, v in st.items()}


    def _standardize(self) -> dict:
        """Rewrite every shard as ``(x - center) / scale`` (row 0 stays zero), save ``center.npy`` / ``scale.npy``;
        returns the statistics of the rewritten vectors."""
        # center/scale from a pass in id order: the same bytes whatever order the rows were written in
        total, total_sq = np.zeros(self.dim, np.float64), np.zeros(self.dim, np.float64)
        for s, lo, ids in _chunks(self.shards, self.shard_rows):
            x = np.asarray(self.shards[s][lo:lo + len(ids)], np.float64)
            total += x.sum(0)  # row 0 is zeros and not counted below
            total_sq += (x * x).sum(0)
        n = max(self.count, 1)
        mean = total / n
        std = np.sqrt(np.clip(total_sq / n - mean * mean, 0.0, None))
        center = mean.astype(np.float32)
        scale = np.where(std > 1e-6 * max(float(std.max()), 1e-30), std, 1.0).astype(np.float32)  # constant dim: 1
        np.save(self.path / "center.npy", center)
        np.save(self.path / "scale.npy", scale)
        self.meta["text_norm"] = {"kind": "standardize", "center": "center.npy", "scale": "scale.npy"}
        after = {k: StoreStats(self.dim) for k in ("titles", "comments")}
        for s, lo, ids in _chunks(self.shards, self.shard_rows):
            arr = self.shards[s]
            x = (np.asarray(arr[lo:lo + len(ids)], np.float32) - center) / scale
            x[ids == 0] = 0.0
            with np.errstate(over="ignore"):
                half = x.astype(np.float16)
            if not np.isfinite(half).all():
                raise EmbeddingError(f"{self.path}: standardised vectors overflow fp16 in shard {shard_name(s)}")
            arr[lo:lo + len(ids)] = half
            after["titles"].add(half[(ids > 0) & (ids <= self.num_videos)])
            after["comments"].add(half[ids > self.num_videos])
        return {k: v.summary() for k, v in after.items()}


class EmbeddingStore:
    """Read side: memory-mapped shards; use ``EmbeddingStore.open(path)``.

    Attributes:
        manifest: the parsed ``manifest.json``.
        dim: vector width.
        count: number of texts (V + C); rows are ``0..count``.
    """

    def __init__(self, path: Path, manifest: dict, shards: list[np.ndarray]) -> None:
        self.path, self.manifest, self.shards = path, manifest, shards
        self.dim = int(manifest["dim"])
        self.count = int(manifest["count"])
        self.num_videos = int(manifest["num_videos"])
        self.num_comments = int(manifest["num_comments"])
        self.shard_rows = int(manifest["shard_rows"])

    @classmethod
    def open(cls, path: str | Path, verify: str | None = None) -> "EmbeddingStore":
        """Open a complete store (``np.load(mmap_mode="r")`` per shard) and check it against its manifest.

        Args:
            path: store folder.
            verify: ``"full"``: size, sha256 and finite values of every shard (reads the store once);
                ``"size"``: sizes only (no read). Default: ``$LSVCR_STORE_VERIFY`` or ``"full"``.

        Raises:
            FileNotFoundError: no manifest (the store was never finished).
            EmbeddingError: a shard missing, unreadable (e.g. a pickled object array), of the wrong shape/dtype,
                size or checksum, or holding a NaN/inf vector; names the file (and the text id).
        """
        path = Path(path)
        verify = verify or os.environ.get("LSVCR_STORE_VERIFY", "full")
        if verify not in VERIFY_MODES:
            raise EmbeddingError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        man_path = path / MANIFEST
        if not man_path.exists():
            raise FileNotFoundError(f"{man_path}: no embedding store manifest (run jobs/encode_text.py)")
        manifest = json.loads(man_path.read_text())
        for key in ("dim", "count", "num_videos", "num_comments", "shard_rows", "shards"):
            if key not in manifest:
                raise EmbeddingError(f"{man_path}: manifest has no key '{key}'")
        shards, expect_start = [], 0
        for entry in manifest["shards"]:
            f = path / entry["file"]
            if not f.exists():
                raise EmbeddingError(f"{f}: shard listed in the manifest is missing")
            try:
                arr = np.load(f, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:  # pickled object arrays land here: never unpickled
                raise EmbeddingError(f"{f}: not a float16 .npy shard ({e})") from None
            if arr.dtype != np.float16 or arr.shape != (entry["rows"], manifest["dim"]):
                raise EmbeddingError(f"{f}: {arr.dtype} {arr.shape}, manifest says float16 "
                                     f"({entry['rows']}, {manifest['dim']})")
            if entry["start"] != expect_start:
                raise EmbeddingError(f"{f}: starts at row {entry['start']}, expected {expect_start}")
            expect_start += entry["rows"]
            shards.append(arr)
        if expect_start != manifest["count"] + 1:
            raise EmbeddingError(f"{man_path}: shards hold {expect_start} rows, expected count + 1 = "
                                 f"{manifest['count'] + 1}")
        _verify_shards(path, manifest["shards"], shards, full=verify == "full")
        return cls(path, manifest, shards)

    def lookup(self, text_ids: np.ndarray) -> np.ndarray:
        """Vectors of text ids (0 gives zeros).

        Args:
            text_ids: int array of any shape ``[...]``.

        Returns:
            float32 ``[..., dim]``.

        Raises:
            EmbeddingError: an id outside 0..count (names it).
        """
        ids = np.asarray(text_ids, dtype=np.int64)
        flat = ids.reshape(-1)
        bad = (flat < 0) | (flat > self.count)
        if bad.any():
            raise EmbeddingError(f"{self.path}: text id {int(flat[bad][0])} outside 0..{self.count}")
        out = np.empty((len(flat), self.dim), dtype=np.float32)
        if len(self.shards) == 1:
            out[:] = self.shards[0][flat]
            return out.reshape(*ids.shape, self.dim)
        # one sort, then one contiguous run of positions per shard hit (a mask per shard would be O(shards x ids))
        shard_of = flat // self.shard_rows
        order = np.argsort(shard_of, kind="stable")
        sorted_shards = shard_of[order]
        cuts = np.flatnonzero(np.diff(sorted_shards)) + 1
        for part in np.split(order, cuts):
            if len(part):
                s = int(shard_of[part[0]])
                out[part] = self.shards[s][flat[part] - s * self.shard_rows]
        return out.reshape(*ids.shape, self.dim)

    def as_array(self) -> np.ndarray:
        """All rows ``[1 + count, dim]`` float32 in memory (the fine-tune text table)."""
        return np.concatenate([np.asarray(s, dtype=np.float32) for s in self.shards], axis=0)

    def as_tensor(self):
        """``torch.Tensor`` ``[1 + count, dim]`` float32, row 0 zeros."""
        import torch

        return torch.from_numpy(self.as_array())


def _scan_shard(f: Path, entry: dict, arr: np.memmap) -> str | None:
    """One pass over a shard file: sha256 of its bytes and a finite check of its vectors, block by block.

    A float16 is NaN/inf exactly when its 5 exponent bits are all ones, so the check is an integer mask over the raw
    words (numpy's float16 ``isfinite`` is emulated and several times slower).

    Returns:
        The first problem, naming the file (and the text id of a non-finite vector), or None.
    """
    h = hashlib.sha256()
    offset, dim, start, pos = int(arr.offset), int(arr.shape[1]), int(entry["start"]), 0
    with open(f, "rb") as fh:
        while block := fh.read(BLOCK):
            h.update(block)
            lo = max(offset - pos, 0)  # the .npy header is not data; blocks and the header are an even size
            if lo < len(block):
                words = np.frombuffer(block, np.uint16, count=(len(block) - lo) // 2, offset=lo)
                bad = np.flatnonzero((words & 0x7C00) == 0x7C00)
                if bad.size:
                    elem = (pos + lo - offset) // 2 + int(bad[0])
                    return f"{f}: non-finite vector for text id {start + elem // dim}"
            pos += len(block)
    if "sha256" in entry and h.hexdigest() != entry["sha256"]:
        return f"{f}: sha256 {h.hexdigest()[:16]}... differs from the recorded {entry['sha256'][:16]}... (corrupted)"
    return None


def _verify_shards(path: Path, entries: list[dict], arrays: list[np.ndarray], full: bool) -> None:
    """Sizes of every shard first (no read), then with ``full`` sha256 and finite values, shards in parallel.

    A manifest written before checksums were recorded has no ``bytes``/``sha256``: only what is recorded is checked.
    """
    for e in entries:
        problem = check_record(path / e["file"], e, full=False)
        if problem:
            raise EmbeddingError(problem)
    if not full:
        return
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # hashlib and numpy release the GIL
        problems = list(pool.map(lambda i: _scan_shard(path / entries[i]["file"], entries[i], arrays[i]),
                                 range(len(entries))))
    problem = next((p for p in problems if p), None)
    if problem:
        raise EmbeddingError(problem)


def store_ref(store: str | Path, run_dir: str | Path) -> str:
    """How a run records its store: relative to ``run_dir`` when the store is inside it (so a copied or moved run
    reads its own store), absolute otherwise."""
    s, r = Path(os.path.abspath(store)), Path(os.path.abspath(run_dir))
    return s.relative_to(r).as_posix() if s.is_relative_to(r) else str(s)


def resolve_store(ref: str | Path, run_dir: str | Path) -> Path:
    """The store a recorded reference points at: relative references are under ``run_dir``."""
    p = Path(ref)
    return p if p.is_absolute() else Path(run_dir) / p
