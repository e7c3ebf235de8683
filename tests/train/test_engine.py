"""Derived DeepSpeed config: batch arithmetic, precision, ZeRO-3 keys, refused combinations; LR schedule values."""

from __future__ import annotations

import pytest
import torch

from lsvcr_dist.config import ConfigError, load_config
from lsvcr_dist.train.engine import build_ds_config, build_optimizer, build_scheduler, lr_factor, make_adamw


def _cfg(*overrides):
    return load_config(None, "align", list(overrides))


def test_accumulation_arithmetic():
    """global 128 = micro 2 * world 8 * accum 8 (the public code's 2 x 8 GPUs x 8)."""
    cfg = _cfg("global_batch=128", "deepspeed.micro_batch=2", "scaling.num_workers=8")
    ds = build_ds_config(cfg, world_size=8)
    assert ds["train_batch_size"] == 128
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 8
    # a different actual world size re-derives accumulation: 128 / (2 * 4) = 16
    assert build_ds_config(cfg, world_size=4)["gradient_accumulation_steps"] == 16


def test_precision_choice():
    cfg = _cfg()
    assert build_ds_config(cfg, 2, "cpu")["bf16"] == {"enabled": False}
    assert build_ds_config(cfg, 2, "cuda")["bf16"] == {"enabled": True}
    assert build_ds_config(cfg, 2, "cuda")["fp16"] == {"enabled": False}
    assert build_ds_config(_cfg("deepspeed.precision=bf16"), 2, "cpu")["bf16"]["enabled"] is True
    assert build_ds_config(_cfg("deepspeed.precision=fp32"), 2, "cuda")["bf16"]["enabled"] is False


def test_stage2_defaults_and_stage3_keys():
    ds2 = build_ds_config(_cfg(), 2)
    z2 = ds2["zero_optimization"]
    assert z2["stage"] == 2 and z2["overlap_comm"] is True
    assert "stage3_gather_16bit_weights_on_model_save" not in z2 and "zero_hpz_partition_size" not in z2
    assert ds2["zero_allow_untested_optimizer"] is True
    assert ds2["gradient_clipping"] == 1.0
    assert ds2["steps_per_print"] >= 10**6 and ds2["flops_profiler"] == {"enabled": False}
    cfg3 = _cfg("deepspeed.zero_stage=3", "deepspeed.hpz_partition_size=4", "scaling.num_workers=8",
                "global_batch=128")
    z3 = build_ds_config(cfg3, 8)["zero_optimization"]
    assert z3["stage"] == 3
    assert z3["stage3_gather_16bit_weights_on_model_save"] is True
    assert z3["zero_hpz_partition_size"] == 4


def test_bad_combinations_raise():
    """The config refuses what it can see when built; the engine checks the world that actually runs, with the
    same rule (``AlignStageConfig.grad_accum_steps``)."""
    cfg = _cfg("global_batch=16", "deepspeed.micro_batch=4", "scaling.num_workers=2")
    with pytest.raises(ConfigError, match=r"global_batch=16 is not divisible .* 4 \* 3"):
        build_ds_config(cfg, world_size=3)
    with pytest.raises(ConfigError, match="world_size must be >= 1"):
        build_ds_config(cfg, world_size=0)
    with pytest.raises(ConfigError, match="'deepspeed.hpz_partition_size' > 1 needs zero_stage=3"):
        _cfg("deepspeed.hpz_partition_size=2")
    with pytest.raises(ConfigError, match="must divide world_size=2"):
        _cfg("deepspeed.zero_stage=3", "deepspeed.hpz_partition_size=4")
    cfg8 = _cfg("deepspeed.zero_stage=3", "deepspeed.hpz_partition_size=4", "scaling.num_workers=8")
    with pytest.raises(ConfigError, match="hpz_partition_size=4 must divide world_size=2"):
        build_ds_config(cfg8, world_size=2)


def test_lr_schedule_values():
    """10 steps, warm-up ceil(0.2*10)=2: factors 1/2, 1, then linear 1 - (s-2)/8."""
    assert lr_factor(0, 10, 0.2, "linear") == pytest.approx(0.5)
    assert lr_factor(1, 10, 0.2, "linear") == pytest.approx(1.0)
    assert lr_factor(2, 10, 0.2, "linear") == pytest.approx(1.0)
    assert lr_factor(6, 10, 0.2, "linear") == pytest.approx(0.5)
    assert lr_factor(6, 10, 0.2, "cosine") == pytest.approx(0.5)  # cos(pi/2) midpoint
    assert lr_factor(4, 10, 0.2, "cosine") == pytest.approx(0.5 * (1 + 0.7071067811865476))
    assert lr_factor(9, 10, 0.0, "constant") == 1.0
    with pytest.raises(ConfigError, match="'optim.schedule' must be one of linear, cosine, constant"):
        _cfg("optim.schedule=step")  # refused at load time, not when the scheduler first runs


def test_optimizer_only_trainable_and_scheduler():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].weight.requires_grad_(False)
    cfg = _cfg("optim.lr=0.1", "optim.warmup_ratio=0.5", "optim.schedule=linear")
    opt = build_optimizer(model, cfg)
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == 3  # bias of layer 0 + weight and bias of layer 1
    sched = build_scheduler(opt, cfg, total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.05])
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, cfg)


@pytest.mark.parametrize("impl", ["fused", "foreach", "for_loop"])
def test_adamw_kernels_take_the_same_step(impl):
    """Every AdamW kernel makes the same update as a by-hand Adam step; auto picks fused on CUDA, foreach on CPU.

    One step from zero state with lr 0.1, betas (0.9, 0.999), eps 1e-8, weight decay 0.5 on p = [1, -2], g = [0.5, 4]:
    decay p <- p (1 - lr wd) = [0.95, -1.9]; m^ = g, v^ = g^2, so the Adam update is lr * sign(g) (up to eps):
    [0.95 - 0.1, -1.9 - 0.1] = [0.85, -2.0].
    """
    cfg = _cfg("optim.lr=0.1", "optim.weight_decay=0.5", f"optim.impl={impl}")
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = make_adamw([p], cfg.optim, "cpu")
    assert opt.param_groups[0]["fused"] is (True if impl == "fused" else None)
    assert opt.param_groups[0]["foreach"] is {"fused": None, "foreach": True, "for_loop": False}[impl]
    p.grad = torch.tensor([0.5, 4.0])
    opt.step()
    assert p.detach().tolist() == pytest.approx([0.85, -2.0], abs=1e-6)


def test_adamw_auto_and_unknown_impl():
    cfg = _cfg()
    p = torch.nn.Parameter(torch.zeros(2))
    assert make_adamw([p], cfg.optim, "cpu").param_groups[0]["foreach"] is True
    assert make_adamw([p], cfg.optim, "cuda").defaults["fused"] is True  # construction only; no CUDA step here
    with pytest.raises(ConfigError, match="'optim.impl' must be one of auto, fused, foreach, for_loop"):
        _cfg("optim.impl=apex")  # refused at load time
