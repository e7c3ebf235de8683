"""Every preset loads into every stage dataclass; unknown keys and bad values fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

import dataclasses

from lsvcr_dist.config import (
    STAGES,
    ConfigError,
    DeepSpeedConfig,
    OptimConfig,
    check_overrides_known,
    from_dict,
    load_config,
    overrides_for,
    route_override,
    to_dict,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))


def test_presets_exist():
    assert {p.stem for p in CONFIGS} >= {"tiny", "small", "paper"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_loads_every_stage_and_opens_with_its_submit_line(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# ray job submit --working-dir . -- python jobs/align.py --config jobs/configs/{path.name}"
    for stage, cls in STAGES.items():
        cfg = load_config(path, stage)
        assert isinstance(cfg, cls)
        assert from_dict(stage, to_dict(cfg)) == cfg  # what the Ray workers rebuild is the same config


def test_paper_preset_holds_the_papers_settings():
    """Section 4.1.4 and Table 1."""
    path = next(p for p in CONFIGS if p.stem == "paper")
    gen = load_config(path, "generate")
    assert (gen.num_users, gen.num_videos, gen.num_comments, gen.num_video_inter, gen.num_comment_inter) == (
        19_691, 100_772, 14_163_262, 789_986, 100_593)
    prep = load_config(path, "prepare")
    assert (prep.align_hist_len, prep.finetune_hist_len) == (20, 50)
    al = load_config(path, "align")
    assert (al.global_batch, al.max_steps, al.optim.lr, al.sr.dim) == (128, 5000, 3e-4, 64)
    assert (al.loss.tau, al.loss.lam, al.loss.mu) == (0.07, 1.0, 0.5)
    assert al.deepspeed.zero_stage == 2 and al.deepspeed.precision in ("auto", "bf16")


def test_dotted_overrides_are_typed_and_stage_prefixes_route():
    cfg = load_config(None, "align", ["optim.lr=3e-4", "scaling.num_workers=4", "deepspeed.zero_stage=3",
                                      "max_steps=7", "loss.use_ssc=false", "finetune.max_epochs=2"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert (cfg.scaling.num_workers, cfg.deepspeed.zero_stage, cfg.max_steps) == (4, 3, 7)
    assert cfg.loss.use_ssc is False
    assert load_config(None, "finetune", ["finetune.max_epochs=2"]).max_epochs == 2
    assert cfg.grad_accum_steps() == 128 // (cfg.deepspeed.micro_batch * 4)


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "optim.lrr"), ("scalling.num_workers=2", "scalling"), ("max_step=3", "max_step"),
])
def test_unknown_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, "align", [override])


def test_unknown_yaml_keys_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\nalign:\n  optim: {lr: 1.0e-3, momentum: 0.9}\n")
    with pytest.raises(ConfigError, match="'optim.momentum'"):
        load_config(bad, "align")
    bad.write_text("run_dirr: x\n")
    with pytest.raises(ConfigError, match="'run_dirr'"):
        load_config(bad, "align")
    with pytest.raises(ConfigError, match="no stage has it"):
        check_overrides_known(["nothing.here=1"])
    with pytest.raises(ConfigError, match="'align.max_epochs' \\(no stage has it\\)"):
        check_overrides_known(["align.max_epochs=2"])  # fine-tune has the key, the stage named does not
    check_overrides_known(["max_epochs=2", "finetune.max_epochs=2", "optim.lr=1e-3", "run_dir=x"])


def test_bad_values_and_combinations_fail():
    with pytest.raises(ConfigError, match="'max_steps' expects int"):
        load_config(None, "align", ["max_steps=abc"])
    with pytest.raises(ConfigError, match="not divisible"):
        load_config(None, "align", ["global_batch=10", "deepspeed.micro_batch=4", "scaling.num_workers=2"])
    with pytest.raises(ConfigError, match="fp16"):
        load_config(None, "align", ["deepspeed.precision=fp16"])
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(None, "serve")


def test_local_paths_are_made_absolute_against_the_driver_cwd(tmp_path, monkeypatch):
    """Ray Train runs workers in their own working directory, so the preset's relative ``run_dir: runs/tiny`` (and
    any relative checkpoint/tokenizer folder) must reach them absolute; ids and file names stay as given."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path(__file__).parents[1] / "jobs" / "configs" / "tiny.yaml", "align",
                      ["llm.path=models/glm", "llm.tokenizer_path=~/tok", "llm.gguf_file=m.gguf"])
    assert cfg.run_dir == str(tmp_path / "runs" / "tiny")
    assert cfg.llm.path == str(tmp_path / "models" / "glm")
    assert cfg.llm.tokenizer_path == str(Path.home() / "tok")
    assert cfg.llm.gguf_file == "m.gguf"
    enc = load_config(None, "encode", ["run_dir=/data/r", "adapter_dir=a/final"])
    assert enc.run_dir == "/data/r" and enc.adapter_dir == str(tmp_path / "a" / "final")
    assert load_config(None, "prepare").raw_dir == ""  # empty means "derive from run_dir": left alone
    assert from_dict("align", to_dict(cfg)).run_dir == cfg.run_dir  # what the workers rebuild


TINY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml"


