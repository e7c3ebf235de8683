"""Every preset loads into every stage dataclass; unknown keys and bad values fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lsvcr_dist.config import STAGES, ConfigError, check_overrides_known, from_dict, load_config, to_dict

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
        check_overrides_known(None, ["nothing.here=1"])


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
