"""encode_text: base / aligned stores over every text of the manifest (local path and the Ray Data job)."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from _llm_fakes import NC, NV, make_data_dir  # noqa: E402

from lsvcr_dist.config import EncodeConfig, LLMConfig, LoRAConfig, SRConfig  # noqa: E402
from lsvcr_dist.embeddings import EmbeddingStore, load_text_norm  # noqa: E402
from lsvcr_dist.encode import TextEncoder, aligned_paths, encode_texts_local  # noqa: E402
from lsvcr_dist.models.builders import build_sr_model_from_config  # noqa: E402
from lsvcr_dist.models.llm_builders import apply_lora, build_causal_lm, build_tokenizer  # noqa: E402
from lsvcr_dist.models.llm_rec import LLMRecommender  # noqa: E402

LLM = LLMConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, ffn_size=48, max_text_len=8)
SR = SRConfig(dim=8, text_dim=6, text_mlp_hidden=10)


def _cfg(run_dir, which="base", **kw):
    return EncodeConfig(run_dir=str(run_dir), seed=7, llm=LLM, lora=LoRAConfig(r=2, alpha=4, dropout=0.0), sr=SR,
                        which=which, batch_size=5, shard_rows=7, **kw)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    make_data_dir(root)
    return root


def _reference(run_dir, ids, adapter=None, mlp=None):
    """LLM(t) the slow way: tokenize each text alone, run the (peft) model, mean-pool, optional text MLP."""
    tok = build_tokenizer(LLM)
    lm = build_causal_lm(LLM, tok, torch.float32, seed=7)
    if adapter is not None:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter)
    rec = LLMRecommender(lm, 32, 1).eval()
    texts = [f"video {i} " + ["cats", "skiing", "noodles", "guitar", "cars", "travel"][i - 1] if i <= NV
             else f"comment {i - NV}" for i in ids]
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt", truncation=True, max_length=8)
            v = rec.encode_text(enc["input_ids"], enc["attention_mask"])
            out.append(mlp(v) if mlp is not None else v)
    return torch.cat(out).numpy()


def test_base_store_covers_every_text_once(run_dir):
    man = encode_texts_local(_cfg(run_dir), log=lambda *_: None)
    store = EmbeddingStore.open(Path(run_dir) / "embeddings" / "base")
    assert store.count == NV + NC == man["count"] and store.dim == 32
    assert man["projected"] is False and man["adapter"] is None and man["pooling"] == "mean"
    assert man["model"] == "tiny_glm(h=32,layers=1,seed=7)" and len(man["shards"]) == 3  # 19 rows / 7
    table = store.as_tensor().numpy()
    assert np.isfinite(table).all() and (table[0] == 0).all() and (np.abs(table[1:]).sum(1) > 0).all()
    # llm.text_norm=standardize: stored = (LLM(t) - mean) / std over all NV + NC texts, per dimension
    raw = _reference(run_dir, np.arange(1, NV + NC + 1))
    center, scale = load_text_norm(Path(run_dir) / "embeddings" / "base")
    np.testing.assert_allclose(center, raw.mean(0), atol=3e-3)  # from the fp16 raw rows
    np.testing.assert_allclose(scale, raw.std(0), rtol=1e-2, atol=1e-3)
    ids = np.array([1, 6, NV + 1, NV + 12])
    np.testing.assert_allclose(store.lookup(ids), (raw[ids - 1] - center) / scale, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(table[1:].mean(0), 0.0, atol=2e-3)
    assert man["text_norm"]["kind"] == "standardize" and man["stats_raw"]["titles"]["rows"] == NV
    assert abs(man["stats"]["comments"]["mean_pairwise_cosine"]) < man["stats_raw"]["comments"]["mean_pairwise_cosine"]
    # llm.text_norm=none keeps LLM(t) as it is
    raw_cfg = _cfg(run_dir / "raw_copy")
    raw_cfg.llm = dataclasses.replace(LLM, text_norm="none")
    shutil.copytree(Path(run_dir) / "data", run_dir / "raw_copy" / "data")
    man_raw = encode_texts_local(raw_cfg, log=lambda *_: None)
    assert "text_norm" not in man_raw and load_text_norm(run_dir / "raw_copy" / "embeddings" / "base") is None
    raw_store = EmbeddingStore.open(run_dir / "raw_copy" / "embeddings" / "base")
    np.testing.assert_allclose(raw_store.lookup(ids), raw[ids - 1], rtol=2e-3, atol=2e-3)  # fp16 store


def test_aligned_store_is_projected_by_the_aligned_text_mlp(run_dir):
    final = Path(run_dir) / "align" / "final"
    with pytest.raises(FileNotFoundError, match="run jobs/align.py first"):
        aligned_paths(run_dir)
    tok = build_tokenizer(LLM)
    peft_lm = apply_lora(build_causal_lm(LLM, tok, torch.float32, seed=7), LoRAConfig(r=2, alpha=4, dropout=0.0))
    with torch.no_grad():
        for n, p in peft_lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft_lm.save_pretrained(str(final / "adapter"))
    torch.manual_seed(0)
    sr = build_sr_model_from_config(SR, text_in_dim=32)
    with torch.no_grad():  # O(1) outputs (the 0.02 init gives ~1e-3 vectors, too close to fp16 resolution)
        for p in sr.text_mlp.parameters():
            p.normal_(0, 0.3)
    save_file({k: v.contiguous() for k, v in sr.state_dict().items()}, str(final / "sr.safetensors"))

    man = encode_texts_local(_cfg(run_dir, "aligned"), log=lambda *_: None)
    store = EmbeddingStore.open(Path(run_dir) / "embeddings" / "aligned")
    assert store.dim == 6 and man["projected"] is True and man["adapter"] == str(final / "adapter")
    ids = np.array([2, NV + 5])
    # the MLP sees LLM(t) standardised with the base store's center/scale, as during alignment
    center, scale = (torch.from_numpy(a) for a in load_text_norm(Path(run_dir) / "embeddings" / "base"))
    assert man["text_norm_input"] == str(Path(run_dir) / "embeddings" / "base")

    def mlp(v):
        return sr.text_mlp.eval()((v - center) / scale)

    expected = _reference(run_dir, ids, adapter=str(final / "adapter"), mlp=mlp)
    np.testing.assert_allclose(store.lookup(ids), expected, rtol=2e-3, atol=2e-3)
    # The adapter matters: the base LLM through the same MLP gives other vectors.
    base_mlp = _reference(run_dir, ids, mlp=mlp)
    assert np.abs(store.lookup(ids) - base_mlp).max() > 1e-2


def test_store_source_alignment_projects_the_base_store(run_dir, tmp_path):
    """After a text_source=store alignment the aligned store is text_mlp(base row) for every text (the LLM never
    encoded texts in that alignment, so its adapter is not applied to them)."""
    import yaml

    if not (Path(run_dir) / "embeddings" / "base" / "manifest.json").exists():  # run alone
        encode_texts_local(_cfg(run_dir), log=lambda *_: None)
    run = tmp_path / "store_run"
    (run / "embeddings").mkdir(parents=True)
    (run / "embeddings" / "base").symlink_to(Path(run_dir) / "embeddings" / "base")
    final = run / "align" / "final"
    (final / "adapter").mkdir(parents=True)
    torch.manual_seed(1)
    sr = build_sr_model_from_config(SR, text_in_dim=32)
    save_file({k: v.contiguous() for k, v in sr.state_dict().items()}, str(final / "sr.safetensors"))
    (final / "config.yaml").write_text(yaml.safe_dump({"text_source": "store", "llm": {"text_norm": "standardize"}}))
    man = encode_texts_local(_cfg(run, "aligned"), log=lambda *_: None)
    assert man["adapter"] is None and man["projected"] is True and man["model"].startswith("text_mlp(")
    base = EmbeddingStore.open(Path(run_dir) / "embeddings" / "base").as_tensor()
    got = EmbeddingStore.open(run / "embeddings" / "aligned").as_tensor()
    with torch.no_grad():
        want = sr.text_mlp.eval()(base[1:])
    torch.testing.assert_close(got[1:], want, rtol=2e-3, atol=2e-3)
    assert got.shape == (1 + NV + NC, SR.text_dim) and (got[0] == 0).all()


def test_bad_which_and_missing_mlp_weights(run_dir, tmp_path):
    kw = dict(data_dir=str(Path(run_dir) / "data"), llm=dataclasses.asdict(LLM), seed=7)
    with pytest.raises(ValueError, match="encode.which must be 'base' or 'aligned'"):
        TextEncoder(which="both", **kw)
    save_file({"merge.weight": torch.zeros(2, 2)}, str(tmp_path / "sr.safetensors"))
    with pytest.raises(KeyError, match="no 'text_mlp.\\*' weights"):
        TextEncoder(which="aligned", adapter=str(Path(run_dir) / "align" / "final" / "adapter"),
                    sr_file=str(tmp_path / "sr.safetensors"), sr=dataclasses.asdict(SR), **kw)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_encode_job_on_ray_matches_local(ray_local, run_dir, capsys):
    import encode_text  # jobs/ is on sys.path (tests/conftest.py)

    root = Path(__file__).resolve().parents[2]
    out = Path(run_dir) / "ray_run"
    make_data_dir(out)
    argv = ["--config", str(root / "jobs" / "configs" / "tiny.yaml"), f"run_dir={out}", "seed=7", "batch_size=5",
            "num_actors=2", "shard_rows=7", "llm.hidden_size=32", "llm.num_layers=1", "llm.ffn_size=48",
            "llm.max_text_len=8"]
    assert encode_text.main(argv) == 0
    assert '"count": 18' in capsys.readouterr().out
    ray_store = EmbeddingStore.open(out / "embeddings" / "base")
    if not (Path(run_dir) / "embeddings" / "base" / "manifest.json").exists():  # run alone (e.g. `-m ray`)
        encode_texts_local(_cfg(run_dir), log=lambda *_: None)
    local = EmbeddingStore.open(Path(run_dir) / "embeddings" / "base")
    assert ray_store.count == NV + NC and ray_store.manifest["which"] == "base"
    np.testing.assert_array_equal(ray_store.as_tensor().numpy(), local.as_tensor().numpy())
    assert encode_text.main(argv[:3] + ["which=aligned"]) == 1  # no aligned checkpoint: one clear error line
    assert "run jobs/align.py first" in capsys.readouterr().err


def _store_bytes(store: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(store.iterdir()) if f.is_file()}


def test_killed_encode_resumes_by_shard_to_the_same_bytes(tmp_path, monkeypatch):
    """Shards of 7 rows, batches of 5 texts: a fault in the 3rd batch leaves shard 0 (ids 1-6) complete; the rerun
    encodes only ids 7-18 and the store (shards, standardisation, manifest) equals an uninterrupted run's."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for root in (whole, killed):
        make_data_dir(root)
    encode_texts_local(_cfg(whole), log=lambda *_: None)
    seen: list[int] = []
    real = TextEncoder.encode_ids

    def encode_then_fail(self, ids):
        if len(seen) >= 10:  # the 3rd batch: as if the process were killed
            raise KeyboardInterrupt("injected")
        seen.extend(int(i) for i in ids)
        return real(self, ids)

    monkeypatch.setattr(TextEncoder, "encode_ids", encode_then_fail)
    with pytest.raises(KeyboardInterrupt):
        encode_texts_local(_cfg(killed), log=lambda *_: None)
    store = killed / "embeddings" / "base"
    assert sorted(p.name for p in store.glob("*.done")) == ["shard-00000.done"]
    assert not (store / "manifest.json").exists()
    shard0 = (store / "shard-00000.npy").read_bytes()
    seen.clear()
    monkeypatch.setattr(TextEncoder, "encode_ids",
                        lambda self, ids: seen.extend(int(i) for i in ids) or real(self, ids))
    lines: list[str] = []
    encode_texts_local(_cfg(killed), log=lines.append)
    assert seen == list(range(7, NV + NC + 1))  # ids 1-6 (shard 0) were not encoded again
    assert any("1/3 shards already complete, 12 of 18 texts left" in x for x in lines)
    got, want = _store_bytes(store), _store_bytes(whole / "embeddings" / "base")
    assert got.keys() == want.keys() and "progress.json" not in got and got == want
    assert shard0 != got["shard-00000.npy"]  # kept raw, standardised at close with statistics over every row
    seen.clear()  # resume=false (or a finished store) encodes everything again
    encode_texts_local(_cfg(killed, resume=False), log=lambda *_: None)
    assert seen == list(range(1, NV + NC + 1)) and _store_bytes(store) == want


