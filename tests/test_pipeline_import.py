"""The pipeline on imported logs: generate never touches them, ``--source import:FORMAT:DIR`` imports first, and
tables no record accounts for are refused. Real generate and import jobs (in-process), later stages faked."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lsvcr_dist.stages import Stage, StageError, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
ITEM = "item_id:token\ttitle:token_seq\n1\tToy Story\n2\tGoldenEye\n3\tFour Rooms\n"
INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
         "196\t3\t3\t881250949\n186\t1\t3\t891717742\n196\t2\t1\t878887116\n")


def _src(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "ml.item").write_text(ITEM)
    (folder / "ml.inter").write_text(INTER)
    return folder


def _sums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Runner:
    """Runs the real generate and import jobs in-process; 'prepare' exits 3 so the pipeline stops right there."""

    def __init__(self):
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, stage, argv):
        self.calls.append((stage.name, argv))
        if stage.name == "generate":
            import generate_logs

            return generate_logs.main(argv)
        if stage.name == "import":
            import import_logs

            return import_logs.main(argv)
        return 3


def test_pipeline_keeps_imported_tables_byte_for_byte(tmp_path):
    """Before: generate ran (no marker) and replaced the imported tables with synthetic ones."""
    import import_logs

    run = tmp_path / "run"
    src = _src(tmp_path / "ml")
    assert import_logs.main(["--format", "recbole", "--src", str(src), "--out", str(run / "raw")]) == 0
    before = _sums(run / "raw")
    runner = Runner()
    with pytest.raises(StageError, match="stage 'prepare'"):
        run_pipeline(TINY, [f"run_dir={run}"], runner=runner, log=lambda s: None)
    assert [c[0] for c in runner.calls] == ["prepare"]  # generate skipped: run_dir/raw is a recorded import
    assert _sums(run / "raw") == before


def test_source_import_runs_importer_first_then_skips_it(tmp_path):
    src = _src(tmp_path / "ml")
    run, ref = tmp_path / "run", tmp_path / "ref"
    import import_logs

    assert import_logs.main(["--format", "recbole", "--src", str(src), "--out", str(ref)]) == 0
    runner = Runner()
    with pytest.raises(StageError, match="stage 'prepare'"):
        run_pipeline(TINY, [f"run_dir={run}"], runner=runner, log=lambda s: None, source=f"import:recbole:{src}",
                     import_args=["--title-field", "title:token_seq"])
    assert [c[0] for c in runner.calls] == ["import", "prepare"]
    assert runner.calls[0][1] == ["--format", "recbole", "--src", str(src), "--out", str(run / "raw"),
                                  "--title-field", "title:token_seq"]
    got = _sums(run / "raw")
    assert {k: v for k, v in got.items() if k != "import.json"} == {
        k: v for k, v in _sums(ref).items() if k != "import.json"}  # the same bytes as a direct import
    runner = Runner()
    with pytest.raises(StageError, match="stage 'prepare'"):
        run_pipeline(TINY, [f"run_dir={run}"], runner=runner, log=lambda s: None, source=f"import:recbole:{src}",
                     import_args=["--title-field", "title:token_seq"])
    assert [c[0] for c in runner.calls] == ["prepare"] and _sums(run / "raw") == got  # same import: skipped
    (src / "ml.inter").write_text(INTER + "186\t2\t4\t891717800\n")  # the source changed: imported again
    runner = Runner()
    with pytest.raises(StageError, match="stage 'prepare'"):
        run_pipeline(TINY, [f"run_dir={run}"], runner=runner, log=lambda s: None, source=f"import:recbole:{src}",
                     import_args=["--title-field", "title:token_seq"])
    assert [c[0] for c in runner.calls] == ["import", "prepare"]
    with pytest.raises(StageError, match=r"--source 'import:nosuch:/x': unknown import format 'nosuch'"):
        run_pipeline(TINY, [f"run_dir={run}"], runner=Runner(), log=lambda s: None, source="import:nosuch:/x")


def test_prepare_rehashed_when_the_import_changes(tmp_path):
    """Stages after an import are keyed on its checksums: a different import reruns prepare."""
    import import_logs

    src, run = _src(tmp_path / "ml"), tmp_path / "run"
    assert import_logs.main(["--format", "recbole", "--src", str(src), "--out", str(run / "raw")]) == 0
    stage = [Stage("prepare", "prepare_data.py", "prepare", lambda run_dir, cfgs: None)]  # output check passes

    def pipeline():
        return run_pipeline(TINY, [f"run_dir={run}"], runner=lambda st, argv: 0, stages=stage, log=lambda s: None)

    assert pipeline() == [("prepare", "ran")]
    assert pipeline() == [("prepare", "skipped")]
    (src / "ml.item").write_text(ITEM.replace("GoldenEye", "Golden Eye"))
    assert import_logs.main(["--format", "recbole", "--src", str(src), "--out", str(run / "raw")]) == 0
    assert pipeline() == [("prepare", "ran")]


def test_pipeline_refuses_to_generate_over_unrecorded_tables(tmp_path):
    import generate_logs

    run = tmp_path / "run"
    assert generate_logs.main(["--config", str(TINY), f"run_dir={run}"]) == 0
    (run / "raw" / "generated.json").unlink()  # tables now look hand-placed: nobody recorded writing them
    before = _sums(run / "raw")
    runner = Runner()
    with pytest.raises(StageError, match=r"raw holds raw tables \[.*\] that no generate run wrote and no import "
                                         r"recorded: the pipeline never overwrites them"):
        run_pipeline(TINY, [f"run_dir={run}"], runner=runner, log=lambda s: None)
    assert runner.calls == [] and _sums(run / "raw") == before


def test_pipeline_job_takes_source_option(tmp_path, capsys):
    import pipeline

    assert pipeline.main(["--config", str(TINY), "--source", "import:nosuch:/x", f"run_dir={tmp_path}"]) == 1
    assert "unknown import format 'nosuch'" in capsys.readouterr().err


def test_prepare_raw_dir_import_is_a_source(tmp_path):
    """``prepare.raw_dir`` pointing at a recorded import: no generate, prepare keyed on the import's checksums."""
    import import_logs

    src, raw = _src(tmp_path / "ml"), tmp_path / "imported"
    assert import_logs.main(["--format", "recbole", "--src", str(src), "--out", str(raw)]) == 0
    runner = Runner()
    over = [f"run_dir={tmp_path / 'run'}", f"prepare.raw_dir={raw}"]
    with pytest.raises(StageError, match="stage 'prepare'"):
        run_pipeline(TINY, over, runner=runner, log=lambda s: None)
    assert [c[0] for c in runner.calls] == ["prepare"] and f"prepare.raw_dir={raw}" in runner.calls[0][1]
    assert not (tmp_path / "run" / "raw").exists()
