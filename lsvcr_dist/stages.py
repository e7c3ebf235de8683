"""Pipeline stages with completion markers: generate -> prepare -> encode(base) -> align -> encode(aligned) ->
fine-tune -> evaluate, each run by a runner the caller hands in (``jobs/pipeline.py`` runs each stage's job script
as its own process), skipped only when its output is complete AND valid.

A stage is complete when ``run_dir/.pipeline/<stage>.json`` (written LAST, after the job succeeded and its outputs
were checked) holds the stage's config hash and the output check still passes. The hash covers the stage's resolved
config and the hash of the stage before it, so a changed upstream setting reruns everything downstream. A stage whose
marker is missing, stale, or whose outputs were damaged since is rerun (its marker is removed before it starts).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lsvcr_dist.config import load_config, overrides_for, to_dict

MARKER_DIR = ".pipeline"


class StageError(RuntimeError):
    """A stage's job failed or left incomplete outputs; the message names the stage and what is missing."""


def _parts(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern)) if folder.is_dir() else []


def check_generate(run_dir: Path, cfgs: dict) -> str | None:
    """Raw logs: every raw table has at least one Parquet part."""
    for t in ("videos", "comments", "video_inter", "comment_inter"):
        if not _parts(run_dir / "raw" / t, "*.parquet"):
            return f"no Parquet parts in {run_dir / 'raw' / t}"
    return None


def check_prepare(run_dir: Path, cfgs: dict) -> str | None:
    """Prepared data: a readable manifest whose every listed shard and table exists."""
    from lsvcr_dist.data.manifest import read_manifest

    data = run_dir / "data"
    try:
        man = read_manifest(data)
    except Exception as e:  # noqa: BLE001 - any manifest problem means "rerun"
        return str(e)
    for fmt, splits in man["shards"].items():
        for split, files in splits.items():
            for rel in files:
                if not (data / rel).is_file():
                    return f"{data / rel} listed in the manifest is missing"
    for t in ("videos", "comments"):
        if not (data / "tables" / f"{t}.parquet").is_file():
            return f"{data / 'tables' / t}.parquet missing"
    return None


def _check_store(which: str) -> Callable[[Path, dict], str | None]:
    def check(run_dir: Path, cfgs: dict) -> str | None:
        from lsvcr_dist.embeddings import EmbeddingStore

        try:
            EmbeddingStore.open(run_dir / "embeddings" / which)
        except Exception as e:  # noqa: BLE001
            return str(e)
        return None

    check.__doc__ = f"Embedding store '{which}' opens (manifest + every shard of the right shape)."
    return check


def check_align(run_dir: Path, cfgs: dict) -> str | None:
    """Aligned exports for the encode and fine-tune stages."""
    final = run_dir / "align" / "final"
    for rel in ("sr.safetensors", "config.yaml", "adapter/adapter_config.json"):
        if not (final / rel).is_file():
            return f"{final / rel} missing"
    return None


def check_finetune(run_dir: Path, cfgs: dict) -> str | None:
    """A complete best model for every fine-tuned task."""
    for task in cfgs["finetune"].tasks:
        if not (run_dir / "finetune" / task / "best" / "COMPLETE").is_file():
            return f"{run_dir / 'finetune' / task / 'best'} incomplete"
    return None


def check_evaluate(run_dir: Path, cfgs: dict) -> str | None:
    """``eval/metrics.json`` with every fine-tuned task."""
    path = run_dir / "eval" / "metrics.json"
    if not path.is_file():
        return f"{path} missing"
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return f"{path}: {e}"
    missing = [t for t in cfgs["finetune"].tasks if t not in table]
    return f"{path} lacks tasks {missing}" if missing else None


@dataclass
class Stage:
    """One pipeline stage: the job that runs it, the config section hashed, extra overrides, and an output check."""

    name: str
    """Marker name (``run_dir/.pipeline/<name>.json``); two stages may share a job (``encode_base``/``_aligned``)."""
    job: str
    """File name of the job script under ``jobs/`` that the runner starts (``align.py``)."""
    section: str
    """Config stage whose resolved dataclass is hashed (``config.STAGES`` key)."""
    check: Callable[[Path, dict], str | None]
    """``check(run_dir, cfgs)``: None when the outputs are complete, else what is missing."""
    extra: list[str] = field(default_factory=list)
    """Overrides this stage always adds (``encode.which=aligned``)."""


