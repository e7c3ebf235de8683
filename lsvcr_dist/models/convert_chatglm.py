"""ChatGLM3-6B / GLM-4-9B-chat checkpoints (original remote-code layout) -> native ``GlmForCausalLM`` folders.

ChatGLM2/3 and GLM-4 share one decoder: RMSNorm, SwiGLU, multi-query attention (``multi_query_group_num`` KV
groups) with a qkv bias, rotary embeddings on the first half of each head in interleaved pairs (base
``10000 * rope_ratio``), final RMSNorm, untied output layer. transformers' ``GlmForCausalLM`` is the same network
with other tensor names and a split qkv, so the conversion is a renaming plus two cuts:

=============================================================  ==========================================
ChatGLM (``transformer.`` prefix)                              Glm
=============================================================  ==========================================
``embedding.word_embeddings.weight`` ``[V, H]``                ``model.embed_tokens.weight``
``encoder.layers.N.input_layernorm.weight``                    ``model.layers.N.input_layernorm.weight``
``encoder.layers.N.self_attention.query_key_value.{w,b}``      ``...self_attn.{q,k,v}_proj.{w,b}`` rows
  rows ``[q: n_heads*hd | k: G*hd | v: G*hd]``                   cut in that order (multi-query layout)
``encoder.layers.N.self_attention.dense.weight``               ``...self_attn.o_proj.weight``
``encoder.layers.N.post_attention_layernorm.weight``           ``...post_attention_layernorm.weight``
``encoder.layers.N.mlp.dense_h_to_4h.weight`` ``[2F, H]``      ``...mlp.gate_up_proj.weight`` unchanged:
                                                                 both take ``silu(first half) * second half``
``encoder.layers.N.mlp.dense_4h_to_h.weight``                  ``...mlp.down_proj.weight``
``encoder.final_layernorm.weight``                             ``model.norm.weight``
``output_layer.weight`` ``[V, H]`` (absent = tied)             ``lm_head.weight``
``rotary_pos_emb.inv_freq``                                    dropped (recomputed from the config)
=============================================================  ==========================================

Rotary: ChatGLM's ``RotaryEmbedding(kv_channels // 2)`` rotates the first ``hd/2`` dims of each head as pairs
``(x[2i], x[2i+1])`` with ``theta_i = base^(-2i / (hd/2))``; Glm with ``partial_rotary_factor = 0.5`` builds the
same ``hd/4`` frequencies and rotates the same interleaved pairs (``rotate_half`` on ``0::2`` / ``1::2``), so q and
k rows need no permutation; ``rope_theta = 10000 * rope_ratio`` (ChatGLM3-6B: 1, GLM-4-9B-chat: 500). The vocabulary
keeps the checkpoint's padded rows (``padded_vocab_size``, e.g. 65024 for a 64,798-token tokenizer).

Streaming: each source shard is opened lazily (``safe_open`` for safetensors, ``torch.load(mmap=True,
weights_only=True)`` for ``.bin``), one tensor is read, renamed/cut and handed to a writer that flushes an output
shard whenever ``max_shard_bytes`` is reached, so memory stays near one output shard plus one tensor. The folder is
written under a temporary name beside ``out`` and renamed at the end: a failed run leaves no half folder at ``out``.
No Ray or DeepSpeed import (boundary rule).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_MAP = {
    "input_layernorm.weight": ["input_layernorm.weight"],
    "post_attention_layernorm.weight": ["post_attention_layernorm.weight"],
    "self_attention.dense.weight": ["self_attn.o_proj.weight"],
    "mlp.dense_h_to_4h.weight": ["mlp.gate_up_proj.weight"],
    "mlp.dense_4h_to_h.weight": ["mlp.down_proj.weight"],
    "self_attention.query_key_value.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                              "self_attn.v_proj.weight"],
    "self_attention.query_key_value.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                            "self_attn.v_proj.bias"],
}
_TOP_MAP = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_DROPPED = {"transformer.rotary_pos_emb.inv_freq"}
# ChatGLM config values the Glm architecture has no switch for: (key, required value, default when absent).
_FIXED = [("rmsnorm", True, True), ("post_layer_norm", True, True), ("original_rope", True, True),
          ("apply_residual_connection_post_layernorm", False, False), ("add_bias_linear", False, False),
          ("pre_seq_len", None, None), ("quantization_bit", 0, 0)]


@dataclass(frozen=True)
class ChatGLMShape:
    """Architecture of a ChatGLM-family checkpoint, read from its ``config.json``."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    qkv_bias: bool
    eps: float
    rope_theta: float
    seq_length: int
    multi_query: bool

    def expected_shape(self, glm_name: str) -> tuple[int, ...]:
        """Shape of a converted tensor (layer index stripped)."""
        h, q, kv = self.hidden, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        table = {"embed_tokens.weight": (self.vocab, h), "lm_head.weight": (self.vocab, h), "norm.weight": (h,),
                 "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                 "q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h),
                 "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj.weight": (h, q),
                 "gate_up_proj.weight": (2 * self.ffn, h), "down_proj.weight": (h, self.ffn)}
        return table[".".join(glm_name.split(".")[-2:])]


