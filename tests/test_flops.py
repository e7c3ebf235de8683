"""FLOP model (lsvcr_dist/flops.py): hand-computed counts for a tiny GLM shape.

Tiny shape: L=2 layers, H=8, 2 heads x head_dim 4 (d=8), 1 KV group (kv width 4), FFN 12, V=10.
Per layer linears (in x out): q 8x8=64, k 8x4=32, v 8x4=32, o 8x8=64, gate_up 8x24=192, down 12x8=96 -> 480,
so N = 2 x 480 = 960. LoRA r=2: r(in+out) = 32 + 24 + 24 + 32 + 64 + 40 = 216 per layer -> N_lora = 432.
"""

from __future__ import annotations

import math

import pytest

from lsvcr_dist.flops import (CHATGLM3_6B, LLMShape, StepCounts, align_step_flops, mfu,
                              peak_flops_for_device)

TINY = LLMShape(n_layers=2, hidden=8, n_heads=2, n_kv_heads=1, head_dim=4, ffn=12, vocab=10)


def test_param_counts_by_hand():
    assert TINY.matmul_params() == 960
    assert TINY.lora_params(2) == 432
    assert TINY.lora_params(2, ["q_proj", "v_proj"]) == 2 * (32 + 24)
    with pytest.raises(ValueError, match="gate_proj"):
        TINY.lora_params(2, ["gate_proj"])


def test_step_flops_by_hand():
    """Prompts of 3 and 5 real tokens (8 tokens, sum T^2 = 34), one text of 2 tokens, 4 target tokens.

    prompt_base 4*960*8 = 30720; prompt_attn 12*(2*8)*34 = 6528; prompt_lora 6*432*8 = 20736;
    lm_head 4*10*8*4 = 1280; text_base 4*960*2 = 7680; text_attn 12*16*4 = 768; text_lora 6*432*2 = 5184;
    pref_head 6*8*3*2 = 288; sr 6*7*10 = 420; total 73604.
    """
    c = StepCounts(samples=2, prompt_lengths=[3, 5], text_lengths=[2], target_tokens=4, sr_positions=10)
    f = align_step_flops(TINY, c, lora_r=2, sr_params=7, sr_dim=3)
    assert f == {"prompt_base": 30720.0, "prompt_attn": 6528.0, "prompt_lora": 20736.0, "lm_head": 1280.0,
                 "text_base": 7680.0, "text_attn": 768.0, "text_lora": 5184.0, "pref_head": 288.0, "sr": 420.0,
                 "total": 73604.0}


def test_full_vocab_logits_and_frozen_text_encoder():
    """logit_positions=8 (every prompt position): lm_head 4*10*8*8 = 2560. text_grad=False: text_base 2*960*2 =
    3840, text_attn 4*16*4 = 256, text_lora 2*432*2 = 1728."""
    c = StepCounts(samples=2, prompt_lengths=[3, 5], text_lengths=[2], target_tokens=4, logit_positions=8)
    f = align_step_flops(TINY, c, lora_r=2, text_grad=False)
    assert f["lm_head"] == 2560.0
    assert (f["text_base"], f["text_attn"], f["text_lora"]) == (3840.0, 256.0, 1728.0)
    assert align_step_flops(TINY, c, lora_r=0)["prompt_lora"] == 0.0


def test_counts_accumulate():
    a = StepCounts(samples=2, prompt_lengths=[3, 5], text_lengths=[2], target_tokens=4, sr_positions=10)
    a.add(StepCounts(samples=1, prompt_lengths=[4], text_lengths=[1, 1], target_tokens=2, logit_positions=4,
                     sr_positions=5))
    assert (a.samples, a.prompt_tokens, a.text_tokens, a.target_tokens, a.logit_positions, a.sr_positions) == (
        3, 12, 4, 6, 4, 15)