Runner = Callable[[Stage, list[str]], int]
"""``runner(stage, argv) -> exit code``: runs ``stage``'s job with ``argv`` (``--config FILE`` + overrides)."""


STAGES = [
    Stage("generate", "generate_logs.py", "generate", check_generate),
    Stage("prepare", "prepare_data.py", "prepare", check_prepare),
    Stage("encode_base", "encode_text.py", "encode", _check_store("base"), ["encode.which=base"]),
    Stage("align", "align.py", "align", check_align),
    Stage("encode_aligned", "encode_text.py", "encode", _check_store("aligned"), ["encode.which=aligned"]),
    Stage("finetune", "finetune.py", "finetune", check_finetune),
    Stage("evaluate", "evaluate.py", "evaluate", check_evaluate),
]


def stage_hash(config: str | Path | None, stage: Stage, overrides: list[str], upstream: str) -> str:
    """sha256 of the stage's resolved config (+ extra overrides) chained with the upstream stage's hash."""
    cfg = load_config(config, stage.section, overrides_for(stage.section, overrides) + stage.extra)
    blob = json.dumps({"stage": stage.name, "cfg": to_dict(cfg), "up": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def marker_path(run_dir: Path, name: str) -> Path:
    """``run_dir/.pipeline/<stage>.json``."""
    return Path(run_dir) / MARKER_DIR / f"{name}.json"


def is_done(run_dir: Path, stage: Stage, digest: str, cfgs: dict) -> tuple[bool, str]:
    """(complete?, reason): marker present with this hash, and the output check passes."""
    mk = marker_path(run_dir, stage.name)
    if not mk.is_file():
        return False, "no completion marker"
    try:
        rec = json.loads(mk.read_text())
    except json.JSONDecodeError:
        return False, "unreadable marker"
    if rec.get("hash") != digest:
        return False, "config changed"
    problem = stage.check(Path(run_dir), cfgs)
    return (False, f"output incomplete: {problem}") if problem else (True, "complete")


def select_stages(cfgs: dict) -> list[Stage]:
    """Stages this configuration needs: no alignment stages for 'w/o Alignment' (``finetune.init=scratch``) and no
    generation when ``prepare.raw_dir`` points at imported logs."""
    out = []
    for st in STAGES:
        if st.name in ("align", "encode_aligned") and cfgs["finetune"].init == "scratch":
            continue
        if st.name == "generate" and cfgs["prepare"].raw_dir:
            continue
        out.append(st)
    return out


def run_import_stage(run_dir: Path, source: str, import_args: list[str], runner: Runner,
                     log: Callable[[str], None] = print) -> tuple[str, str]:
    """``--source import:FORMAT:DIR``: run ``jobs/import_logs.py`` into ``run_dir/raw`` unless the same import
    (command and source files) is complete and intact there. Returns ``("import", "ran" | "skipped")``."""
    from lsvcr_dist.raw_source import RawSourceError, check_import, import_argv, import_digest, parse_source

    try:
        fmt, src = parse_source(source)
    except RawSourceError as e:
        raise StageError(str(e)) from None
    stage = Stage("import", "import_logs.py", "prepare", lambda rd, _cfgs: check_import(Path(rd) / "raw"))
    argv = import_argv(run_dir, fmt, src, import_args)
    digest = import_digest(argv, src)
    ok, why = is_done(run_dir, stage, digest, {})
    if ok:
        log(f"[pipeline] import: skipped (complete, hash {digest[:10]})")
        return "import", "skipped"
    log(f"[pipeline] import: running ({why})")
    marker_path(run_dir, "import").unlink(missing_ok=True)
    if runner(stage, argv) != 0:
        raise StageError(f"stage 'import' (jobs/import_logs.py {' '.join(argv)}) failed")
    problem = stage.check(run_dir, {})
    if problem:
        raise StageError(f"stage 'import' finished but its output is incomplete: {problem}")
    marker_path(run_dir, "import").parent.mkdir(parents=True, exist_ok=True)
    marker_path(run_dir, "import").write_text(json.dumps({"stage": "import", "hash": digest}))
    return "import", "ran"


def guard_raw_source(run_dir: Path, cfgs: dict, stages: list[Stage], log: Callable[[str], None] = print
                     ) -> tuple[list[Stage], str]:
    """Drop ``generate`` when the raw logs are imported (never overwritten), refuse to generate over tables no
    record accounts for, and return the digest the first stage chains on (``raw_source.raw_plan``)."""
    from lsvcr_dist.raw_source import RawSourceError, raw_plan

    names = [st.name for st in stages]
    try:
        skip, upstream, note = raw_plan(run_dir, cfgs["prepare"].raw_dir, "generate" in names)
    except RawSourceError as e:
        raise StageError(str(e)) from None
    if skip and "generate" in names:
        log(f"[pipeline] generate: skipped ({note})")
        stages = [st for st in stages if st.name != "generate"]
    return stages, upstream


def run_pipeline(config: str | Path, overrides: list[str], runner: Runner, stages: list[Stage] | None = None,
                 log: Callable[[str], None] = print, source: str = "", import_args: list[str] = ()
                 ) -> list[tuple[str, str]]:
    """Run (or skip) every stage in order.

    Args:
        config: preset YAML.
        overrides: dotted overrides applied to every stage (``run_dir=...`` included).
        runner: runs one stage's job (``jobs/pipeline.py: run_stage`` starts its script as a subprocess).
        stages: stage list (default: ``select_stages``).
        log: progress printer.
        source: ``import:FORMAT:DIR`` runs ``jobs/import_logs.py`` into ``run_dir/raw`` first (see
            ``raw_source``); ``""`` or ``generate``: synthetic logs, unless ``run_dir/raw`` is a recorded import.
        import_args: extra ``jobs/import_logs.py`` options (``--title-field movie_title``).

    Returns:
        ``[(stage name, "skipped" | "ran"), ...]``.

    Raises:
        StageError: a job exited non-zero or left outputs that fail the stage check, or ``run_dir/raw`` holds
            tables the pipeline must not overwrite.
    """
    # each stage's own overrides, as its job gets them: `llm.kind=...` or `contrastive_pool=...` is not a generate key
    cfgs = {s: load_config(config, s, overrides_for(s, overrides)) for s in ("generate", "prepare", "finetune",
                                                                             "evaluate")}
    run_dir = Path(cfgs["finetune"].run_dir)
    done = [run_import_stage(run_dir, source, list(import_args), runner, log)] if source not in ("", "generate") \
        else []
    stages = stages if stages is not None else select_stages(cfgs)
    stages, upstream = guard_raw_source(run_dir, cfgs, stages, log)  # never generates over imported/user tables
    for st in stages:
        digest = stage_hash(config, st, overrides, upstream)
        ok, why = is_done(run_dir, st, digest, cfgs)
        if ok:
            log(f"[pipeline] {st.name}: skipped (complete, hash {digest[:10]})")
            done.append((st.name, "skipped"))
            upstream = digest
            continue
        log(f"[pipeline] {st.name}: running ({why})")
        mk = marker_path(run_dir, st.name)
        if mk.exists():
            mk.unlink()  # a failed rerun must not leave the old marker claiming completion
        t0 = time.time()
        rc = runner(st, ["--config", str(config), *overrides_for(st.section, overrides), *st.extra])
        if rc != 0:
            raise StageError(f"stage '{st.name}' (jobs/{st.job}) failed with exit code {rc}")
        problem = st.check(run_dir, cfgs)
        if problem:
            raise StageError(f"stage '{st.name}' finished but its output is incomplete: {problem}")
        mk.parent.mkdir(parents=True, exist_ok=True)
        mk.write_text(json.dumps({"stage": st.name, "hash": digest, "wall_s": round(time.time() - t0, 2),
                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        log(f"[pipeline] {st.name}: done in {time.time() - t0:.1f}s")
        done.append((st.name, "ran"))
        upstream = digest
    return done
