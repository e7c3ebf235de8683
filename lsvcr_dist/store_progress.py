"""Completed shards of an embedding store still being written, so that an interrupted encode resumes by shard.

Layout inside the store folder while ``EmbeddingWriter`` runs (removed once ``manifest.json`` is written)::

    progress.json        what is being written: format, dim, count, num_videos, num_comments, shard_rows, meta
    shard-00003.done     {"bytes", "sha256"} of shard 3 once every one of its rows was written and flushed

Each ``.done`` file is written atomically (temporary file, then rename) after its shard is flushed, so a killed
encode leaves only shards whose bytes are complete marked. A resumed writer keeps a marked shard only when the
settings in ``progress.json`` equal its own and the shard file still has the recorded size and sha256; anything else
is encoded again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lsvcr_dist.checksums import check_record, file_record

PROGRESS = "progress.json"


def done_name(shard_file: str) -> str:
    """``shard-00003.npy`` -> ``shard-00003.done``."""
    return shard_file.rsplit(".", 1)[0] + ".done"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def start(path: Path, signature: dict) -> None:
    """Record what a fresh write produces (no shard completed yet)."""
    clear(path)
    _atomic_write(path / PROGRESS, json.dumps(signature, sort_keys=True))


def completed(path: Path, signature: dict, shard_files: list[str]) -> tuple[dict[int, dict], str]:
    """Shards that a resumed write can keep, and why the others cannot.

    Returns:
        ``({shard index: record}, reason)``: an empty dict with the reason (different settings, no progress) when
        nothing can be kept; a shard whose file no longer matches its record is left out (named in the reason).
    """
    prog = path / PROGRESS
    if not prog.is_file():
        return {}, "no interrupted write to resume"
    try:
        before = json.loads(prog.read_text())
    except json.JSONDecodeError:
        return {}, f"{prog} unreadable"
    if before != json.loads(json.dumps(signature, sort_keys=True)):
        diff = sorted(k for k in set(before) | set(signature) if before.get(k) != signature.get(k))
        return {}, f"{prog}: the interrupted write had other settings ({', '.join(diff)})"
    keep, bad = {}, []
    for s, name in enumerate(shard_files):
        marker = path / done_name(name)
        if not marker.is_file():
            continue
        try:
            record = json.loads(marker.read_text())
        except json.JSONDecodeError:
            bad.append(f"{marker} unreadable")
            continue
        problem = check_record(path / name, record, full=True)
        if problem:
            bad.append(problem)
        else:
            keep[s] = record
    return keep, "; ".join(bad)


def mark(path: Path, shard_file: str) -> dict:
    """Record shard ``shard_file`` as complete (its bytes are flushed); returns the record."""
    record = file_record(path / shard_file)
    _atomic_write(path / done_name(shard_file), json.dumps(record))
    return record


def unmark(path: Path, shard_file: str) -> None:
    """Forget the completion of a shard that is written again."""
    (path / done_name(shard_file)).unlink(missing_ok=True)


def clear(path: Path) -> None:
    """Remove every completion marker and ``progress.json`` (a finished store, or a fresh start)."""
    for f in list(path.glob("shard-*.done")) + [path / PROGRESS]:
        f.unlink(missing_ok=True)
