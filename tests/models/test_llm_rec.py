"""LLMRecommender: L_LM (Eq. 14) on target positions only, s~ (Eq. 10) at the last instruction token, LLM(t) pooling.

References are computed the slow way with the full model output (``[B, T, V]`` logits, all hidden states).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lsvcr_dist.config import LLMConfig, LoRAConfig
from lsvcr_dist.models.llm_builders import apply_lora, build_causal_lm, build_tokenizer
from lsvcr_dist.models.llm_rec import LLMRecommender

CFG = LLMConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=48)


@pytest.fixture(scope="module")
def lm():
    tok = build_tokenizer(CFG)
    model = build_causal_lm(CFG, tok, torch.float32, seed=0)
    peft_model = apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # non-zero B so LoRA changes the output (peft initialises B = 0)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return peft_model.eval()


def _batch():
    """Two right-padded rows: instruction lengths 4 and 6, targets of 3 and 2 tokens (eos included)."""
    ids = torch.tensor([[2, 40, 41, 42, 70, 71, 1, 0, 0, 0],
                        [2, 50, 51, 52, 53, 54, 80, 1, 0, 0]])
    mask = (torch.arange(10)[None] < torch.tensor([[7], [8]])).long()
    labels = torch.full_like(ids, -100)
    labels[0, 4:7] = ids[0, 4:7]
    labels[1, 6:8] = ids[1, 6:8]
    return ids, mask, labels, torch.tensor([3, 5])


def test_lm_loss_equals_full_logit_reference_and_counts(lm):
    ids, mask, labels, last = _batch()
    rec = LLMRecommender(lm, 32, 8, lm_reduction="mean").eval()
    loss, s, n = rec(ids, mask, labels, last)
    full = lm(input_ids=ids, attention_mask=mask).logits.float()  # [B, T, V]
    ref_sum = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1),
                              ignore_index=-100, reduction="sum")
    assert int(n) == 5  # 3 + 2 target tokens incl. eos
    torch.testing.assert_close(loss, ref_sum / 5, rtol=1e-5, atol=1e-5)
    rec_sum = LLMRecommender(lm, 32, 8, lm_reduction="sum").eval()
    rec_sum.pref_head.load_state_dict(rec.pref_head.state_dict())
    loss_sum, s2, n2 = rec_sum(ids, mask, labels, last)
    torch.testing.assert_close(loss_sum, ref_sum, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s, s2)


def test_s_tilde_is_pref_head_of_last_instruction_token(lm):
    ids, mask, labels, last = _batch()
    rec = LLMRecommender(lm, 32, 8).eval()
    _, s, _ = rec(ids, mask, labels, last)
    hidden = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]  # after final norm
    expected = rec.pref_head(torch.stack([hidden[0, 3], hidden[1, 5]]))
    assert s.shape == (2, 8)
    torch.testing.assert_close(s, expected, rtol=1e-5, atol=1e-6)


def test_right_padding_does_not_change_outputs(lm):
    ids, mask, labels, last = _batch()
    rec = LLMRecommender(lm, 32, 8).eval()
    loss, s, _ = rec(ids, mask, labels, last)
    pad = torch.zeros(2, 5, dtype=torch.long)
    loss2, s2, _ = rec(torch.cat([ids, pad], 1), torch.cat([mask, pad], 1),
                       torch.cat([labels, pad - 100], 1), last)
    torch.testing.assert_close(loss, loss2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s, s2, rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_lora_and_pref_head(lm):
    ids, mask, labels, last = _batch()
    rec = LLMRecommender(lm, 32, 8)
    loss, s, _ = rec(ids, mask, labels, last)
    (loss + s.pow(2).sum()).backward()
    got = {n for n, p in rec.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"pref_head.weight", "pref_head.bias"} <= got
    assert any("lora_A" in n for n in got)
    assert all("lora_" in n or n.startswith("pref_head") for n in got)
    rec.zero_grad(set_to_none=True)


def test_encode_text_mean_and_last_pooling(lm):
    ids = torch.tensor([[2, 40, 41, 0, 0], [2, 50, 51, 52, 53], [0, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    hidden = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    mean = LLMRecommender(lm, 32, 8, pooling="mean").encode_text(ids, mask)
    torch.testing.assert_close(mean[0], hidden[0, :3].mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean[1], hidden[1].mean(0), rtol=1e-5, atol=1e-6)
    assert torch.equal(mean[2], torch.zeros(32))  # a padding text encodes to zeros
    last = LLMRecommender(lm, 32, 8, pooling="last").encode_text(ids, mask)
    torch.testing.assert_close(last[0], hidden[0, 2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last[1], hidden[1, 4], rtol=1e-5, atol=1e-6)
    assert torch.equal(last[2], torch.zeros(32)) and mean.dtype == torch.float32


def test_bad_constructor_args(lm):
    with pytest.raises(ValueError, match="lm_reduction"):
        LLMRecommender(lm, 32, 8, lm_reduction="avg")
    with pytest.raises(ValueError, match="pooling"):
        LLMRecommender(lm, 32, 8, pooling="cls")


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_length_buckets_give_the_same_vectors_and_grads(lm, pooling):
    """Encoding 7 texts of lengths 1..9 in length-sorted chunks of 3 (each cut to its own longest) equals one
    padded batch, vectors in the caller's order, and the same LoRA gradients; a padding text stays zero."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([9, 1, 5, 0, 7, 2, 9])
    ids = torch.randint(3, 60, (7, 12), generator=g)
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    ids = ids * mask
    rec = LLMRecommender(lm, 32, 8, pooling=pooling)
    lora = [p for n, p in lm.named_parameters() if "lora_A" in n]
    weights = torch.randn(7, 32, generator=g)

    def run(bucket):
        for p in lora:
            p.grad = None
        out = rec.encode_text(ids, mask, bucket)
        (out * weights).sum().backward()
        return out.detach(), [p.grad.clone() for p in lora]

    with torch.enable_grad():
        one, g_one = run(0)
        buck, g_buck = run(3)
    torch.testing.assert_close(buck, one, rtol=1e-5, atol=1e-6)
    assert torch.equal(buck[3], torch.zeros(32))
    for a, b in zip(g_buck, g_one):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for p in lora:
        p.grad = None
