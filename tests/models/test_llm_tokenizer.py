"""The bundled offline tokenizer: loads with AutoTokenizer, special ids, size, rebuild reproduces the same files."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from lsvcr_dist.models.tiny_glm import TINY_TOKENIZER_DIR, build_tiny_tokenizer, load_tiny_tokenizer


def test_bundled_tokenizer_loads_offline_with_special_ids():
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR), local_files_only=True)
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == ("<pad>", "<eos>", "<bos>", "<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert 2000 <= len(tok) <= 4096


def test_instruction_words_are_merged_and_roundtrip():
    tok = load_tiny_tokenizer()
    text = "Please recommend the next video for him/her based on these interaction histories:"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # Template words are single merges: 15 words -> few tokens (a byte-level fallback would need ~80).
    assert len(ids) <= 20
    assert tok.decode(ids) == text
    # Any text still tokenizes (byte level), e.g. emoji and CJK, and decodes back exactly.
    odd = "好看 😀 zzqx"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd


def test_bos_only_with_special_tokens():
    tok = load_tiny_tokenizer()
    with_specials = tok("video")["input_ids"]
    without = tok("video", add_special_tokens=False)["input_ids"]
    assert with_specials == [tok.bos_token_id] + without


def test_rebuild_equals_bundled(tmp_path):
    out = build_tiny_tokenizer(tmp_path / "tok")
    new = json.loads((out / "tokenizer.json").read_text())
    old = json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text())
    assert new["model"]["vocab"] == old["model"]["vocab"]
    assert new["model"]["merges"] == old["model"]["merges"]
    assert (out / "tokenizer_config.json").read_text() == (TINY_TOKENIZER_DIR / "tokenizer_config.json").read_text()