def test_resume_with_other_settings_starts_over(tmp_path, monkeypatch):
    make_data_dir(tmp_path)
    real = TextEncoder.encode_ids
    calls = []

    def fail_second(self, ids):
        calls.append(ids)
        if len(calls) == 3:
            raise KeyboardInterrupt("injected")
        return real(self, ids)

    monkeypatch.setattr(TextEncoder, "encode_ids", fail_second)
    with pytest.raises(KeyboardInterrupt):
        encode_texts_local(_cfg(tmp_path), log=lambda *_: None)
    monkeypatch.setattr(TextEncoder, "encode_ids", real)
    lines: list[str] = []
    other = _cfg(tmp_path)
    other.seed = 8  # another backbone: nothing of the interrupted write may be kept
    encode_texts_local(other, log=lines.append)
    assert any("the interrupted write had other settings (meta)" in x for x in lines)
    assert not any("already complete" in x for x in lines)


def test_ray_row_numbers_map_onto_the_pending_text_ids():
    """A resumed Ray encode enumerates only the texts left: row numbers 0..N-1 over the pending ranges."""
    from lsvcr_dist.encode import positions_to_text_ids

    ranges = [(7, 14), (21, 23)]
    assert positions_to_text_ids(np.arange(9), ranges).tolist() == [7, 8, 9, 10, 11, 12, 13, 21, 22]
    assert positions_to_text_ids(np.array([8, 0]), ranges).tolist() == [22, 7]
    with pytest.raises(ValueError, match="outside the 9 pending texts"):
        positions_to_text_ids(np.array([9]), ranges)


@pytest.mark.parametrize("n, batch, actors, blocks", [
    (4_400, 64, 1, 4),              # tiny: one block per quarter of the texts, 4 per actor
    (100, 64, 2, 2),                # fewer batches than 4 per actor: a block per batch
    (14_264_034, 64, 2, 871),       # paper: ceil(14,264,034 / 16,384) blocks of <= 256 batches
    (14_264_034, 64, 1000, 4_000),  # many actors: still 4 blocks each
])
def test_encode_blocks_keep_every_actor_busy_and_blocks_small(n, batch, actors, blocks):
    """Blocks are the driver's write and progress unit: <= 256 batches each, >= 4 per actor, <= one per batch."""
    from lsvcr_dist.encode import BLOCK_BATCHES, encode_blocks

    got = encode_blocks(n, batch, actors)
    assert got == blocks
    assert got <= -(-n // batch) and (-(-n // got) <= BLOCK_BATCHES * batch or got == 4 * actors)
