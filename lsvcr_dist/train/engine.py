"""DeepSpeed engine setup for the alignment stage: the derived JSON config, AdamW, LR schedule, ``initialize``.

``build_ds_config`` is the single source of truth for batch arithmetic and precision: the loop never edits the
dict afterwards. The optimizer (torch AdamW over trainable parameters only) and the LambdaLR schedule are built
here and passed into ``deepspeed.initialize`` so the checkpoint holds their state too.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lsvcr_dist.config import AlignStageConfig, OptimConfig

# steps_per_print is a DeepSpeed logging cadence; our own metrics.jsonl replaces it, so push it out of reach.
_NO_PRINT = 1_000_000_000


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> ``bf16`` on GPU and ``fp32`` on CPU; ``bf16`` / ``fp32`` unchanged (the config refuses others).

    Args:
        precision: ``DeepSpeedConfig.precision``.
        device: ``cuda`` or ``cpu`` (a ``cuda:N`` string counts as GPU).
    """
    if precision == "auto":
        return "bf16" if str(device).startswith("cuda") else "fp32"
    return precision


def build_ds_config(cfg: AlignStageConfig, world_size: int, device: str = "cpu") -> dict[str, Any]:
    """Derive the DeepSpeed config of one run.

    ``gradient_accumulation_steps = global_batch / (micro_batch * world_size)``, so the optimizer always sees
    ``global_batch`` samples per step whatever the worker count.

    Args:
        cfg: the alignment stage config (``deepspeed``, ``optim``, ``global_batch``), validated when built.
        world_size: number of data-parallel workers actually running (may differ from ``scaling.num_workers``
            in tests that build an engine by hand).
        device: ``cpu`` or ``cuda``; picks the precision for ``auto``.

    Returns:
        A plain dict for ``deepspeed.initialize(config=...)``.

    Raises:
        ConfigError: the global batch or the hpZ group does not split over ``world_size``
            (``AlignStageConfig.grad_accum_steps``).
    """
    ds = cfg.deepspeed
    accum = cfg.grad_accum_steps(world_size)
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "allgather_partitions": True,
    }
    if ds.zero_stage == 3:
        # The adapter/SR writer gathers explicitly; this makes engine.save_16bit_model usable too.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if ds.hpz_partition_size > 1:
            zero["zero_hpz_partition_size"] = ds.hpz_partition_size
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": str(device).startswith("cuda")}
    return {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": ds.micro_batch,
        "gradient_accumulation_steps": accum,
        "zero_optimization": zero,
        "bf16": {"enabled": resolve_precision(ds.precision, device) == "bf16"},
        "fp16": {"enabled": False},
        "gradient_clipping": float(cfg.optim.grad_clip),
        # We pass torch AdamW (works under every stage); DeepSpeed otherwise insists on its fused optimizers.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _NO_PRINT,
        "wall_clock_breakdown": False,
        "flops_profiler": {"enabled": False},
    }


def lr_factor(step: int, total_steps: int, warmup_ratio: float, schedule: str) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warm-up, then decay.

    Args:
        step: optimizer steps taken so far.
        total_steps: planned optimizer steps (``max_steps``).
        warmup_ratio: fraction of ``total_steps`` spent warming up (``ceil``).
        schedule: ``linear`` (to 0 at ``total_steps``), ``cosine`` (to 0) or ``constant`` (``OptimConfig.schedule``).

    Returns:
        A factor in ``[0, 1]``.
    """
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_adamw(params: Iterable[nn.Parameter] | Iterable[dict], optim: OptimConfig,
               device: str = "cpu") -> torch.optim.AdamW:
    """torch AdamW from an ``OptimConfig`` with the kernel ``optim.impl`` picks.

    ``auto`` = ``fused`` on CUDA (one kernel for all tensors), ``foreach`` on CPU (the paired A/B in
    ``benchmarks/RESULTS.md`` measured no gain from the CPU fused kernel under ZeRO's flat partitions).

    Args:
        params: trainable parameters (or param groups).
        optim: learning rate, betas, eps, weight decay and kernel.
        device: ``cpu`` or ``cuda``.
    """
    impl = optim.impl if optim.impl != "auto" else ("fused" if str(device).startswith("cuda") else "foreach")
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[impl]
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay, **kernel)


def build_optimizer(model: nn.Module, cfg: AlignStageConfig, device: str = "cpu") -> torch.optim.Optimizer:
    """torch AdamW over the parameters with ``requires_grad`` (LoRA, LLM head, SR model); frozen base excluded.

    Raises:
        ValueError: the model has no trainable parameter.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (was LoRA applied?)")
    return make_adamw(params, cfg.optim, device)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: AlignStageConfig, total_steps: int):
    """LambdaLR implementing ``lr_factor``; DeepSpeed steps it once per optimizer step."""
    o = cfg.optim
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, o.warmup_ratio, o.schedule)
    )


def prepare_cpu_backend() -> None:
    """Make DeepSpeed CPU-ready: ``DS_ACCELERATOR=cpu`` if no GPU and skip the 30 s shm-op JIT build.

    The shm op only speeds up intra-node CPU collectives; gloo works without it (cpu_stack_notes pitfall 1).
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def initialize_engine(model: nn.Module, cfg: AlignStageConfig, world_size: int, device: str, total_steps: int):
    """``deepspeed.initialize`` with the derived config, AdamW and the LR schedule.

    Must run inside an initialized ``torch.distributed`` process group (Ray Train's, or a test's gloo group).

    Args:
        model: the ``AlignModel`` (frozen base + LoRA + SR) on CPU; DeepSpeed moves it to ``device``.
        cfg: alignment config.
        world_size: data-parallel workers.
        device: ``cpu`` or ``cuda``.
        total_steps: optimizer steps planned (for the schedule).

    Returns:
        ``(engine, ds_config)``; the optimizer and scheduler are ``engine.optimizer`` / ``engine.lr_scheduler``.
    """
    prepare_cpu_backend()
    import deepspeed  # after DS_ACCELERATOR is set: the accelerator is chosen at import

    ds_config = build_ds_config(cfg, world_size, device)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    return engine, ds_config
