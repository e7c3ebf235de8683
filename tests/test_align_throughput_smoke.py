"""Alignment throughput benchmark: the speed-work pieces (exact trimming, the reference's full-vocab logits),
the result aggregation, and a short real run of ``benchmarks/align_throughput.py`` (Ray Train + DeepSpeed + spawn)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.align_bench import SECTIONS, full_vocab_forward, summarize
from lsvcr_dist.config import LLMConfig, LoRAConfig
from lsvcr_dist.models.align_model import TextInputs
from lsvcr_dist.train.align_step import trim_prompts, trim_text

ROOT = Path(__file__).resolve().parents[1]


def _prompts(lengths=(3, 5), t=8, target=2, vocab=50, seed=0):
    """Right-padded prompts: the last ``target`` real tokens are labels, instruction ends just before them."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    ids = torch.randint(4, vocab, (b, t), generator=g)
    pos = torch.arange(t)[None, :]
    lens = torch.tensor(lengths)[:, None]
    mask = (pos < lens).long()
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    labels = torch.where((pos >= lens - target) & mask.bool(), ids, torch.full_like(ids, -100))
    return {"prompt_input_ids": ids, "prompt_attention_mask": mask, "prompt_labels": labels,
            "prompt_last_index": torch.tensor(lengths) - target - 1, "task": torch.zeros(b, dtype=torch.long)}


def test_trim_prompts_cuts_to_longest_real_prompt():
    batch = _prompts((3, 5), t=8)
    out = trim_prompts(batch)
    for k in ("prompt_input_ids", "prompt_attention_mask", "prompt_labels"):
        assert out[k].shape == (2, 5)
        assert torch.equal(out[k], batch[k][:, :5])
    assert out["prompt_last_index"] is batch["prompt_last_index"] and out["task"] is batch["task"]
    assert batch["prompt_input_ids"].shape == (2, 8)  # the input is not modified


def test_trim_text_cuts_to_longest_text():
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    text = TextInputs(torch.tensor([3, 7]), torch.arange(10).reshape(2, 5), mask)
    out = trim_text(text)
    assert out.input_ids.tolist() == [[0, 1], [5, 6]] and out.attention_mask.tolist() == [[1, 1], [1, 0]]
    assert trim_text(TextInputs(torch.tensor([3]))).input_ids is None  # store source: nothing to trim


@pytest.fixture(scope="module")
def tiny_rec():
    from lsvcr_dist.models.llm_builders import build_llm_recommender

    _, rec = build_llm_recommender(LLMConfig(), LoRAConfig(dropout=0.0), sr_dim=8, seed=3)
    return rec.eval()


def test_trimming_is_exact_for_the_llm_recommender(tiny_rec):
    """Causal attention + right padding: the cut columns change neither L_LM, s~ nor the target count."""
    batch = _prompts((6, 11), t=20, target=3, vocab=1000, seed=1)
    args = {k: batch[k] for k in ("prompt_input_ids", "prompt_attention_mask", "prompt_labels", "prompt_last_index")}
    with torch.no_grad():
        loss, s, n = tiny_rec(**args)
        lt, st, nt = tiny_rec(**{k: v for k, v in trim_prompts(args).items()})
    assert trim_prompts(args)["prompt_input_ids"].shape[1] == 11
    assert int(n) == int(nt) == 6  # 3 targets per prompt, the first target of each is predicted too
    torch.testing.assert_close(lt, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st, s, rtol=1e-5, atol=1e-6)


def test_full_vocab_forward_matches_target_only_logits(tiny_rec):
    """The reference's [B, T, V] logits give the same loss and s~ as logits at target positions only."""
    import types

    batch = _prompts((6, 11), t=20, target=3, vocab=1000, seed=2)
    args = {k: batch[k] for k in ("prompt_input_ids", "prompt_attention_mask", "prompt_labels", "prompt_last_index")}
    with torch.no_grad():
        loss, s, n = tiny_rec(**args)
        lf, sf, nf = types.MethodType(full_vocab_forward, tiny_rec)(**args)
    assert int(nf) == int(n)
    torch.testing.assert_close(lf, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sf, s)


def _rank(r, elapsed, fwd):
    """One rank's window result as the bench workers write it."""
    sec = {k: 0.0 for k in SECTIONS}
    sec["forward"] = fwd
    return {"rank": r, "elapsed_s": elapsed, "sections": sec, "samples": 8, "prompt_tokens": 100,
            "text_tokens": 20, "target_tokens": 10, "flops": {"total": 5e12, "lm_head": 1e12},
            "peak_memory_bytes": 1000 + r, "peak_flops": 4e12, "losses": [1.0, 0.5], "device": "cpu"}


