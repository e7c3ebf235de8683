"""Timed alignment-step workers of ``benchmarks/align_throughput.py``: ours vs the public code's recipe.

Both workers build the real alignment model and engine with the library's own builders (``build_align_model``,
``initialize_engine``, ``align_step.to_tensors`` / ``text_inputs`` / ``trim_prompts`` / ``trim_text``,
``losses.AlignmentLoss``) and time one micro-step section by section (``timed_micro_step``), so the breakdown (data
wait, text tokenization, forward, all-gather, loss, backward, optimizer) is explicit instead of hidden in
``align_step.micro_step``.

* ``ray_bench_worker``: Ray Train worker. Batches stream from the Ray Data shard (``get_dataset_shard``), the
  contrastive pool is all-gathered across workers, prompts and texts are trimmed to the longest real length of the
  micro-batch, logits only at target positions (``LLMRecommender``).
* ``reference_bench_worker``: the public code's way, a ``torch.multiprocessing`` spawn entry (one gloo/nccl process
  group, as the DeepSpeed launcher would): pre-transformed batches from a plain in-memory list, negatives local to
  each worker (no all-gather), prompts padded to the maximum, full-vocabulary logits at every position
  (``full_vocab_forward``), ZeRO-2.

Timing: ``time.perf_counter``; on CUDA each section boundary calls ``torch.cuda.synchronize`` (a small cost that is
the price of an honest breakdown). FLOPs are MODEL FLOPs of the real tokens (``lsvcr_dist.flops``) for both recipes,
so padding and full-vocabulary logits show up as lower MFU, not as extra FLOPs.
"""

from __future__ import annotations

import json
import os
import resource
import time
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lsvcr_dist.config import AlignStageConfig
from lsvcr_dist.flops import LLMShape, StepCounts, align_step_flops, cpu_matmul_probe, mfu, peak_flops_for_device
from lsvcr_dist.losses import AlignmentLoss
from lsvcr_dist.models.align_model import TextInputs
from lsvcr_dist.train import distributed

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

SECTIONS = ("data_wait", "text_tokenize", "forward", "rank_skew", "all_gather", "loss", "backward", "optimizer")


