"""Stage configurations: one typed dataclass per pipeline stage and ``STAGES``, the stage-name table.

Each field is validated once, where it is declared (``__post_init__`` with the rules of ``config_blocks``); the
shared blocks (``llm``, ``lora``, ``sr``, ``loss``, ...) live in ``config_blocks``. Loading presets and overrides is
``config.py``, the one import path for all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lsvcr_dist.config_blocks import (
    CheckpointConfig,
    ComDivConfig,
    ConfigError,
    DeepSpeedConfig,
    IngestConfig,
    LLMConfig,
    LoRAConfig,
    LossConfig,
    OptimConfig,
    ScalingConfig,
    SRConfig,
    at_least,
    check_choices,
    not_empty,
    positive,
    probability,
)


# --------------------------------------------------------------------------------------------------- stages
@dataclass
class GenerateConfig:
    """``jobs/generate_logs.py``: synthetic KuaiShou-like logs."""

    run_dir: str = "runs/tiny"
    """Root of every output; raw logs go under ``run_dir/raw``."""
    seed: int = 2024
    """Generator seed (same seed, same bytes)."""
    num_users: int = 200
    """Users (dense ids 1..num_users); each gets train, validation and test days of interactions."""
    num_videos: int = 400
    """Videos (dense ids 1..num_videos), each with a title drawn from its topic's word list."""
    num_comments: int = 4000
    """Comments (all videos together)."""
    num_video_inter: int = 6000
    """Video interactions (watch/like/collect/share)."""
    num_comment_inter: int = 1500
    """Comment interactions (like/reply), each a record of 1..k comments under one video."""
    num_topics: int = 16
    """Latent interest topics: each video has a primary topic, each user a mix; titles and comments use the topic's
    words, so the logs carry a signal a recommender can learn."""
    days: int = 8
    """Days of logs (the last two become validation and test)."""
    start_date: str = "2023-10-24"
    """First day (UTC)."""
    shard_rows: int = 1_000_000
    """Rows per raw Parquet shard; large tables are written shard by shard."""

    def __post_init__(self) -> None:
        """Refuse sizes the generator cannot honour exactly."""
        at_least(self, 1, "num_users", "num_videos", "num_comments", "num_video_inter", "num_comment_inter",
                 "num_topics", "shard_rows")
        at_least(self, 3, "days")  # a train, a validation and a test day
        if self.num_video_inter < 4 * self.num_users:  # 2 train-day + 1 val-day + 1 test-day interaction per user
            raise ConfigError(f"generate.num_video_inter={self.num_video_inter} < 4 * num_users = "
                              f"{4 * self.num_users} (every user needs train, val and test days)")
        if self.num_videos < self.num_topics:
            raise ConfigError(f"generate.num_videos={self.num_videos} < num_topics={self.num_topics}")


@dataclass
class PrepareConfig:
    """``jobs/prepare_data.py``: split, instances, candidates, shards (on Ray Data)."""

    run_dir: str = "runs/tiny"
    """Root; reads ``raw_dir`` and writes ``run_dir/data``."""
    seed: int = 2024
    """Seed of candidate sampling (fixed, so evaluation is repeatable)."""
    raw_dir: str = ""
    """Raw log folder; empty = ``run_dir/raw``."""
    align_hist_len: int = 20
    """History length used by alignment (Section 4.1.4)."""
    finetune_hist_len: int = 50
    """History length used by fine-tune and evaluation (Section 4.1.4)."""
    max_comments_per_record: int = 4
    """Comments kept per comment-interaction record (K)."""
    popular_comments: int = 10
    """Popular comments kept per video (top-3 feed prompts; top-10 feed ComDiv virtual comments)."""
    num_video_candidates: int = 100
    """Video candidates per evaluation instance: target + 99 sampled (4.1.3)."""
    num_comment_candidates: int = 100
    """Comment candidates per evaluation instance (4.1.3)."""
    comment_pad: Literal["negatives", "mask"] = "negatives"
    """Fewer comments than candidates: ``negatives`` pads with sampled comments of other videos, ``mask`` keeps all
    and masks the rest (the paper)."""
    train_comment_negatives: int = 19
    """In-video negatives per comment-task training instance (public code: 19)."""
    val_days: int = 1
    """Days before the test days used for validation."""
    test_days: int = 1
    """Last days used for test."""
    shard_rows: int = 2000
    """Rows per output shard."""
    formats: list[Literal["parquet", "webdataset"]] = field(default_factory=lambda: ["parquet", "webdataset"])
    """Output formats written side by side."""
    num_partitions: int = 0
    """Ray tasks that build the wide instance rows (equal runs of the shard order); 0 = one per 4096 rows."""
    unseen_user_frac: float = 0.0
    """Users held out of train/val (seeded per user); their test rows are the 4.4.2 unseen-users subset."""

    def __post_init__(self) -> None:
        check_choices(self)
        not_empty(self, "formats")
        at_least(self, 1, "align_hist_len", "finetune_hist_len", "max_comments_per_record", "popular_comments",
                 "num_video_candidates", "num_comment_candidates", "test_days", "shard_rows")
        at_least(self, 0, "train_comment_negatives", "val_days", "num_partitions")
        probability(self, "unseen_user_frac", below_one=True)
        if self.align_hist_len > self.finetune_hist_len:
            raise ConfigError(f"prepare.align_hist_len={self.align_hist_len} must be <= finetune_hist_len="
                              f"{self.finetune_hist_len} (alignment reads a suffix of the fine-tune history)")


