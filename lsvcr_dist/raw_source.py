"""Where a pipeline's raw logs come from: generated, imported by the pipeline (``import:FORMAT:DIR``), or already there.

Rules (``stages.run_pipeline`` applies them before the first stage):

* ``run_dir/raw`` holding a recorded import (``import.json``): ``generate`` is skipped and the stages after it are
  keyed on the import's recorded checksums, so a re-import reruns preparation and nothing ever writes the tables.
* ``run_dir/raw`` holding tables that neither a generate run nor an import recorded: the pipeline refuses to run
  ``generate`` (it would replace user data) and says what to do.
* ``prepare.raw_dir`` set: the stages are keyed on that folder's import record, or on its files' sizes and times.
* ``import:FORMAT:DIR``: ``jobs/import_logs.py`` runs into ``run_dir/raw`` first, and again only when its options
  or the source files changed (or the imported tables are damaged).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lsvcr_dist.checksums import verify_records
from lsvcr_dist.data.raw_records import raw_origin, raw_tables_present, read_import_record
from lsvcr_dist.schema import RAW_TABLES

SOURCE_HELP = "generate (default) or import:FORMAT:DIR (formats: kuaicomt, microlens, recbole)"


class RawSourceError(ValueError):
    """The raw source cannot be used as asked; the message names the folder and what to do."""


def parse_source(spec: str) -> tuple[str, Path] | None:
    """``"import:FORMAT:DIR"`` -> ``(FORMAT, absolute DIR)``; ``""``/``"generate"`` -> None.

    Raises:
        RawSourceError: any other spelling, an unknown format, or a missing source folder.
    """
    from lsvcr_dist.data.importers import FORMATS

    if spec in ("", "generate"):
        return None
    parts = spec.split(":", 2)
    if len(parts) != 3 or parts[0] != "import" or not parts[2]:
        raise RawSourceError(f"--source {spec!r}: expected {SOURCE_HELP}")
    if parts[1] not in FORMATS:
        raise RawSourceError(f"--source {spec!r}: unknown import format {parts[1]!r} (known: {', '.join(FORMATS)})")
    src = Path(parts[2]).expanduser().absolute()
    if not src.is_dir():
        raise RawSourceError(f"--source {spec!r}: {src} is not a folder")
    return parts[1], src


def import_argv(run_dir: Path, fmt: str, src: Path, import_args: list[str]) -> list[str]:
    """The ``jobs/import_logs.py`` command line that imports ``src`` into ``run_dir/raw``."""
    return ["--format", fmt, "--src", str(src), "--out", str(Path(run_dir) / "raw"), *import_args]


def import_digest(argv: list[str], src: Path) -> str:
    """sha256 of the import command and the source files' names, sizes and modification times."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(src).iterdir() if p.is_file())
    return hashlib.sha256(json.dumps({"argv": argv, "files": files}).encode()).hexdigest()


def check_import(raw_dir: Path) -> str | None:
    """Problem with an imported raw folder: no complete record, or a recorded file missing or of another size."""
    try:
        rec = read_import_record(raw_dir)
    except ValueError as e:
        return str(e)
    if not rec.get("complete") or "files" not in rec:
        return f"{Path(raw_dir) / 'import.json'}: the import did not finish (rerun jobs/import_logs.py)"
    return verify_records(raw_dir, rec["files"], full=False)


def _listing_digest(raw_dir: Path) -> str:
    files = sorted((str(p.relative_to(raw_dir)), p.stat().st_size, p.stat().st_mtime_ns)
                   for t in RAW_TABLES for p in (raw_dir / t).glob("part-*.parquet"))
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def raw_plan(run_dir: Path, prepare_raw_dir: str, generates: bool) -> tuple[bool, str, str]:
    """What the pipeline does about its raw logs.

    Args:
        run_dir: the run directory.
        prepare_raw_dir: ``prepare.raw_dir`` (``""``: ``run_dir/raw``).
        generates: the stage list holds ``generate``.

    Returns:
        ``(skip_generate, upstream digest for the first stage, note for the log)``; the digest is ``""`` for
        generated logs (the generate stage's own hash chains on).

    Raises:
        RawSourceError: ``run_dir/raw`` holds tables no record accounts for while ``generate`` would run, or a
            recorded import is unfinished or damaged.
    """
    if prepare_raw_dir:
        raw = Path(prepare_raw_dir)
        if raw_origin(raw) == "imported":
            return True, _import_upstream(raw), f"raw logs from the import recorded in {raw}"
        return True, _listing_digest(raw), f"raw logs read from {raw}"
    raw = Path(run_dir) / "raw"
    origin = raw_origin(raw)
    if origin == "imported":
        return True, _import_upstream(raw), f"{raw} is a recorded import"
    if origin == "unknown" and generates:
        raise RawSourceError(
            f"{raw} holds raw tables {raw_tables_present(raw)} that no generate run wrote and no import recorded: "
            "the pipeline never overwrites them. Import the source files with --source import:FORMAT:DIR (or "
            "jobs/import_logs.py --out this folder), point prepare.raw_dir at a folder that holds them, or use "
            "another run_dir")
    return False, "", ""


def _import_upstream(raw: Path) -> str:
    problem = check_import(raw)
    if problem:
        raise RawSourceError(f"imported raw logs unusable: {problem}")
    files = read_import_record(raw)["files"]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