def read_chatglm_config(src: str | Path) -> dict:
    """``config.json`` of a ChatGLM-family folder, checked to be an architecture ``GlmForCausalLM`` can hold.

    Raises:
        FileNotFoundError: no config.json; ValueError: not a ChatGLM config or an unsupported switch (key named).
    """
    path = Path(src) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --src must be a ChatGLM3 / GLM-4 checkpoint folder")
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") != "chatglm":
        raise ValueError(f"{path}: model_type is {cfg.get('model_type')!r}, expected 'chatglm' (ChatGLM2/3, GLM-4 "
                         "original format); a model_type 'glm' folder is already native")
    missing = [k for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                           "padded_vocab_size", "layernorm_epsilon") if k not in cfg]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    for key, want, default in _FIXED:
        if cfg.get(key, default) != want:
            raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported by GlmForCausalLM (needs {want!r})")
    return cfg


def shape_from_config(cfg: dict) -> ChatGLMShape:
    """``ChatGLMShape`` of a config read by ``read_chatglm_config``."""
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("kv_channels") or cfg["hidden_size"] // heads)
    mq = bool(cfg.get("multi_query_attention", False))
    kv = int(cfg.get("multi_query_group_num", 1)) if mq else heads
    if heads % kv or head_dim % 4:
        raise ValueError(f"config.json: {heads} heads / {kv} KV groups / kv_channels {head_dim} do not divide "
                         "(rotary needs kv_channels divisible by 4)")
    return ChatGLMShape(n_layers=int(cfg["num_layers"]), hidden=int(cfg["hidden_size"]), n_heads=heads,
                        n_kv_heads=kv, head_dim=head_dim, ffn=int(cfg["ffn_hidden_size"]),
                        vocab=int(cfg["padded_vocab_size"]),
                        qkv_bias=bool(cfg.get("add_qkv_bias", False)),
                        eps=float(cfg["layernorm_epsilon"]), rope_theta=10000.0 * float(cfg.get("rope_ratio", 1)),
                        seq_length=int(cfg.get("seq_length", 2048)), multi_query=mq)


def glm_config(shape: ChatGLMShape, cfg: dict, tied: bool, dtype: torch.dtype):
    """The ``GlmConfig`` of the converted model (special ids from the ChatGLM config: pad 0, eos 2 if absent)."""
    from transformers import GlmConfig

    kwargs = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                  num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
                  num_key_value_heads=shape.n_kv_heads, head_dim=shape.head_dim, hidden_act="silu",
                  attention_dropout=float(cfg.get("attention_dropout", 0.0)),
                  max_position_embeddings=shape.seq_length, rms_norm_eps=shape.eps, tie_word_embeddings=tied,
                  attention_bias=shape.qkv_bias, pad_token_id=int(cfg.get("pad_token_id", 0)),
                  eos_token_id=cfg.get("eos_token_id", 2), bos_token_id=None, use_cache=True)
    if "rope_parameters" in inspect.signature(GlmConfig.__init__).parameters:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": shape.rope_theta,
                                     "partial_rotary_factor": 0.5}
    else:  # transformers 4.x spelling
        kwargs.update(rope_theta=shape.rope_theta, partial_rotary_factor=0.5)
    conf = GlmConfig(**kwargs)
    conf.architectures = ["GlmForCausalLM"]
    conf.dtype = str(dtype).replace("torch.", "")
    return conf