@dataclass
class EncodeConfig:
    """``jobs/encode_text.py``: LLM(t) for every title and comment into the embedding store."""

    run_dir: str = "runs/tiny"
    """Root; writes ``run_dir/embeddings/<which>``."""
    seed: int = 2024
    """Seed of the tiny GLM's random weights (the same seed as alignment gives the same base model)."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """Backbone that encodes every text as LLM(t) (Eq. 1-2); must be the one alignment trained."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA shape (must match the adapter loaded for ``aligned``)."""
    sr: SRConfig = field(default_factory=SRConfig)
    """SR shape (its text MLP projects aligned vectors)."""
    which: Literal["base", "aligned"] = "base"
    """``base`` (LLM before alignment, hidden-size vectors) or ``aligned`` (base + aligned LoRA + text MLP)."""
    adapter_dir: str = ""
    """Aligned ``final`` folder (holds ``adapter/`` and ``sr.safetensors``) for ``aligned``; empty =
    ``run_dir/align/final``."""
    batch_size: int = 64
    """Texts per inference batch."""
    num_actors: int = 1
    """Actor-pool size (one GPU each when GPUs exist)."""
    shard_rows: int = 100_000
    """Rows per store shard."""
    dtype: Literal["fp16", "float16"] = "fp16"
    """Stored dtype: the store holds fp16 vectors only."""
    allow_degenerate: bool = False
    """Write a store whose vectors barely differ (``embeddings.judge_stats``) instead of failing."""
    resume: bool = True
    """Continue an interrupted encode of the same texts and settings: shards already completed are kept, not
    recomputed (``embeddings.EmbeddingWriter``); false = start over."""
    progress_every_s: float = 30.0
    """Seconds between progress lines (texts, texts/s, ETA), at most (plus one batch)."""

    def __post_init__(self) -> None:
        check_choices(self)
        at_least(self, 1, "batch_size", "num_actors", "shard_rows")
        positive(self, "progress_every_s")