@pytest.mark.parametrize("stage, override, key", [
    ("align", "global_batch=-16", "global_batch"),
    ("align", "max_steps=-5", "max_steps"),
    ("align", "optim.lr=-1", "optim.lr"),
    ("align", "scaling.num_workers=0", "scaling.num_workers"),
    ("align", "deepspeed.micro_batch=0", "deepspeed.micro_batch"),
    ("align", "checkpoint.every_steps=0", "checkpoint.every_steps"),
    ("align", "loss.tau=0", "loss.tau"),
    ("align", "comdiv.video_sample_p=1.5", "comdiv.video_sample_p"),
    ("align", "lora.dropout=1", "lora.dropout"),
    ("align", "sr.dim=0", "sr.dim"),
    ("prepare", "shard_rows=-5", "shard_rows"),
    ("prepare", "unseen_user_frac=1", "unseen_user_frac"),
    ("encode", "batch_size=-3", "batch_size"),
    ("finetune", "batch_size=-64", "batch_size"),
    ("finetune", "batch_size=1", "batch_size"),  # 2 workers: one of them would get no row
    ("finetune", "patience=0", "patience"),
    ("finetune", "max_steps_per_epoch=-1", "max_steps_per_epoch"),
    ("evaluate", "batch_size=-1", "batch_size"),
    ("evaluate", "ks=[10,0]", "ks"),
])
def test_sizes_and_rates_out_of_range_name_the_key(stage, override, key):
    """Negative or zero sizes used to load (fine-tune ran on with a per-worker batch of 1, evaluate wrote zeros,
    ``num_workers=0`` divided by zero); each is refused at load time, naming the dotted key."""
    with pytest.raises(ConfigError, match=f"config key '{key}' must be"):
        load_config(TINY, stage, [override])


@pytest.mark.parametrize("override, key, allowed", [
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage", "0, 1, 2, 3"),
    ("deepspeed.precision=fp16", "deepspeed.precision", "auto, bf16, fp32"),
    ("llm.dtype=fp16", "llm.dtype", "auto, bf16, fp32"),
    ("text_source=disk", "text_source", "online, store"),
    ("optim.schedule=step", "optim.schedule", "linear, cosine, constant"),
    ("optim.impl=apex", "optim.impl", "auto, fused, foreach, for_loop"),
    ("ingest.format=csv", "ingest.format", "parquet, webdataset"),
    ("loss.lm_reduction=max", "loss.lm_reduction", "mean, sum"),
])
def test_enumerations_are_checked_at_load_time(override, key, allowed):
    with pytest.raises(ConfigError, match=f"config key '{key}' must be one of {allowed}, got"):
        load_config(TINY, "align", [override])


def test_stage_choices_and_cross_field_rules():
    with pytest.raises(ConfigError, match="'tasks' must be one of video, comment, got \\['video', 'x'\\]"):
        load_config(TINY, "finetune", ["tasks=[video,x]"])
    with pytest.raises(ConfigError, match="'tasks' must not be empty"):
        load_config(TINY, "finetune", ["tasks=[]"])
    with pytest.raises(ConfigError, match="baseline: set finetune.init=scratch"):
        load_config(TINY, "finetune", ["model=sasrec"])
    with pytest.raises(ConfigError, match="only a constant learning rate"):
        load_config(TINY, "finetune", ["optim.schedule=linear"])
    with pytest.raises(ConfigError, match="align_hist_len=60 must be <= finetune_hist_len=50"):
        load_config(TINY, "prepare", ["align_hist_len=60"])
    with pytest.raises(ConfigError, match="'which' must be one of base, aligned"):
        load_config(TINY, "encode", ["which=both"])
    # the same rules hold for a dataclass built in code, not only for YAML
    with pytest.raises(ConfigError, match="'zero_stage' must be one of 0, 1, 2, 3, got 5"):
        DeepSpeedConfig(zero_stage=5)
    with pytest.raises(ConfigError, match="'betas' must be two values in \\[0, 1\\)"):
        OptimConfig(betas=[0.9, 1.0])
    assert load_config(TINY, "finetune", ["batch_size=2"]).batch_size == 2  # the boundary itself is fine


def test_missing_or_malformed_config_file_is_a_config_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"{missing}: cannot read the config file"):
        load_config(missing, "align")
    bad = tmp_path / "bad.yaml"
    bad.write_text("align:\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML \\(line 3, column 1"):
        load_config(bad, "align")
    with pytest.raises(ConfigError, match="override 'optim.lr=\\[1': the value is not valid YAML"):
        load_config(None, "align", ["optim.lr=[1"])


def test_cli_reports_bad_values_and_files_with_exit_2(tmp_path, capsys):
    import evaluate as job  # jobs/evaluate.py

    with pytest.raises(SystemExit) as e:
        job.main(["--config", str(TINY), f"run_dir={tmp_path}", "batch_size=-1"])
    assert e.value.code == 2 and "config key 'batch_size' must be >= 1, got -1" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()
    with pytest.raises(SystemExit) as e:
        job.main(["--config", str(tmp_path / "nope.yaml")])
    assert e.value.code == 2 and "nope.yaml: cannot read the config file" in capsys.readouterr().err


def test_one_routing_rule_for_every_caller():
    """``route_override`` decides where a key goes for ``load_config``, ``overrides_for`` (pipeline stages, the
    benchmark) and ``check_overrides_known`` alike."""
    assert route_override("align.optim.lr") == ("align", "optim.lr")
    assert route_override("optim.lr") == (None, "optim.lr")
    names = {f.name for cls in STAGES.values() for f in dataclasses.fields(cls)}
    assert not names & set(STAGES)  # so a stage prefix never shadows a field
    assert load_config(None, "align", ["finetune.max_steps=9", "align.max_steps=7"]).max_steps == 7
    ovr = ["max_epochs=3", "align.max_steps=7", "optim.lr=0.01", "num_users=5"]
    assert overrides_for("finetune", ovr) == ["max_epochs=3", "align.max_steps=7", "optim.lr=0.01"]
    assert overrides_for("generate", ovr) == ["align.max_steps=7", "num_users=5"]