def source_files(src: str | Path) -> dict[str, list[str]]:
    """``{shard file: [tensor names]}`` of a checkpoint folder (safetensors preferred over ``.bin``).

    Raises:
        FileNotFoundError: no weights, or a shard the index names is missing (both named).
    """
    src = Path(src)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = src / index_name
        if index.is_file():
            files: dict[str, list[str]] = {}
            for name, fname in json.loads(index.read_text())["weight_map"].items():
                files.setdefault(fname, []).append(name)
            absent = [f for f in files if not (src / f).is_file()]
            if absent:
                raise FileNotFoundError(f"{index} names shards that are not in {src}: {absent}")
            return dict(sorted(files.items()))
        if (src / single).is_file():
            return {single: list(_open_shard(src / single))}
    raise FileNotFoundError(f"{src} holds no model.safetensors[.index.json] nor pytorch_model.bin[.index.json]")


def _open_shard(path: Path) -> dict:
    """A lazy ``{name: loader}`` view of one shard: nothing is read until a loader is called."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        handle = safe_open(str(path), framework="pt")
        return {k: (lambda k=k: handle.get_tensor(k)) for k in handle.keys()}
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    return {k: (lambda k=k: state[k]) for k in state}


def map_tensor(name: str, tensor: torch.Tensor, shape: ChatGLMShape) -> list[tuple[str, torch.Tensor]]:
    """Glm ``(name, tensor)`` pairs of one ChatGLM tensor (empty for dropped buffers).

    Raises:
        ValueError: an unknown tensor name (e.g. a P-tuning prefix encoder or quantized weights) or a wrong shape.
    """
    if name in _DROPPED:
        return []
    if name in _TOP_MAP:
        out = [(_TOP_MAP[name], tensor)]
    else:
        m = _LAYER.match(name)
        if not m or m.group(2) not in _LAYER_MAP or int(m.group(1)) >= shape.n_layers:
            raise ValueError(f"tensor {name!r} has no GlmForCausalLM counterpart (config: {shape.n_layers} layers)")
        if m.group(2).endswith(".bias") and not shape.qkv_bias:
            raise ValueError(f"tensor {name!r} is a qkv bias but config.json has add_qkv_bias false")
        targets = [f"model.layers.{m.group(1)}.{t}" for t in _LAYER_MAP[m.group(2)]]
        if len(targets) == 1:
            out = [(targets[0], tensor)]
        else:
            q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
            if tensor.shape[0] != q + 2 * kv:
                raise ValueError(f"{name}: {tuple(tensor.shape)}, expected {q + 2 * kv} rows (q {q} + k/v {kv})")
            if shape.multi_query:
                parts = torch.split(tensor, [q, kv, kv], dim=0)
            else:  # classic layout: per head [q_h | k_h | v_h]
                per_head = tensor.reshape(shape.n_heads, 3, shape.head_dim, *tensor.shape[1:])
                parts = [per_head[:, j].reshape(q, *tensor.shape[1:]) for j in range(3)]
            out = list(zip(targets, parts))
    for glm_name, t in out:
        want = shape.expected_shape(glm_name)
        if tuple(t.shape) != want:
            raise ValueError(f"{name}: converted {glm_name} has shape {tuple(t.shape)}, config says {want}")
    return out


def expected_names(shape: ChatGLMShape, tied: bool) -> set[str]:
    """Every tensor name of the converted model."""
    names = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
    for i in range(shape.n_layers):
        for targets in _LAYER_MAP.values():
            names |= {f"model.layers.{i}.{t}" for t in targets if shape.qkv_bias or not t.endswith("bias")}
    return names


class ShardWriter:
    """Collects tensors and writes a safetensors shard whenever ``max_bytes`` would be exceeded."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, int(max_bytes)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        fname = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.folder / fname), metadata={"format": "pt"})
        self.files.append((fname, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Flush, give shards their transformers names and write the index; returns the file names."""
        self.flush()
        n = len(self.files)
        final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp, names), name in zip(self.files, final):
            os.replace(self.folder / tmp, self.folder / name)
            weight_map.update({k: name for k in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return final


def _convert_into(src: Path, tmp: Path, dtype_name: str, max_shard_bytes: int, tokenizer: bool) -> dict:
    cfg = read_chatglm_config(src)
    shape = shape_from_config(cfg)
    files = source_files(src)
    all_names = {n for names in files.values() for n in names}
    tied = "transformer.output_layer.weight" not in all_names
    writer, written, src_dtype = ShardWriter(tmp, max_shard_bytes), set(), None
    for fname, names in files.items():
        lazy = _open_shard(src / fname)
        absent = [n for n in names if n not in lazy]
        if absent:
            raise ValueError(f"{src / fname} lacks tensors its index assigns to it: {absent[:5]}")
        for name in names:
            tensor = lazy[name]()
            if tensor.is_floating_point() and name not in _DROPPED:
                src_dtype = src_dtype or tensor.dtype
            dtype = src_dtype if dtype_name == "keep" else DTYPES[dtype_name]
            for glm_name, t in map_tensor(name, tensor, shape):
                if glm_name in written:
                    raise ValueError(f"{glm_name} is produced twice (duplicate tensor {name} in {src})")
                # A private copy: a view would pin the whole source tensor (or its memory map) until the flush.
                writer.add(glm_name, t.to(dtype) if t.dtype != dtype else t.clone())
                written.add(glm_name)
        del lazy
    missing = sorted(expected_names(shape, tied) - written)
    if missing:
        raise ValueError(f"{src}: tensors missing for {len(missing)} converted names, e.g. {missing[:5]}")
    out_dtype = src_dtype if dtype_name == "keep" else DTYPES[dtype_name]
    shards = writer.finish()
    glm_config(shape, cfg, tied, out_dtype).save_pretrained(str(tmp))
    summary = {"source": str(src), "tensors": len(written), "shards": shards, "bytes": writer.total_bytes,
               "dtype": str(out_dtype).replace("torch.", ""), "tied": tied, "rope_theta": shape.rope_theta,
               "layers": shape.n_layers, "vocab": shape.vocab, "tokenizer": None}
    if tokenizer:
        summary["tokenizer"] = _convert_tokenizer(src, tmp, shape)
    (tmp / "conversion.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _convert_tokenizer(src: Path, out: Path, shape: ChatGLMShape) -> str:
    from lsvcr_dist.models.chatglm_tokenizer import convert_chatglm3_tokenizer, load_sp_proto

    model_file = src / "tokenizer.model"
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file} does not exist: pass --no-tokenizer to convert the weights only")
    try:
        n_pieces = len(load_sp_proto(model_file).pieces)
    except ValueError as exc:
        raise ValueError(f"{exc}. GLM-4's tiktoken tokenizer.model is not converted here: pass --no-tokenizer and "
                         "use the tokenizer of the native glm-4-9b-chat-hf release (llm.tokenizer_path)") from exc
    if n_pieces + 9 > shape.vocab:
        raise ValueError(f"{model_file}: {n_pieces} pieces + 9 specials exceed the model's {shape.vocab} rows")
    convert_chatglm3_tokenizer(model_file, out, model_max_length=shape.seq_length)
    return "chatglm3-sentencepiece"


def convert_chatglm_checkpoint(src: str | Path, out: str | Path, dtype: str = "keep",
                               max_shard_bytes: int = 2 << 30, tokenizer: bool = True) -> dict:
    """Convert a ChatGLM3 / GLM-4 (original format) folder into a native ``GlmForCausalLM`` folder at ``out``.

    Args:
        src: folder with ``config.json`` (``model_type: chatglm``), weights (safetensors or ``.bin``, sharded with
            an index or single) and, for ChatGLM3, ``tokenizer.model``.
        out: new folder; must not exist (or be empty). Written beside it under a temporary name, then renamed.
        dtype: ``keep`` (the checkpoint's), ``bf16``, ``fp16`` or ``fp32``.
        max_shard_bytes: output shard size (also bounds the converter's memory).
        tokenizer: convert ChatGLM3's SentencePiece tokenizer too.

    Returns:
        Summary dict (also written to ``out/conversion.json``).

    Raises:
        FileExistsError: ``out`` exists and is not empty; ValueError / FileNotFoundError: see the helpers.
    """
    src, out = Path(src).resolve(), Path(out).resolve()
    if dtype != "keep" and dtype not in DTYPES:
        raise ValueError(f"dtype must be keep, {', '.join(DTYPES)}; got {dtype!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty: choose a new --out folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        summary = _convert_into(src, tmp, dtype, max_shard_bytes, tokenizer)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["out"] = str(out)
    return summary
