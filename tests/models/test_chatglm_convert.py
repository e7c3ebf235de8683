"""ChatGLM3 checkpoint -> native GlmForCausalLM: logits equal a reference ChatGLM forward, LoRA targets resolve.

The reference below is written from the ChatGLM2/3 architecture (sequence of RMSNorm -> fused multi-query qkv with
bias -> rotary on the first half of each head in interleaved pairs, base 10000 * rope_ratio -> causal attention ->
dense -> residual -> RMSNorm -> SwiGLU on the two halves of dense_h_to_4h -> residual; final RMSNorm; output
layer), reading the ChatGLM-named tensors directly. It shares no code with transformers' Glm.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lsvcr_dist.config import LLMConfig, LoRAConfig
from lsvcr_dist.models.convert_chatglm import convert_chatglm_checkpoint
from lsvcr_dist.models.llm_builders import apply_lora, build_causal_lm, build_tokenizer
from lsvcr_dist.models.tiny_glm import tiny_corpus

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from _chatglm_fakes import chatglm_config, chatglm_tensors, train_sentencepiece, write_chatglm_checkpoint  # noqa: E402

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, positions, base):
    """ChatGLM rotary: first hd/2 dims of each head, pairs (x[2i], x[2i+1]) rotated by positions * theta_i."""
    rot = x.shape[-1] // 2
    theta = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))  # [rot/2]
    ang = positions.double()[:, :, None] * theta  # [B, T, rot/2]
    cos, sin = ang.cos()[:, :, None, :].to(x.dtype), ang.sin()[:, :, None, :].to(x.dtype)  # [B, T, 1, rot/2]
    x0, x1, rest = x[..., :rot:2], x[..., 1:rot:2], x[..., rot:]
    turned = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return torch.cat([turned, rest], dim=-1)


def chatglm_reference_logits(cfg: dict, sd: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, V]`` logits of a right-padded batch, straight from ChatGLM-named weights (float64, so the
    comparison measures the converted model's fp32 error alone)."""
    w = {k: v.double() for k, v in sd.items()}
    nh, hd, eps = cfg["num_attention_heads"], cfg["kv_channels"], cfg["layernorm_epsilon"]
    g = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else nh
    base = 10000.0 * cfg.get("rope_ratio", 1)
    b, t = ids.shape
    pos = torch.arange(t).expand(b, t)
    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool)) & mask.bool()[:, None, :]  # [B, Tq, Tk]
    h = w["transformer.embedding.word_embeddings.weight"][ids]
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        x = _rms(h, w[p + "input_layernorm.weight"], eps)
        qkv = x @ w[p + "self_attention.query_key_value.weight"].T + w[p + "self_attention.query_key_value.bias"]
        if cfg["multi_query_attention"]:
            q, k, v = qkv.split([nh * hd, g * hd, g * hd], dim=-1)
        else:  # per head [q | k | v]
            q, k, v = qkv.view(b, t, nh, 3 * hd).split(hd, dim=-1)
        q, k, v = (z.reshape(b, t, -1, hd) for z in (q, k, v))
        q, k = _rope(q, pos, base), _rope(k, pos, base)
        k, v = (z.repeat_interleave(nh // g, dim=2) for z in (k, v))  # head j reads group j // (nh / g)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / hd ** 0.5
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        ctx = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, t, nh * hd)
        h = h + ctx @ w[p + "self_attention.dense.weight"].T
        x = _rms(h, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = (x @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        h = h + (F.silu(gate) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
    h = _rms(h, w["transformer.encoder.final_layernorm.weight"], eps)
    out = w.get("transformer.output_layer.weight", w["transformer.embedding.word_embeddings.weight"])
    return (h @ out.T).float()


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    lines = tiny_corpus()[:40] + ["视频标题：今天的晚饭；热门评论：太好吃了！", "用户交互评论：{'哈哈', '好看'}"] * 3
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model", lines, vocab_size=600)


def _batch(vocab: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 11), generator=gen)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0  # right padding, as the project's prompts
    return ids, mask


CASES = {
    "bin-mqa": dict(fmt="bin", cfg={}),
    "safetensors-rope50": dict(fmt="safetensors", cfg=dict(rope_ratio=50.0)),
    "safetensors-tied-3layers": dict(fmt="safetensors", cfg=dict(layers=3), tied=True),
    "bin-no-mqa": dict(fmt="bin", cfg=dict(mqa=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_logits_equal_chatglm_reference(case, tmp_path, sp_model):
    spec = CASES[case]
    cfg = chatglm_config(**spec["cfg"])
    src = tmp_path / "chatglm3"
    sd = write_chatglm_checkpoint(src, cfg, chatglm_tensors(cfg, tied=spec.get("tied", False)), fmt=spec["fmt"],
                                  n_shards=3)
    (src / "tokenizer.model").write_bytes(sp_model.read_bytes())
    info = convert_chatglm_checkpoint(src, tmp_path / "glm", dtype="fp32", max_shard_bytes=60_000)
    assert len(info["shards"]) > 1 and info["tied"] == spec.get("tied", False)
    assert info["rope_theta"] == 10000.0 * spec["cfg"].get("rope_ratio", 1)
    llm = LLMConfig(kind="hf", path=str(tmp_path / "glm"), dtype="fp32", attn_implementation="eager")
    tok = build_tokenizer(llm)
    model = build_causal_lm(llm, tok).eval()
    assert type(model).__name__ == "GlmForCausalLM"
    ids, mask = _batch(cfg["padded_vocab_size"])
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    want = chatglm_reference_logits(cfg, sd, ids, mask)
    real = mask.bool()
    diff = (got[real] - want[real]).abs().max().item()
    print(f"{case}: max |logit diff| {diff:.2e}, max |logit| {want[real].abs().max().item():.2f}")
    assert diff < 1e-5, f"max |logit diff| {diff}"
    # The comparison can fail: a wrong rotary base moves the logits far beyond the tolerance.
    wrong = chatglm_reference_logits({**cfg, "rope_ratio": cfg.get("rope_ratio", 1) * 3}, sd, ids, mask)
    assert (wrong[real] - want[real]).abs().max().item() > 1e-2


def test_sdpa_and_bf16_load_of_the_converted_folder(tmp_path, sp_model):
    cfg = chatglm_config()
    src = tmp_path / "src"
    sd = write_chatglm_checkpoint(src, cfg, chatglm_tensors(cfg), fmt="safetensors")
    (src / "tokenizer.model").write_bytes(sp_model.read_bytes())
    convert_chatglm_checkpoint(src, tmp_path / "glm")  # keep = fp16 on disk, as the release
    conf = json.loads((tmp_path / "glm" / "config.json").read_text())
    assert conf["dtype"] == "float16" and conf["model_type"] == "glm" and "auto_map" not in conf
    llm = LLMConfig(kind="hf", path=str(tmp_path / "glm"), dtype="fp32")  # sdpa, the project default
    model = build_causal_lm(llm, build_tokenizer(llm)).eval()
    ids, mask = _batch(cfg["padded_vocab_size"], seed=3)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    want = chatglm_reference_logits(cfg, sd, ids, mask)
    assert (got[mask.bool()] - want[mask.bool()]).abs().max().item() < 1e-5


def test_lora_targets_resolve_and_every_adapter_gets_a_gradient(tmp_path, sp_model):
    cfg = chatglm_config()
    src = tmp_path / "src"
    write_chatglm_checkpoint(src, cfg, chatglm_tensors(cfg), fmt="bin")
    (src / "tokenizer.model").write_bytes(sp_model.read_bytes())
    convert_chatglm_checkpoint(src, tmp_path / "glm", dtype="fp32")
    llm = LLMConfig(kind="hf", path=str(tmp_path / "glm"), dtype="fp32")
    tok = build_tokenizer(llm)
    for targets, per_layer in ((["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"], 6),
                               (["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], 6)):
        model = apply_lora(build_causal_lm(llm, tok), LoRAConfig(r=4, alpha=8, dropout=0.0,
                                                                 target_modules=targets))
        lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert len(lora) == 2 * per_layer * cfg["num_layers"]
        assert all("lora_" in n for n in lora) and sum(p.numel() for p in lora.values()) > 0
        with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without a gradient
            for n, p in lora.items():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        ids, mask = _batch(cfg["padded_vocab_size"], seed=4)
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        dead = [n for n, p in lora.items() if p.grad is None or p.grad.abs().sum() == 0]
        assert not dead, dead


def test_bad_inputs_are_named(tmp_path, sp_model):
    cfg = chatglm_config()
    src = tmp_path / "src"
    write_chatglm_checkpoint(src, cfg, chatglm_tensors(cfg), fmt="safetensors")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_chatglm_checkpoint(src, out)
    assert (out / "mine.txt").read_text() == "user data"
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):  # weights fine, tokenizer absent
        convert_chatglm_checkpoint(src, tmp_path / "o1")
    assert not (tmp_path / "o1").exists() and not list(tmp_path.glob(".o1.partial-*"))
    bad = dict(cfg, apply_residual_connection_post_layernorm=True)
    (src / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="apply_residual_connection_post_layernorm"):
        convert_chatglm_checkpoint(src, tmp_path / "o2", tokenizer=False)
    (src / "config.json").write_text(json.dumps(dict(cfg, add_qkv_bias=False)))
    with pytest.raises(ValueError, match="add_qkv_bias false"):
        convert_chatglm_checkpoint(src, tmp_path / "o5", tokenizer=False)
    (src / "config.json").write_text(json.dumps(dict(cfg, num_layers=1)))
    with pytest.raises(ValueError, match="layers.1.*no GlmForCausalLM counterpart"):
        convert_chatglm_checkpoint(src, tmp_path / "o3", tokenizer=False)
    (src / "config.json").write_text(json.dumps(dict(cfg, num_layers=3)))
    with pytest.raises(ValueError, match="tensors missing.*layers.2"):
        convert_chatglm_checkpoint(src, tmp_path / "o4", tokenizer=False)


def test_glm4_original_format_converts_with_its_rope_and_ids(tmp_path):
    """GLM-4-9B-chat's original layout: same tensors, rope_ratio 500, eos list, tiktoken tokenizer.model."""
    cfg = dict(chatglm_config(rope_ratio=500.0, eps=1.5625e-07, seq_length=131072), eos_token_id=[5, 6, 7],
               pad_token_id=5, torch_dtype="bfloat16")
    src = tmp_path / "glm4"
    sd = write_chatglm_checkpoint(src, cfg, chatglm_tensors(cfg, dtype=torch.bfloat16), fmt="safetensors")
    (src / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n")  # tiktoken ranks, not SentencePiece
    with pytest.raises(ValueError, match="tiktoken"):
        convert_chatglm_checkpoint(src, tmp_path / "o")
    info = convert_chatglm_checkpoint(src, tmp_path / "o", tokenizer=False)
    conf = json.loads((tmp_path / "o" / "config.json").read_text())
    assert info["dtype"] == "bfloat16" and conf["rope_parameters"]["rope_theta"] == 5e6
    assert (conf["eos_token_id"], conf["pad_token_id"], conf["rms_norm_eps"]) == ([5, 6, 7], 5, 1.5625e-07)
    from transformers import GlmForCausalLM

    model = GlmForCausalLM.from_pretrained(str(tmp_path / "o"), dtype=torch.float32).eval()
    ids, mask = _batch(cfg["padded_vocab_size"], seed=5)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    want = chatglm_reference_logits(cfg, sd, ids, mask)
    assert (got[mask.bool()] - want[mask.bool()]).abs().max().item() < 1e-5


def test_cli_help_and_run(tmp_path, sp_model):
    cfg = chatglm_config(layers=1)
    src = tmp_path / "src"
    write_chatglm_checkpoint(src, cfg, chatglm_tensors(cfg), fmt="bin", n_shards=1)
    (src / "tokenizer.model").write_bytes(sp_model.read_bytes())
    job = str(ROOT / "jobs" / "convert_checkpoint.py")
    helped = subprocess.run([sys.executable, job, "--help"], capture_output=True, text=True, check=True)
    assert "--from {chatglm}" in helped.stdout and "llm.trust_remote_code=false" in helped.stdout
    ran = subprocess.run([sys.executable, job, "--from", "chatglm", "--src", str(src), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    info = json.loads(ran.stdout.strip().splitlines()[-1])
    assert info["shards"] == ["model.safetensors"] and info["tokenizer"] == "chatglm3-sentencepiece"
    again = subprocess.run([sys.executable, job, "--from", "chatglm", "--src", str(src), "--out",
                            str(tmp_path / "o")], capture_output=True, text=True)
    assert again.returncode == 1 and "not empty" in again.stderr
