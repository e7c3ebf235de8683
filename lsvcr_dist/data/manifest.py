"""The data manifest: ``run_dir/data/manifest.json``, written by preparation, read by every later stage.

Jobs read sizes, dims and shard lists from here instead of counting rows by iterating. Keys (ARCHITECTURE.md):
``schema_version``, ``num_users``, ``num_videos``, ``num_comments``, ``dims`` (``L``, ``LA``, ``K``, ``P``,
``NV``, ``NC``, ``NT``), ``splits`` (split -> task -> rows), ``shards`` (``parquet``/``webdataset`` -> split ->
paths relative to the data dir), ``shard_rows`` (format-independent rows of each shard, split -> list), ``tables``,
``filtered`` (reason -> count), ``seed``, ``raw_dir``, ``wds_encoding``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lsvcr_dist.schema import SCHEMA_VERSION, SchemaError

MANIFEST_NAME = "manifest.json"
REQUIRED_KEYS = ("schema_version", "num_users", "num_videos", "num_comments", "dims", "splits", "shards", "tables",
                 "filtered", "seed", "raw_dir")
DIM_KEYS = ("L", "LA", "K", "P", "NV", "NC", "NT")
FORMATS = ("parquet", "webdataset")
SPLITS = ("train", "val", "test")


class ManifestError(SchemaError):
    """The manifest is missing, unreadable, of another schema version, or lacks a key (named)."""


def manifest_path(data_dir: str | Path) -> Path:
    """Path of the manifest inside ``data_dir`` (``run_dir/data``)."""
    return Path(data_dir) / MANIFEST_NAME


def write_manifest(data_dir: str | Path, manifest: dict) -> Path:
    """Write ``manifest`` atomically (temp file + rename), so a crash never leaves half a manifest.

    Args:
        data_dir: the prepared data folder.
        manifest: a dict with at least ``REQUIRED_KEYS``.

    Returns:
        The manifest path.

    Raises:
        ManifestError: a required key is missing (named).
    """
    _check_keys(manifest, "manifest to write")
    path = manifest_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def read_manifest(data_dir: str | Path) -> dict:
    """Read and check the manifest of ``data_dir``.

    Raises:
        ManifestError: the file is missing or not JSON, ``schema_version`` differs from
            ``schema.SCHEMA_VERSION``, or a required key / dim is missing (the message names file and key).
    """
    path = manifest_path(data_dir)
    if not path.is_file():
        raise ManifestError(f"{path}: data manifest not found (run jobs/prepare_data.py first)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    _check_keys(manifest, str(path))
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {manifest['schema_version']} != supported {SCHEMA_VERSION}")
    return manifest


def dims_of(manifest: dict) -> dict[str, int]:
    """The ``dims`` block as ``{name: int}`` (resolves symbolic shapes of ``schema.INSTANCE``)."""
    return {k: int(v) for k, v in manifest["dims"].items()}


def read_dims(data_dir: str | Path) -> dict:
    """The manifest's ``dims`` plus ``num_videos``/``num_comments``."""
    man = read_manifest(data_dir)
    return {**dims_of(man), "num_videos": int(man["num_videos"]), "num_comments": int(man["num_comments"])}


def shard_files(data_dir: str | Path, manifest: dict, fmt: str, split: str) -> list[Path]:
    """Absolute shard paths of ``fmt`` (``parquet`` / ``webdataset``) and ``split`` listed in the manifest.

    Raises:
        ManifestError: unknown format or split (named).
    """
    shards = manifest["shards"]
    if fmt not in shards:
        raise ManifestError(f"{manifest_path(data_dir)}: no shards of format '{fmt}' (have {sorted(shards)})")
    if split not in shards[fmt]:
        raise ManifestError(f"{manifest_path(data_dir)}: no split '{split}' for format '{fmt}'")
    return [Path(data_dir) / rel for rel in shards[fmt][split]]


def _check_keys(manifest: dict, source: str) -> None:
    for k in REQUIRED_KEYS:
        if k not in manifest:
            raise ManifestError(f"{source}: missing key '{k}'")
    for k in DIM_KEYS:
        if k not in manifest["dims"]:
            raise ManifestError(f"{source}: missing key 'dims.{k}'")