@dataclass
class AlignStageConfig:
    """``jobs/align.py``: personalized preference alignment (Section 3.3) on Ray Train + DeepSpeed."""

    run_dir: str = "runs/tiny"
    """Root; reads ``run_dir/data``, writes ``run_dir/align``."""
    seed: int = 2024
    """Seed of model init, dropout, ComDiv and randomized positions."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """Backbone of the LLM recommender (frozen; LoRA trains) and, for ``text_source=online``, the text encoder."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Adapters on the backbone: the only LLM weights alignment changes."""
    sr: SRConfig = field(default_factory=SRConfig)
    """SR model trained jointly with the LLM recommender (its weights seed fine-tune)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Weights of L_ALI (Eq. 16) and the Table 4 loss ablations."""
    comdiv: ComDivConfig = field(default_factory=ComDivConfig)
    """Comment diversification of the histories (Section 3.3.1)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW over LoRA, the preference head and the SR model, with its LR schedule over ``max_steps``."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Ray Train workers (data parallel; the contrastive pool is every worker's micro-batch)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """ZeRO stage, precision and micro batch of the DeepSpeed engine."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence, retention, resume and restarts after a worker failure."""
    ingest: IngestConfig = field(default_factory=IngestConfig)
    """How train shards stream into the workers (format, shuffle, prefetch, ComDiv draws)."""
    global_batch: int = 128
    """Samples per optimizer step over all workers (paper: 128)."""
    max_steps: int = 5000
    """Optimizer steps (paper: 5000)."""
    log_every: int = 1
    """Optimizer steps between lines of ``run_dir/align/metrics.jsonl`` (a checkpoint step always logs)."""
    text_source: Literal["online", "store"] = "online"
    """SR text features: ``online`` (LoRA LLM with gradients, the public code) or ``store`` (frozen embedding store)."""
    rand_pos: bool = True
    """Randomized positional encoding (3.1.2); Table 4 'w/o RandPosi' when False."""
    trim_padding: bool = True
    """Cut prompt/text right padding to the micro-batch's longest real length before the step (exact, less work)."""
    contrastive_pool: Literal["micro", "global"] = "micro"
    """Negatives of L_SR / L_SSC: ``micro`` = every worker's current micro-batch (``micro_batch * workers`` rows);
    ``global`` = the whole global batch (all workers x all accumulation micro-steps), exact by gradient caching
    (``train/grad_cache.py``: one extra no-grad forward per sample, memory of one micro-batch)."""
    text_bucket: int = 0
    """Online texts run in length-sorted chunks of at most this many, each cut to its longest (exact; 0 = one batch)."""
    enabled: bool = True
    """Table 4 'w/o Alignment' when False: the stage is skipped and fine-tune starts from scratch."""
    timeout_s: int = 3600
    """Wall-clock limit of the fit; a hung collective fails instead of hanging forever."""

    def __post_init__(self) -> None:
        check_choices(self)
        at_least(self, 1, "global_batch", "max_steps", "log_every", "timeout_s")
        at_least(self, 0, "text_bucket")
        self.grad_accum_steps()

    def grad_accum_steps(self, world_size: int | None = None) -> int:
        """Micro-batches each worker accumulates per optimizer step: ``global_batch / (micro_batch * world_size)``.

        The one home of the batch-split rule: the config checks it for ``scaling.num_workers`` when built, and the
        engine (``train.engine.build_ds_config``) for the world that actually runs.

        Args:
            world_size: data-parallel workers; None = ``scaling.num_workers``.

        Raises:
            ConfigError: ``world_size < 1``, a global batch not divisible by ``micro_batch * world_size``, or a
                ZeRO++ hpZ group size that does not divide ``world_size``.
        """
        world = self.scaling.num_workers if world_size is None else world_size
        ds = self.deepspeed
        if world < 1:
            raise ConfigError(f"world_size must be >= 1, got {world}")
        if self.global_batch % (ds.micro_batch * world):
            raise ConfigError(f"global_batch={self.global_batch} is not divisible by deepspeed.micro_batch *"
                              f" world_size = {ds.micro_batch} * {world}")
        if world % ds.hpz_partition_size:
            raise ConfigError(f"deepspeed.hpz_partition_size={ds.hpz_partition_size} must divide world_size={world}")
        return self.global_batch // (ds.micro_batch * world)


# Metrics ``evaluate.evaluate_model`` reports at its default cut-offs (5, 10); tests keep the two in step.
SelectMetric = Literal["recall@5", "recall@10", "ndcg@5", "ndcg@10", "mrr", "mrr@10"]