def test_shape_matches_a_real_glm_and_peft():
    """N and N_lora equal the weights that transformers' GLM and peft actually create."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GlmConfig, GlmForCausalLM

    conf = GlmConfig(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=4, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = GlmForCausalLM(conf)
    assert LLMShape.from_hf_config(conf) == TINY
    lin = sum(m.weight.numel() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    assert lin == TINY.matmul_params()
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=list(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"))))
    n_lora = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    assert n_lora == TINY.lora_params(2)


def test_chatglm3_6b_shape():
    """ChatGLM3-6B: per layer q 4096^2 + k,v 4096*256 each + o 4096^2 + gate_up 4096*27392 + down 13696*4096."""
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 256 + 4096 * 27392 + 13696 * 4096
    assert CHATGLM3_6B.matmul_params() == 28 * per_layer
    # With both embedding tables the model is the well-known ~6.24 B parameters.
    assert math.isclose(CHATGLM3_6B.matmul_params() + 2 * 65024 * 4096, 6.24e9, rel_tol=0.01)


def test_peaks_and_mfu():
    assert peak_flops_for_device("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_flops_for_device("NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_flops_for_device("cpu") is None
    assert mfu(2.0e12, 1.0e12, devices=4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="peak_per_device"):
        mfu(1.0, 0.0)


def test_cpu_probe_counts_2n3_per_product_over_its_clock(monkeypatch):
    """The probe's rate is (products x 2 n^3) / measured time, best batch: with a fake clock advancing 0.5 s per
    read, one batch of 4 products of n=8 reads 0.5 s -> 4 * 1024 / 0.5 = 8192 FLOP/s (no timing asserted)."""
    import lsvcr_dist.flops as flops

    ticks = iter(range(1000))
    monkeypatch.setattr(flops.time, "perf_counter", lambda: 0.5 * next(ticks))
    assert flops.cpu_matmul_probe(n=8, seconds=0.1) == 4 * 2 * 8 ** 3 / 0.5


def test_formula_matches_the_flops_torch_actually_runs():
    """align_step_flops vs torch's FlopCounterMode over a real LoRA GLM recommender forward + backward.

    Shape: L=2, H=16, 4 heads x 4 (d=16), 2 KV groups (kv width 8), FFN 24, V=40; LoRA r=2 on all six linears,
    dropout 0; eager attention (CPU SDPA kernels are not in torch's FLOP registry). Two unpadded prompts of T=7
    with 3 target positions each (n=6), pref head 16 -> 5.

    The formula's 4N / 6N_lora assume every linear's input needs a gradient. Layer 0's q/k/v read the frozen
    embeddings, so autograd skips their input gradients: the count torch runs is lower by, per token,
    2 * (q + k + v weights of one layer) = 2 * (256 + 128 + 128) = 1024, plus LoRA A's input gradient there,
    2 * r * in * 3 = 2 * 2 * 16 * 3 = 192; 14 tokens -> 14 * 1216 = 17024 FLOPs.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import GlmConfig, GlmForCausalLM

    from lsvcr_dist.models.llm_rec import LLMRecommender

    torch.manual_seed(0)
    conf = GlmConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=4, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                     attn_implementation="eager", tie_word_embeddings=False)
    shape = LLMShape.from_hf_config(conf)
    lm = get_peft_model(GlmForCausalLM(conf), LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0,
                                                         target_modules=list(("q_proj", "k_proj", "v_proj", "o_proj",
                                                                              "gate_up_proj", "down_proj"))))
    rec = LLMRecommender(lm, hidden_size=16, sr_dim=5)
    ids = torch.randint(3, 40, (2, 7))
    labels = torch.full((2, 7), -100)
    labels[:, 4:] = ids[:, 4:]  # positions 3..5 predict tokens 4..6: 3 per prompt
    with FlopCounterMode(display=False) as fc:
        loss, s_tilde, n_tok = rec(ids, torch.ones(2, 7, dtype=torch.long), labels, torch.tensor([3, 3]))
        (loss + s_tilde.sum()).backward()
    assert int(n_tok) == 6
    counts = StepCounts(samples=2, prompt_lengths=[7, 7], target_tokens=6)
    f = align_step_flops(shape, counts, lora_r=2, sr_dim=5)
    assert fc.get_total_flops() == f["total"] - 17024