def test_summarize_by_hand():
    """2 ranks: 8 + 8 samples in max(2.0, 2.5) s = 6.4 samples/s; tokens (100+20)*2 / 2.5 = 96 tokens/s;
    FLOPs 2 x 5e12 / 2.5 = 4 TFLOP/s over 2 x 4e12 peak = MFU 0.5; forward 0.4 + 0.6 s over 2 ranks x 2 steps."""
    rank = _rank
    s = summarize([rank(1, 2.5, 0.6), rank(0, 2.0, 0.4)])
    assert s["samples_per_s"] == pytest.approx(6.4)
    assert s["tokens_per_s"] == pytest.approx(96.0)
    assert s["tflops"] == pytest.approx(4.0)
    assert s["mfu"] == pytest.approx(0.5)
    assert s["step_time_breakdown_s"]["forward"] == pytest.approx(0.25)
    assert s["peak_memory_bytes_per_worker"] == [1000, 1001]
    assert s["flops_by_term"] == {"total": 1e13, "lm_head": 2e12}


def _load_script():
    spec = importlib.util.spec_from_file_location("align_throughput", ROOT / "benchmarks" / "align_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("written", [True, False])
def test_reference_child_dying_after_its_write(monkeypatch, tmp_path, written):
    """A spawned reference process that aborts after rank 0 wrote every rank's timings keeps the (complete) result
    and records the error; one that dies before the write fails the run."""
    import torch.multiprocessing as mp

    from lsvcr_dist.config import load_config

    mod = _load_script()
    cfg = load_config(None, "align", ["scaling.num_workers=2", "deepspeed.micro_batch=4", "global_batch=8"])

    def spawn(fn, nprocs, join, args):
        if written:
            Path(args[-2]).write_text(json.dumps([_rank(0, 2.0, 0.4), _rank(1, 2.5, 0.6)]))
        raise mp.ProcessExitedException("process 0 terminated with signal SIGABRT", error_index=0, error_pid=1,
                                        exit_code=-6, signal_name="SIGABRT")

    monkeypatch.setattr(mod, "reference_batches", lambda *a: [[], []])
    monkeypatch.setattr(mp, "spawn", spawn)
    args = type("A", (), {"warmup": 1, "steps": 2, "peak_tflops": 1.0})()
    if written:
        res = mod.run_reference(cfg, {}, args, 1, tmp_path)
        assert res["samples_per_s"] == pytest.approx(6.4) and "SIGABRT" in res["teardown_error"]
    else:
        with pytest.raises(mp.ProcessExitedException):
            mod.run_reference(cfg, {}, args, 1, tmp_path)


@pytest.mark.ray
@pytest.mark.timeout(900)  # includes the tiny_prepared set-up; about 90 s of it is the script on an idle box
def test_align_throughput_smoke(tiny_prepared, tmp_path):
    """``--warmup 1 --steps 2 --workers 1`` on the tiny prepared data: positive, finite figures for ours and the
    reference recipe, a breakdown with every section, and the scaling plot."""
    run_dir, cfg_path, overrides = tiny_prepared
    out = tmp_path / "tp.json"
    rc = _load_script().main(["--config", str(cfg_path), "--out", str(out), "--warmup", "1", "--steps", "2",
                              "--workers", "1", "--ingest-rows", "16", *overrides])
    assert rc == 0
    res = json.loads(out.read_text())
    for k in ("samples_per_s", "tokens_per_s", "tflops", "mfu"):
        assert isinstance(res[k], float) and math.isfinite(res[k]) and res[k] > 0, (k, res[k])
    ref = res["reference"]
    assert math.isfinite(ref["samples_per_s"]) and ref["samples_per_s"] > 0
    assert res["ratio_ours_over_reference"] == pytest.approx(res["samples_per_s"] / ref["samples_per_s"])
    assert res["samples"] == 2 * 4  # 2 timed steps x micro batch 4 x 1 worker
    assert set(res["step_time_breakdown_s"]) == set(SECTIONS)
    assert res["step_time_breakdown_s"]["forward"] > 0 and res["step_time_breakdown_s"]["backward"] > 0
    assert res["peak_memory_bytes_per_worker"][0] > 50 * 2**20  # RSS of a process holding torch + the model
    assert res["scaling"]["workers"] == [1] and res["scaling"]["efficiency"] == [1.0]
    assert res["ingest"]["rows"] == 16 and res["ingest"]["rows_per_s"] > 0
    assert out.with_suffix(".png").stat().st_size > 1000