@dataclass
class FinetuneStageConfig:
    """``jobs/finetune.py``: recommendation-oriented fine-tuning (Section 3.4), SR model only."""

    run_dir: str = "runs/tiny"
    """Root; reads ``run_dir/align`` and the aligned store, writes ``run_dir/finetune``."""
    seed: int = 2024
    """Seed of model init (same on every worker), the L_REG negatives and the popular-comment draws."""
    sr: SRConfig = field(default_factory=SRConfig)
    """SR model (must match the aligned weights)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Fine-tune reads ``tau``, ``eta`` and ``use_reg``/``reg_negatives`` (L_FT, Eq. 17-19); the alignment weights are
    ignored here."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=1e-5, warmup_ratio=0.0,
                                                                   schedule="constant", grad_clip=0.0))
    """Optimizer (public code: AdamW 1e-3, wd 1e-5, constant)."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Workers (plain DDP: the SR model is small, every worker holds all of it)."""
    ingest: IngestConfig = field(default_factory=IngestConfig)
    """How the task's train rows stream into the workers (format, shuffle, prefetch)."""
    tasks: list[Literal["video", "comment"]] = field(default_factory=lambda: ["video", "comment"])
    """Tasks fine-tuned (one model per task, as the public code)."""
    init: Literal["align", "scratch"] = "align"
    """``align`` loads the aligned SR weights; ``scratch`` is Table 4 'w/o Alignment'."""
    text_mlp: Literal["frozen", "trained"] = "frozen"
    """With ``init=align``: ``frozen`` reads the aligned store, where the aligned text MLP was applied once (public
    code's default 256-d files); ``trained`` reads the base store through the aligned text MLP and keeps training it,
    as the public code does with full-width stored vectors (every dimension stays visible). Scratch trains a new one."""
    use_id: bool = True
    """Video ID embeddings (3.4.1); False for the unseen-video setting (4.4.2)."""
    position_extension: Literal["mean", "random"] = "mean"
    """Rows of P beyond the aligned table: ``mean`` fill (public code) or ``random`` ('w/o RandPosi')."""
    model: Literal["lsvcr", "sasrec", "dssm"] = "lsvcr"
    """``lsvcr`` (the SR model), or a baseline in the same harness: ``sasrec`` (IDs, video), ``dssm`` (comment)."""
    batch_size: int = 512
    """Global batch: each of the ``scaling.num_workers`` workers takes ``batch_size // num_workers`` rows."""
    max_epochs: int = 50
    """Epochs at most; early stopping (``patience``) usually ends sooner."""
    max_steps_per_epoch: int = 0
    """Training steps per epoch at most (0 = the whole train split). A bounded epoch reads the first
    ``max_steps_per_epoch * batch_size`` rows of its stream: the prepared order mixes users, but the windowed shuffle
    permutes rows only inside windows, so every bounded epoch draws from the same leading rows. For scale and smoke
    runs (paper-size data on a CPU box), not for results."""
    patience: int = 5
    """Early stop after this many evaluations without a better validation ``select_metric``."""
    select_metric: SelectMetric = "ndcg@10"
    """Validation metric of early stopping and best-model selection (the public code selects on ``ndcg@5``)."""
    timeout_s: int = 3600
    """Wall-clock limit of the fit."""
    progress_every_s: float = 30.0
    """Seconds between progress lines (step, samples/s, ETA) of a training epoch, at most (plus one step)."""

    def __post_init__(self) -> None:
        check_choices(self)
        not_empty(self, "tasks")
        at_least(self, 1, "max_epochs", "patience", "timeout_s")
        at_least(self, 0, "max_steps_per_epoch")
        positive(self, "progress_every_s")
        if self.batch_size < self.scaling.num_workers:  # each worker takes batch_size // num_workers rows
            raise ConfigError(f"must be >= scaling.num_workers = {self.scaling.num_workers} (a row per worker), got"
                              f" {self.batch_size}", "batch_size")
        if self.model != "lsvcr" and self.init != "scratch":
            raise ConfigError(f"finetune.model={self.model} is a baseline: set finetune.init=scratch (it reads the"
                              " base store)")
        if self.optim.schedule != "constant" or self.optim.warmup_ratio > 0:
            raise ConfigError("finetune.optim: only a constant learning rate without warm-up is implemented (the"
                              f" public code's); got schedule={self.optim.schedule!r}, warmup_ratio="
                              f"{self.optim.warmup_ratio}")


@dataclass
class EvalConfig:
    """``jobs/evaluate.py``: Section 4.1.3 protocol and the 4.4.2 subsets."""

    run_dir: str = "runs/tiny"
    """Root; reads ``run_dir/finetune`` and writes ``run_dir/eval``."""
    seed: int = 2024
    """Unused by evaluation itself (candidate sets are fixed at preparation); kept so one preset serves all stages."""
    sr: SRConfig = field(default_factory=SRConfig)
    """SR shape (the fine-tuned models record their own; this block is shared with the other stages)."""
    ks: list[int] = field(default_factory=lambda: [5, 10])
    """Cut-offs of Recall@K and NDCG@K."""
    full_ranking: bool = True
    """Also rank the target against every video."""
    batch_size: int = 256
    """Test rows scored per forward pass."""
    progress_every_s: float = 30.0
    """Seconds between progress lines (rows scored, rows/s, ETA) of each evaluation pass, at most."""

    def __post_init__(self) -> None:
        not_empty(self, "ks")
        at_least(self, 1, "batch_size")
        positive(self, "progress_every_s")
        if min(self.ks) < 1:
            raise ConfigError(f"must be >= 1 each, got {self.ks}", "ks")


STAGES: dict[str, type] = {
    "generate": GenerateConfig,
    "prepare": PrepareConfig,
    "encode": EncodeConfig,
    "align": AlignStageConfig,
    "finetune": FinetuneStageConfig,
    "evaluate": EvalConfig,
}
