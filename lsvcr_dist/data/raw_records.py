"""Who wrote a raw folder: ``generated.json`` (``jobs/generate_logs.py``) or ``import.json`` (``jobs/import_logs.py``).

``claim_raw_dir`` is called by each writer before it writes a table: generation may replace only generated tables, an
import generated or imported ones, and tables that no record accounts for (user data) are never replaced. The
import record lists the size and sha256 of every file it wrote, so the pipeline can key its later stages on the
imported bytes and a test can prove they were left alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from lsvcr_dist.checksums import file_records
from lsvcr_dist.data.raw import RawDataError
from lsvcr_dist.schema import RAW_TABLES

GENERATED_RECORD = "generated.json"
IMPORT_RECORD = "import.json"
LEGACY_GENERATE_MARKER = Path(".pipeline") / "generate.json"
"""The pipeline's completion marker of ``generate`` (beside ``raw/``): a run generated before ``generated.json``
existed is recognised by it."""


def raw_tables_present(raw_dir: str | Path) -> list[str]:
    """Raw tables of ``raw_dir`` that have at least one part file."""
    return [t for t in RAW_TABLES if any((Path(raw_dir) / t).glob("part-*.parquet"))]


def raw_origin(raw_dir: str | Path) -> str:
    """Who wrote ``raw_dir``: ``"imported"`` (``import.json``), ``"generated"`` (``generated.json``, or a folder
    ``run_dir/raw`` whose run holds the pipeline's generate marker), ``"empty"`` (no raw table) or ``"unknown"``
    (raw tables that no record accounts for: user data)."""
    raw_dir = Path(raw_dir)
    if (raw_dir / IMPORT_RECORD).is_file():
        return "imported"
    if (raw_dir / GENERATED_RECORD).is_file():
        return "generated"
    if not raw_tables_present(raw_dir) and not (raw_dir / "id_map.parquet").exists():
        return "empty"
    if raw_dir.name == "raw" and (raw_dir.parent / LEGACY_GENERATE_MARKER).is_file():
        return "generated"
    return "unknown"


def read_import_record(raw_dir: str | Path) -> dict:
    """``import.json`` of an imported raw folder.

    Raises:
        RawDataError: no record, or it is not JSON (names the file).
    """
    path = Path(raw_dir) / IMPORT_RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RawDataError(f"{path}: no import record (import the data with jobs/import_logs.py)") from None
    except json.JSONDecodeError as e:
        raise RawDataError(f"{path}: unreadable import record: {e}") from None


def claim_raw_dir(raw_dir: str | Path, writer: str, record: dict | None = None) -> None:
    """Check that ``writer`` (``"generate"`` or ``"import"``) may write ``raw_dir``, then record it as the owner.

    Generation may only replace generated tables; an import may replace generated or imported ones. Tables that no
    record accounts for are never replaced. The record is written before any table (``"complete": false``) so a
    crash part-way leaves a folder its writer may redo; ``finish_raw_record`` completes it.

    Raises:
        RawDataError: the folder holds data this writer must not overwrite (names the folder and what to do).
    """
    raw_dir = Path(raw_dir)
    origin = raw_origin(raw_dir)
    if writer == "generate" and origin == "imported":
        rec = read_import_record(raw_dir)
        raise RawDataError(
            f"{raw_dir}: holds imported logs ({IMPORT_RECORD}: format {rec.get('format')!r} from {rec.get('src')}); "
            "generation never overwrites them. Run the pipeline on them as they are (generate is skipped for a "
            "recorded import) or use another run_dir")
    if origin == "unknown":
        raise RawDataError(
            f"{raw_dir}: holds raw tables {raw_tables_present(raw_dir)} that no generate run wrote and no import "
            f"recorded (no {GENERATED_RECORD} or {IMPORT_RECORD}); they are never overwritten. Move them away, point "
            "prepare.raw_dir at them, or import the source files with jobs/import_logs.py")
    if writer not in ("generate", "import"):
        raise ValueError(f"unknown raw writer {writer!r}")
    raw_dir.mkdir(parents=True, exist_ok=True)
    name = GENERATED_RECORD if writer == "generate" else IMPORT_RECORD
    if writer == "import":
        (raw_dir / GENERATED_RECORD).unlink(missing_ok=True)
    (raw_dir / name).write_text(json.dumps({"writer": writer, **(record or {}), "complete": False}, indent=2) + "\n")


def finish_raw_record(raw_dir: str | Path, writer: str, record: dict, checksums: bool = False) -> dict:
    """Write the final ``generated.json`` / ``import.json`` (``"complete": true``), optionally with
    ``{"files": {relative path: {"bytes", "sha256"}}}`` of every part file and ``id_map.parquet``."""
    raw_dir = Path(raw_dir)
    rec = {"writer": writer, **record, "complete": True}
    if checksums:
        rels = [str(p.relative_to(raw_dir)) for t in RAW_TABLES for p in sorted((raw_dir / t).glob("part-*.parquet"))]
        rels += ["id_map.parquet"] if (raw_dir / "id_map.parquet").is_file() else []
        rec["files"] = file_records(raw_dir, rels)
    name = GENERATED_RECORD if writer == "generate" else IMPORT_RECORD
    tmp = raw_dir / (name + ".tmp")
    tmp.write_text(json.dumps(rec, indent=2) + "\n")
    tmp.replace(raw_dir / name)
    return rec
