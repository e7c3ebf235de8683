"""File checksums shared by the raw import record, the embedding store manifest and checkpoint markers.

A record is ``{"bytes": size, "sha256": hex digest}`` per file. ``verify_records`` compares files on disk with
their records and names the first file that differs (missing, wrong size, wrong digest), so a truncated or edited
file is reported by name before anything reads it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BLOCK = 8 << 20
"""Bytes read per hashing step (bounds memory; hashlib releases the GIL on blocks this large)."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in ``BLOCK``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | Path) -> dict:
    """``{"bytes": size, "sha256": digest}`` of one file."""
    p = Path(path)
    return {"bytes": p.stat().st_size, "sha256": sha256_file(p)}


def file_records(root: str | Path, rel_paths: Iterable[str], threads: int = 4) -> dict[str, dict]:
    """Records of ``root/rel`` for every relative path, hashed on ``threads`` threads."""
    root = Path(root)
    rels = sorted(rel_paths)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        recs = list(pool.map(lambda r: file_record(root / r), rels))
    return dict(zip(rels, recs))


def check_record(path: str | Path, record: dict, full: bool = True) -> str | None:
    """The problem with one file (None when it matches its record).

    Args:
        path: the file.
        record: ``{"bytes", "sha256"}`` (either key may be absent: only what is recorded is checked).
        full: also compare the sha256 (reads the file); False checks existence and size only.
    """
    p = Path(path)
    if not p.is_file():
        return f"{p}: missing"
    size = p.stat().st_size
    if "bytes" in record and size != int(record["bytes"]):
        return f"{p}: {size} bytes, recorded {record['bytes']} (truncated or replaced)"
    if full and "sha256" in record:
        digest = sha256_file(p)
        if digest != record["sha256"]:
            return f"{p}: sha256 {digest[:16]}... differs from the recorded {str(record['sha256'])[:16]}... (corrupted)"
    return None


def verify_records(root: str | Path, records: dict[str, dict], full: bool = True, threads: int = 4) -> str | None:
    """The first problem (in path order) among ``root/rel`` vs ``records[rel]``; None when all match.

    Sizes are checked for every file before any digest is computed, so a truncated file is found without hashing.
    """
    root = Path(root)
    rels = sorted(records)
    for rel in rels:
        problem = check_record(root / rel, records[rel], full=False)
        if problem:
            return problem
    if not full:
        return None
    with ThreadPoolExecutor(max(1, threads)) as pool:
        problems = list(pool.map(lambda r: check_record(root / r, records[r], full=True), rels))
    return next((p for p in problems if p), None)