# ------------------------------------------------------------------------------------------------ reference recipe
def full_vocab_forward(self: nn.Module, prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor,
                       prompt_labels: torch.Tensor, prompt_last_index: torch.Tensor,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``LLMRecommender.forward`` computed the public code's way: fp32 logits ``[B, T, V]`` at EVERY position.

    Same loss and ``s~`` as the trimmed version (up to float rounding); bound onto a recommender instance with
    ``types.MethodType`` by the reference worker only.
    """
    h = self.hidden_states(prompt_input_ids, prompt_attention_mask)  # [B, T, H]
    b = torch.arange(h.shape[0], device=h.device)
    s_tilde = self.pref_head(h[b, prompt_last_index.long()].to(self.pref_head.weight.dtype))
    logits = self._lm_head()(h).float()  # [B, T, V]: the waste the public code pays
    shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), prompt_labels[:, 1:].reshape(-1)
    n_tok = (shift_labels != -100).sum()
    loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    loss = loss_sum / n_tok.clamp(min=1).to(loss_sum.dtype) if self.lm_reduction == "mean" else loss_sum
    return loss, s_tilde, n_tok


# ------------------------------------------------------------------------------------------------ timing
class SectionTimer:
    """Accumulates wall seconds per named section; synchronizes CUDA at every boundary when ``cuda``."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.total = {k: 0.0 for k in SECTIONS}
        self._t = 0.0

    def start(self) -> None:
        """Open the first section of a micro-step."""
        if self.cuda:
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        """Close the running section as ``name`` and open the next one."""
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.total[name] += now - self._t
        self._t = now


def batch_counts(batch: dict, text: TextInputs, n_target_tokens: int, logit_positions: int | None = None) -> StepCounts:
    """Real-token counts of one micro-batch (``flops.StepCounts``)."""
    lens = batch["prompt_attention_mask"].sum(1).tolist()
    tl = text.attention_mask.sum(1).tolist() if text.attention_mask is not None else []
    b, lh = batch["video_hist"].shape
    k = batch["comment_hist_comments"].shape[-1]
    return StepCounts(samples=b, prompt_lengths=lens, text_lengths=tl, target_tokens=int(n_target_tokens),
                      logit_positions=logit_positions, sr_positions=b * (lh * (3 + k) + 2))


def timed_micro_step(engine: DeepSpeedEngine, loss_fn: AlignmentLoss, batch: dict, text: TextInputs, rand_pos: bool,
                     timer: SectionTimer, gather: bool = True) -> dict:
    """One micro-step (forward, pool, L_ALI, backward, step) with a lap per section.

    Args:
        engine: DeepSpeed engine of an ``AlignModel``.
        loss_fn: ``losses.AlignmentLoss``.
        batch: tensors of ``align_step.BATCH_KEYS``.
        text: ``TextInputs`` of the micro-batch.
        rand_pos: randomized positions.
        timer: the running ``SectionTimer`` (already started; data wait and tokenization lapped by the caller).
        gather: all-gather ``s``, ``s~``, ``e`` and target ids across workers (ours) or keep them local (reference).

    Returns:
        ``{"loss": float, "n_target_tokens": int}``.
    """
    from lsvcr_dist.train.distributed import all_gather, all_gather_with_grad, rank_offsets

    out = engine(batch, text, rand_pos)
    timer.lap("forward")
    b = out["s"].shape[0]
    keys = batch["target_text_id"]
    if gather:
        # A barrier first splits "waiting for the slowest rank" (rank_skew, which no overlap can hide) from the
        # transfer itself (all_gather): the number that says whether overlapping the gather with compute pays.
        torch.distributed.barrier()
        timer.lap("rank_skew")
        pos = rank_offsets(b, device=out["s"].device)
        e_all, s_all = all_gather_with_grad(out["e"]), all_gather_with_grad(out["s"])
        st_all, keys_all = all_gather_with_grad(out["s_tilde"]), all_gather(keys)
    else:
        pos = torch.arange(b, device=out["s"].device)
        e_all, s_all, st_all, keys_all = out["e"], out["s"], out["s_tilde"], keys
    timer.lap("all_gather")
    loss, _ = loss_fn(loss_lm=out["loss_lm"], s=out["s"], s_cross=out["s_cross"], s_tilde=out["s_tilde"],
                      e_all=e_all, s_all=s_all, s_tilde_all=st_all, pos_index=pos, keys=keys, keys_all=keys_all)
    timer.lap("loss")
    engine.backward(loss)
    timer.lap("backward")
    engine.step()
    timer.lap("optimizer")
    return {"loss": float(loss.detach()), "n_target_tokens": int(out["n_target_tokens"])}


# ------------------------------------------------------------------------------------------------ shared worker body
def _peak_memory_bytes(cuda: bool) -> int:
    if cuda:
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


@dataclass
class BenchParts:
    """What ``build_parts`` made in one process: everything a timed micro-step needs beside the batch."""

    model: nn.Module
    """The ``AlignModel`` (its ``llm.forward`` swapped for ``full_vocab_forward`` in the reference recipe)."""
    engine: DeepSpeedEngine
    """DeepSpeed engine wrapping ``model``."""
    loss_fn: AlignmentLoss
    """L_ALI (Eq. 16)."""
    encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None
    """Text ids ``[U]`` -> token ids and mask ``[U, T]`` (online text source), None for the store source."""
    num_videos: int
    """Comment text-id offset (data manifest)."""


def build_parts(cfg: AlignStageConfig, data_dir: str, world: int, device: str, steps_total: int,
                reference: bool) -> BenchParts:
    """Model, engine, loss and text tokenizer built with the library's builders, in this process's group."""
    from lsvcr_dist.data.manifest import read_manifest
    from lsvcr_dist.data.transforms import TextTokenizer
    from lsvcr_dist.models.align_model import build_align_model
    from lsvcr_dist.train.engine import initialize_engine

    num_videos = int(read_manifest(data_dir)["num_videos"])
    _, model = build_align_model(cfg, num_videos)
    if reference:
        model.llm.forward = types.MethodType(full_vocab_forward, model.llm)
    engine, _ = initialize_engine(model, cfg, world, device, steps_total)
    encode = TextTokenizer.from_data_dir(data_dir, cfg.llm).tokenize if cfg.text_source == "online" else None
    return BenchParts(model, engine, AlignmentLoss.from_config(cfg.loss), encode, num_videos)


@dataclass
class Window:
    """Counters of the timed micro-steps (reset after warm-up) and the loss of every micro-step."""

    timer: SectionTimer
    """Seconds per section."""
    counts: StepCounts = field(default_factory=StepCounts)
    """Real tokens (no padding): what FLOPs are counted from."""
    processed_prompt_tokens: int = 0
    """Prompt tokens the kernels saw, padding included."""
    processed_text_tokens: int = 0
    """Text-encoder tokens the kernels saw, padding included."""


def timed_step(parts: BenchParts, cfg: AlignStageConfig, raw: dict, index: int, device: str, window: Window, *,
               reference: bool, trim: bool) -> float:
    """One timed micro-step on the numpy ALIGN batch ``raw`` (data wait already lapped); returns its loss."""
    from lsvcr_dist.train.align_step import seed_micro_step, text_inputs, to_tensors, trim_prompts, trim_text

    seed_micro_step(cfg.seed, distributed.rank(), index)
    batch = to_tensors(raw, device)
    text = text_inputs(raw, parts.num_videos, parts.encode, device)
    if trim:
        batch, text = trim_prompts(batch), trim_text(text)
    window.timer.lap("text_tokenize")
    m = timed_micro_step(parts.engine, parts.loss_fn, batch, text, cfg.rand_pos, window.timer, gather=not reference)
    if not np.isfinite(m["loss"]):
        raise FloatingPointError(f"rank {distributed.rank()}: non-finite loss {m['loss']} at micro-step {index}")
    window.counts.add(batch_counts(batch, text, m["n_target_tokens"]))
    window.processed_prompt_tokens += batch["prompt_input_ids"].numel()
    window.processed_text_tokens += text.input_ids.numel() if text.input_ids is not None else 0
    return m["loss"]


def run_window(cfg: AlignStageConfig, data_dir: str, batches: Iterable[dict], warmup: int, steps: int, *,
               reference: bool, trim: bool, peak_flops: float = 0.0, threads: int = 0) -> dict:
    """Build the model/engine in this process's group, run ``warmup`` + ``steps`` micro-steps, time the last ones.

    Every micro-step is an optimizer step (the caller sets ``global_batch = micro_batch * workers``).

    Args:
        cfg: alignment config.
        data_dir: prepared data (manifest + tables for text tokenization).
        batches: ALIGN batches (numpy dicts) of this worker.
        warmup: untimed micro-steps.
        steps: timed micro-steps.
        reference: the public code's recipe (local negatives, full-vocab logits, padded prompts).
        trim: cut prompt/text padding (ours).
        peak_flops: per-device peak FLOP/s; 0 = detect (CUDA name) or measure (CPU probe).
        threads: torch intra-op threads of this process (0 = leave as is); both recipes get the same budget.

    Returns:
        This rank's results: ``elapsed_s``, ``sections`` (seconds), ``counts`` (real tokens), ``flops`` (by term),
        ``peak_memory_bytes``, ``peak_flops``, ``losses`` (warm-up included).
    """
    if threads > 0:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    parts = build_parts(cfg, data_dir, distributed.world_size(), "cuda" if cuda else "cpu", warmup + steps, reference)
    if not peak_flops:
        peak_flops = (peak_flops_for_device(torch.cuda.get_device_name()) or 0.0) if cuda else cpu_matmul_probe()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    it = iter(batches)
    window, losses, t_start = Window(SectionTimer(cuda)), [], 0.0
    for i in range(warmup + steps):
        if i == warmup:  # the timed window starts together on every rank
            distributed.barrier()
            window, t_start = Window(SectionTimer(cuda)), time.perf_counter()
        window.timer.start()
        raw = next(it, None)
        if raw is None:
            raise RuntimeError(f"rank {distributed.rank()}: data ran out after {i} of {warmup + steps} micro-batches")
        window.timer.lap("data_wait")
        losses.append(timed_step(parts, cfg, raw, i, device, window, reference=reference, trim=trim))
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t_start
    counts = window.counts
    shape = LLMShape.from_hf_config(parts.model.llm.lm.config)
    sr_params = sum(p.numel() for p in parts.model.sr.parameters() if p.requires_grad)
    flops = align_step_flops(shape, counts, lora_r=cfg.lora.r, lora_targets=_glm_targets(cfg.lora.target_modules),
                             sr_params=sr_params, sr_dim=cfg.sr.dim, text_grad=cfg.text_source == "online")
    return {"rank": distributed.rank(), "elapsed_s": elapsed, "sections": window.timer.total, "samples": counts.samples,
            "prompt_tokens": counts.prompt_tokens, "text_tokens": counts.text_tokens,
            "target_tokens": counts.target_tokens, "processed_prompt_tokens": window.processed_prompt_tokens,
            "processed_text_tokens": window.processed_text_tokens, "flops": flops,
            "peak_memory_bytes": _peak_memory_bytes(cuda), "peak_flops": float(peak_flops), "losses": losses,
            "device": device, "torch_threads": torch.get_num_threads()}


def _glm_targets(targets: list[str]) -> list[str]:
    from lsvcr_dist.flops import GLM_LINEARS

    return [t for t in targets if t in GLM_LINEARS]


def summarize(per_rank: list[dict]) -> dict:
    """Aggregate per-rank window results into throughput, TFLOP/s, MFU, breakdown and memory.

    Elapsed time is the slowest rank's (the step is synchronous across ranks); samples, tokens and FLOPs are summed;
    MFU divides by the sum of the per-rank peaks. Breakdown values are mean seconds per micro-step over ranks.
    """
    elapsed = max(r["elapsed_s"] for r in per_rank)
    steps = max(len(r["losses"]) for r in per_rank)
    samples = sum(r["samples"] for r in per_rank)
    tokens = sum(r["prompt_tokens"] + r["text_tokens"] for r in per_rank)
    flops = sum(r["flops"]["total"] for r in per_rank)
    peak = sum(r["peak_flops"] for r in per_rank)
    measured = max(1, steps)
    n = len(per_rank)
    breakdown = {k: sum(r["sections"][k] for r in per_rank) / n / measured for k in SECTIONS}
    return {
        "workers": n, "elapsed_s": elapsed, "samples": samples, "samples_per_s": samples / elapsed,
        "tokens_per_s": tokens / elapsed, "prompt_tokens_per_s": sum(r["prompt_tokens"] for r in per_rank) / elapsed,
        "text_tokens_per_s": sum(r["text_tokens"] for r in per_rank) / elapsed,
        "tflops": flops / elapsed / 1e12, "mfu": mfu(flops / elapsed, peak) if peak > 0 else float("nan"),
        "peak_tflops_per_device": peak / n / 1e12,
        "padding_overhead": {  # processed / real tokens (1.0 = no padding work)
            "prompt": sum(r.get("processed_prompt_tokens", 0) for r in per_rank)
            / max(1, sum(r["prompt_tokens"] for r in per_rank)),
            "text": sum(r.get("processed_text_tokens", 0) for r in per_rank)
            / max(1, sum(r["text_tokens"] for r in per_rank))},
        "flops_by_term": {k: sum(r["flops"][k] for r in per_rank) for k in per_rank[0]["flops"]},
        "step_time_breakdown_s": breakdown,
        "peak_memory_bytes_per_worker": [r["peak_memory_bytes"] for r in sorted(per_rank, key=lambda r: r["rank"])],
        "device": per_rank[0]["device"], "last_loss": per_rank[0]["losses"][-1] if per_rank[0]["losses"] else None,
    }


def _gather_and_write(result: dict, out_path: str) -> None:
    import torch.distributed as dist

    rows = [None] * dist.get_world_size() if dist.is_initialized() else [result]
    if dist.is_initialized():
        dist.all_gather_object(rows, result)
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(rows))


