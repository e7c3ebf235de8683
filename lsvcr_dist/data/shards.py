"""Instance shard formats (Parquet and WebDataset), their writers, decoders and integrity checks.

Parquet shards hold ``schema.INSTANCE`` exactly (nested ``fixed_size_list`` columns). WebDataset shards hold the
same rows in the same order, one tar member per sample named ``<key>.inst.npy``: a NumPy ``.npy`` of ONE record of
a structured dtype whose fields are the INSTANCE columns in schema order with their fixed shapes (all int64). The
``.npy`` header therefore names every column and its shape, so any reader can check the schema of a sample
without a side file, and a batch of samples decodes into ``[B, ...]`` arrays by one ``np.concatenate``. Keys are
``u<user>_t<timestamp>_k<task>_<n>`` (unique per shard). Nothing here uses pickles: ``np.load(..., allow_pickle=False)``.

Integrity checks read only footers / tar headers, so the driver can check every shard before workers start; each
error names the file (and the column, for schema mismatches).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lsvcr_dist.schema import INSTANCE, Col, SchemaError, fixed_list_to_numpy, numpy_to_fixed_list, numpy_to_table, \
    resolve_shape, validate_schema

WDS_SUFFIX = "inst.npy"
"""Tar member suffix (and Ray ``read_webdataset`` column name) of an encoded instance."""


class ShardError(SchemaError):
    """A shard (or raw input part) is truncated, corrupt or does not match its schema; the message names the file."""


# --------------------------------------------------------------------------------------------------- nested columns
# pyarrow 26 computes WRONG values (or segfaults) when ``take``/``filter`` run on a *sliced* nested
# fixed_size_list array (e.g. ``[L, K]`` ``comment_hist_comments``); Ray Data slices, takes and filters blocks
# when it sorts, splits and shuffles. So inside Ray every nested column travels flattened to one level
# (``[L*K]``), which those kernels handle correctly; shards on disk keep the nested INSTANCE types.
def flatten_nested(table: pa.Table) -> pa.Table:
    """Replace every nested fixed_size_list column by a one-level one of the same row-major values."""
    for i, field in enumerate(table.schema):
        t = field.type
        if pa.types.is_fixed_size_list(t) and pa.types.is_fixed_size_list(t.value_type):
            shape = []
            while pa.types.is_fixed_size_list(t):
                shape.append(t.list_size)
                t = t.value_type
            x = fixed_list_to_numpy(table.column(i), tuple(shape)).reshape(table.num_rows, -1)
            table = table.set_column(i, field.name, numpy_to_fixed_list(x))
    return table


def to_instance_table(batch: pa.Table | dict, dims: dict[str, int]) -> pa.Table:
    """INSTANCE columns of ``batch`` (nested or flattened fixed lists, sliced or not) -> a fresh INSTANCE table
    with the contract's nested types (goes through numpy, so no pyarrow selection kernel touches nested data)."""
    cols = {}
    for name, col in INSTANCE.items():
        shape = resolve_shape(col.shape, dims)
        x = batch[name]
        if isinstance(x, (pa.Array, pa.ChunkedArray)):
            t, depth = x.type, 0
            while pa.types.is_fixed_size_list(t):
                depth, t = depth + 1, t.value_type
            flat = (int(np.prod(shape)),) if depth == 1 and len(shape) > 1 else shape
            x = fixed_list_to_numpy(x, flat) if shape else x.to_numpy()
        cols[name] = np.asarray(x).reshape((-1, *shape))
    return numpy_to_table(cols, INSTANCE, dims)


# --------------------------------------------------------------------------------------------------- record dtype
def record_dtype(dims: dict[str, int], spec: dict[str, Col] = INSTANCE) -> np.dtype:
    """Structured dtype of one instance: a field per column of ``spec`` with its resolved fixed shape."""
    return np.dtype([(name, np.dtype(col.dtype), resolve_shape(col.shape, dims)) for name, col in spec.items()])


