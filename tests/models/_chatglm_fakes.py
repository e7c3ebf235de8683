"""Synthetic checkpoints in the exact ChatGLM3 (THUDM remote-code) layout, at any width, and a small SentencePiece.

Tensor names, shapes and dtypes follow the released ``chatglm3-6b`` folder: ``transformer.embedding.word_embeddings``
``[padded_vocab, H]``, per layer ``input_layernorm``, ``self_attention.query_key_value.{weight,bias}`` with rows
``[q | k | v]`` (multi-query groups), ``self_attention.dense``, ``post_attention_layernorm``,
``mlp.dense_h_to_4h`` ``[2F, H]``, ``mlp.dense_4h_to_h``; ``encoder.final_layernorm``, ``output_layer``,
``rotary_pos_emb.inv_freq``; fp16 on disk; sharded ``pytorch_model-0000i-of-0000n.bin`` or
``model-0000i-of-0000n.safetensors`` with their ``*.index.json``. Used by the tests and by
``benchmarks/convert_memory.py`` (tensors are generated one at a time so a 6B-wide file needs little memory).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import torch


def chatglm_config(layers: int = 2, hidden: int = 64, heads: int = 4, groups: int = 2, kv_channels: int = 16,
                   ffn: int = 96, padded_vocab: int = 640, rope_ratio: float | None = None, mqa: bool = True,
                   eps: float = 1e-5, seq_length: int = 8192) -> dict:
    """A ``config.json`` with ChatGLM3-6B's keys (its values at the default ChatGLM3 switches)."""
    cfg = {
        "_name_or_path": "THUDM/chatglm3-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": ffn,
        "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": hidden, "kv_channels": kv_channels,
        "layernorm_epsilon": eps, "multi_query_attention": mqa, "multi_query_group_num": groups,
        "num_attention_heads": heads, "num_layers": layers, "original_rope": True, "padded_vocab_size": padded_vocab,
        "post_layer_norm": True, "rmsnorm": True, "seq_length": seq_length, "use_cache": True,
        "torch_dtype": "float16", "transformers_version": "4.30.2", "tie_word_embeddings": False,
        "eos_token_id": 2, "pad_token_id": 0,
    }
    if rope_ratio is not None:
        cfg["rope_ratio"] = rope_ratio
    return cfg


def chatglm_tensors(cfg: dict, seed: int = 0, dtype=torch.float16, std: float = 0.15,
                    tied: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights in ChatGLM3 order, one tensor at a time (norm weights near 1, biases non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    h, f, v = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    hd, nh = cfg["kv_channels"], cfg["num_attention_heads"]
    g = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else nh
    qkv = nh * hd + 2 * g * hd

    def rnd(*shape, scale=std, base=0.0):
        return (base + scale * torch.randn(*shape, generator=gen)).to(dtype)

    yield "transformer.embedding.word_embeddings.weight", rnd(v, h, scale=0.2)
    yield "transformer.rotary_pos_emb.inv_freq", (1.0 / (10000 ** (torch.arange(0, hd // 2, 2).float() / (hd // 2)))).to(dtype)
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        yield p + "input_layernorm.weight", rnd(h, scale=0.1, base=1.0)
        yield p + "self_attention.query_key_value.weight", rnd(qkv, h)
        yield p + "self_attention.query_key_value.bias", rnd(qkv, scale=0.1)
        yield p + "self_attention.dense.weight", rnd(h, nh * hd)
        yield p + "post_attention_layernorm.weight", rnd(h, scale=0.1, base=1.0)
        yield p + "mlp.dense_h_to_4h.weight", rnd(2 * f, h)
        yield p + "mlp.dense_4h_to_h.weight", rnd(h, f)
    yield "transformer.encoder.final_layernorm.weight", rnd(h, scale=0.1, base=1.0)
    if not tied:
        yield "transformer.output_layer.weight", rnd(v, h)


def write_chatglm_checkpoint(folder: str | Path, cfg: dict, tensors, fmt: str = "bin", n_shards: int = 2,
                             shard_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Write ``config.json`` + sharded weights + index the way the ChatGLM3 release lays them out.

    Args:
        folder: target folder (created).
        cfg: from ``chatglm_config``.
        tensors: iterable of ``(name, tensor)`` (e.g. ``chatglm_tensors(cfg)``), consumed once.
        fmt: ``bin`` (``pytorch_model-*.bin``) or ``safetensors`` (``model-*.safetensors``).
        n_shards: shards when ``shard_bytes`` is None (tensors dealt round-robin over layers' order).
        shard_bytes: cut a new shard after this many bytes instead (large checkpoints; keeps memory bounded).

    Returns:
        ``{name: tensor}`` of what was written when ``shard_bytes`` is None, else an empty dict.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    keep = shard_bytes is None
    items = list(tensors) if keep else None
    shards: list[dict[str, torch.Tensor]] = []
    if keep:
        per = -(-len(items) // n_shards)
        shards = [dict(items[i:i + per]) for i in range(0, len(items), per)]
    pending, size, written = {}, 0, []

    def dump(part: dict[str, torch.Tensor], idx: int) -> str:
        name = f"{'pytorch_model' if fmt == 'bin' else 'model'}-{idx:05d}-of-NNNNN.{fmt}"
        if fmt == "bin":
            torch.save(part, folder / name)
        else:
            save_file(part, str(folder / name), metadata={"format": "pt"})
        written.append((name, list(part), sum(t.numel() * t.element_size() for t in part.values())))
        return name

    if keep:
        for i, part in enumerate(shards, 1):
            dump(part, i)
    else:
        for name, t in tensors:
            if pending and size + t.numel() * t.element_size() > shard_bytes:
                dump(pending, len(written) + 1)
                pending, size = {}, 0
            pending[name] = t
            size += t.numel() * t.element_size()
        if pending:
            dump(pending, len(written) + 1)
    n = len(written)
    weight_map, total = {}, 0
    for tmp, names, nbytes in written:
        final = tmp.replace("NNNNN", f"{n:05d}")
        (folder / tmp).rename(folder / final)
        weight_map.update({k: final for k in names})
        total += nbytes
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return dict(items) if keep else {}


def train_sentencepiece(path: str | Path, lines: list[str], vocab_size: int = 600, chatglm_like: bool = True) -> Path:
    """Train a small SentencePiece BPE model with byte fallback (ChatGLM3's model type) and save it at ``path``.

    ``chatglm_like`` keeps whitespace as is (``identity`` normalization, no extra-whitespace removal) with the dummy
    prefix; False uses SentencePiece's defaults (``nmt_nfkc``, whitespace collapsing) to exercise those paths.
    """
    import sentencepiece as spm

    extra = dict(normalization_rule_name="identity", remove_extra_whitespaces=False) if chatglm_like else {}
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
                                   vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
                                   num_threads=1, minloglevel=2, add_dummy_prefix=True, **extra)
    path = Path(path)
    path.write_bytes(buf.getvalue())
    return path