# ------------------------------------------------------------------------------------------------ entry points
def ray_bench_worker(config: dict) -> None:
    """Ray Train ``train_loop_per_worker``: stream the ``train`` shard, time the step, rank 0 writes ``out``.

    Args:
        config: ``cfg`` (``config.to_dict`` of the AlignStageConfig), ``data_dir``, ``warmup``, ``steps``,
            ``trim``, ``peak_flops``, ``out`` (JSON list of per-rank results), ``prefetch_batches``.
    """
    import ray.train

    from lsvcr_dist.config import from_dict

    cfg = from_dict("align", config["cfg"])
    shard = ray.train.get_dataset_shard("train")
    batches = shard.iter_batches(batch_size=cfg.deepspeed.micro_batch, batch_format="numpy", drop_last=True,
                                 prefetch_batches=int(config.get("prefetch_batches", 2)))
    res = run_window(cfg, config["data_dir"], batches, int(config["warmup"]), int(config["steps"]),
                     reference=False, trim=bool(config.get("trim", True)), peak_flops=float(config["peak_flops"]),
                     threads=int(config.get("threads", 0)))
    _gather_and_write(res, config["out"])


def reference_bench_worker(rank: int, world: int, port: int, cfg_dict: dict, data_dir: str, batches: list,
                           warmup: int, steps: int, peak_flops: float, out: str, threads: int = 0) -> None:
    """``torch.multiprocessing.spawn`` entry of the reference recipe: one process group, in-memory batches.

    Args:
        rank: from spawn.
        world: processes.
        port: rendezvous port on 127.0.0.1.
        cfg_dict: ``config.to_dict`` of the AlignStageConfig (ZeRO stage forced to 2 by the caller).
        data_dir: prepared data.
        batches: ``world`` lists of pre-transformed numpy ALIGN batches; rank r uses ``batches[r]``.
        warmup, steps, peak_flops, out, threads: as ``run_window`` / ``ray_bench_worker``.
    """
    import torch.distributed as dist

    from lsvcr_dist.config import from_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        cfg = from_dict("align", cfg_dict)
        res = run_window(cfg, data_dir, batches[rank], warmup, steps, reference=True, trim=False,
                         peak_flops=peak_flops, threads=threads)
        _gather_and_write(res, out)
    finally:
        dist.destroy_process_group()