def table_to_records(table: pa.Table, dims: dict[str, int]) -> np.ndarray:
    """INSTANCE table of N rows -> structured array ``[N]`` of ``record_dtype(dims)``."""
    from lsvcr_dist.schema import table_to_numpy

    cols = table_to_numpy(table, INSTANCE, dims)
    out = np.empty(table.num_rows, dtype=record_dtype(dims))
    for name in INSTANCE:
        out[name] = cols[name]
    return out


def records_to_table(records: np.ndarray, dims: dict[str, int]) -> pa.Table:
    """Structured array ``[N]`` -> INSTANCE Arrow table (fixed_size_list columns)."""
    return numpy_to_table({name: records[name] for name in INSTANCE}, INSTANCE, dims)


def encode_record(record: np.ndarray) -> bytes:
    """One structured record -> ``.npy`` bytes (shape ``(1,)``)."""
    buf = io.BytesIO()
    np.save(buf, record.reshape(1), allow_pickle=False)
    return buf.getvalue()


def decode_records(blobs, dims: dict[str, int], source: str = "webdataset batch") -> np.ndarray:
    """``.npy`` blobs of single records -> structured array ``[N]``; the first blob's fields are checked.

    Raises:
        ShardError: a blob is not a ``.npy`` record or its fields differ from INSTANCE (``source`` and column named).
    """
    expected = record_dtype(dims)
    recs = []
    for i, blob in enumerate(blobs):
        try:
            rec = np.load(io.BytesIO(bytes(blob)), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ShardError(f"{source}: sample {i} is not a valid .npy record ({e})") from None
        if rec.dtype != expected:
            check_record_dtype(rec.dtype, dims, f"{source} sample {i}")
        recs.append(rec)
    if not recs:
        return np.empty(0, dtype=expected)
    return np.concatenate(recs)


def check_record_dtype(dtype: np.dtype, dims: dict[str, int], source: str) -> None:
    """Compare a sample's structured dtype with INSTANCE.

    Raises:
        ShardError: naming ``source`` and each missing, extra or mis-shaped column.
    """
    expected = record_dtype(dims)
    if dtype.names is None:
        raise ShardError(f"{source}: sample is a plain {dtype} array, expected an INSTANCE record")
    problems = []
    for name in expected.names:
        if name not in dtype.names:
            problems.append(f"missing column '{name}'")
            continue
        want, got = expected.fields[name][0], dtype.fields[name][0]
        if want != got:
            problems.append(f"column '{name}': expected {want.base}{want.shape}, found {got.base}{got.shape}")
    extra = [n for n in dtype.names if n not in expected.names]
    if extra:
        problems.append(f"unexpected columns {extra}")
    if problems:
        raise ShardError(f"{source}: schema mismatch: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------- writers
def write_parquet_shard(path: str | Path, table: pa.Table, dims: dict[str, int]) -> None:
    """Write an INSTANCE table as one Parquet shard (schema checked first)."""
    validate_schema(table.schema, INSTANCE, dims, source=str(path))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=max(1, min(table.num_rows, 10_000)))


def write_wds_shard(path: str | Path, table: pa.Table, dims: dict[str, int]) -> None:
    """Write the rows of an INSTANCE table as one WebDataset tar (``<key>.inst.npy`` per sample, same order).

    The bytes equal ``tarfile.addfile`` of ``np.save`` blobs (``_wds_bytes_reference`` in tests), but every sample
    shares one ``.npy`` header and one tar header template (same size, mode, mtime), so only the member name and
    the header checksum are computed per sample: ``np.save`` + ``TarInfo`` per sample cost ~1 ms, which made the
    WebDataset writer the slowest step of preparation at paper scale (0.9M samples).
    """
    validate_schema(table.schema, INSTANCE, dims, source=str(path))
    records = table_to_records(table, dims)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        if len(records):
            npy_header = encode_record(records[0])[:-records.dtype.itemsize]
            size = len(npy_header) + records.dtype.itemsize
            template = bytearray(_ustar_header("x", size))
            pad = b"\0" * (-size % tarfile.BLOCKSIZE)
            seen: dict[str, int] = {}
            users, stamps, tasks = (records[c].tolist() for c in ("user_id", "timestamp", "task"))
            raw = records.tobytes()
            out = []
            for i, (u, t, k) in enumerate(zip(users, stamps, tasks)):
                base = f"u{u}_t{t}_k{k}"
                n = seen.get(base, 0)
                seen[base] = n + 1
                out += [_named_header(template, f"{base}_{n}.{WDS_SUFFIX}"), npy_header,
                        raw[i * records.dtype.itemsize:(i + 1) * records.dtype.itemsize], pad]
            blob = b"".join(out)
            tar.fileobj.write(blob)
            tar.offset += len(blob)
    tmp.replace(path)


def _ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header ``tarfile`` writes for a regular member of this name and size (defaults)."""
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")


def _named_header(template: bytearray, name: str) -> bytes:
    """``template`` with its name field set to ``name`` and the checksum recomputed as ``tarfile`` does."""
    raw = name.encode("utf-8")
    if len(raw) > 100:  # never for our keys; ustar would need the prefix field
        return _ustar_header(name, int(template[124:135].decode(), 8))
    template[0:100] = raw + b"\0" * (100 - len(raw))
    template[148:156] = b" " * 8
    template[148:155] = b"%06o\0" % sum(template)
    return bytes(template)


# --------------------------------------------------------------------------------------------------- checks
def check_parquet_file(path: str | Path, spec: dict[str, Col], dims: dict[str, int] | None = None,
                       expect_rows: int | None = None) -> int:
    """Check a Parquet file's footer and schema without reading its data.

    Args:
        path: the file.
        spec: expected columns (``schema.INSTANCE`` or a ``schema.RAW_*`` table).
        dims: resolves symbolic shapes of ``spec``.
        expect_rows: if given, the footer's row count must equal it.

    Returns:
        Rows in the file (from the footer).

    Raises:
        ShardError: missing, truncated or corrupt file, wrong row count, or schema mismatch (file and column named).
    """
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: file listed in the manifest does not exist")
    try:
        meta = pq.ParquetFile(path)
        schema = meta.schema_arrow
        rows = meta.metadata.num_rows
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise ShardError(f"{path}: truncated or corrupt Parquet file ({e})") from None
    try:
        validate_schema(schema, spec, dims or {}, source=str(path))
    except SchemaError as e:
        raise ShardError(str(e)) from None
    if expect_rows is not None and rows != expect_rows:
        raise ShardError(f"{path}: {rows} rows, the manifest says {expect_rows}")
    return rows


def check_wds_file(path: str | Path, dims: dict[str, int], expect_rows: int | None = None) -> int:
    """Check a WebDataset tar: complete headers, no member cut short, every member ``*.inst.npy``, and the first
    sample's record fields equal INSTANCE.

    Returns:
        Samples in the tar.

    Raises:
        ShardError: missing, truncated or corrupt tar, wrong row count, or schema mismatch (file and column named).
    """
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: file listed in the manifest does not exist")
    size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            if members:
                first = tar.extractfile(members[0]).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{path}: truncated or corrupt WebDataset tar ({e})") from None
    for m in members:
        if m.offset_data + m.size > size:
            raise ShardError(f"{path}: truncated WebDataset tar (member {m.name} ends past the end of the file)")
        if not m.name.endswith("." + WDS_SUFFIX):
            raise ShardError(f"{path}: unexpected member {m.name} (expected *.{WDS_SUFFIX})")
    if members:
        try:
            header = np.load(io.BytesIO(first), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ShardError(f"{path}: member {members[0].name} is not a valid .npy record ({e})") from None
        check_record_dtype(header.dtype, dims, f"{path} (member {members[0].name})")
    if expect_rows is not None and len(members) != expect_rows:
        raise ShardError(f"{path}: {len(members)} samples, the manifest says {expect_rows}")
    return len(members)


def read_wds_file(path: str | Path, dims: dict[str, int]) -> pa.Table:
    """Read a whole WebDataset shard into an INSTANCE table (tests, benchmarks; workers use ``ingest``)."""
    check_wds_file(path, dims)
    with tarfile.open(path, "r:") as tar:
        blobs = [tar.extractfile(m).read() for m in tar.getmembers()]
    return records_to_table(decode_records(blobs, dims, str(path)), dims)
