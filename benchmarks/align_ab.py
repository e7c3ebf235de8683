"""Paired A/B timing of the alignment step's speed-work items, for ``benchmarks/align_throughput.py --ab``.

Separate benchmark runs on a shared, loaded machine drift more than the effects measured, so each item is
switched on and off on ONE engine in ONE process, on the same micro-batches, alternating the order every round.
"""

from __future__ import annotations

import statistics
import types
from typing import TYPE_CHECKING

import torch
from torch import nn

from benchmarks.align_bench import BenchParts, SectionTimer, build_parts, full_vocab_forward, timed_micro_step

from lsvcr_dist.config import AlignStageConfig
from lsvcr_dist.train.align_step import seed_micro_step, text_inputs, to_tensors, trim_prompts, trim_text

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

AB_ITEMS = ("trim", "target_logits", "sdpa", "grad_checkpointing", "fused_adamw", "text_bucket")
AB_TEXT_BUCKET = 16  # chunk size tried by the text_bucket item when the config leaves it off


def baseline_on(item: str, cuda: bool, text_bucket: int = 0) -> bool:
    """Whether ``item`` is on in ours: checkpointing off, fused AdamW on GPU only, text buckets as configured."""
    return {"grad_checkpointing": False, "fused_adamw": cuda, "text_bucket": text_bucket > 0}.get(item, True)


def _torch_optimizer(engine: DeepSpeedEngine) -> torch.optim.Optimizer:
    """The torch AdamW inside a DeepSpeed engine (ZeRO wraps it in ``engine.optimizer.optimizer``)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _set_item(model: nn.Module, item: str, on: bool, optimizer: torch.optim.Optimizer | None = None,
              bucket: int = AB_TEXT_BUCKET) -> None:
    """Switch one speed-work item of an ``AlignModel`` (and its AdamW) in place; ``trim`` is applied by the caller."""
    base = model.llm._base()
    if item == "text_bucket":
        model.text_bucket = bucket if on else 0
        return
    if item == "fused_adamw":  # torch reads the kernel choice from each param group at every step
        for g in optimizer.param_groups:
            g["fused"], g["foreach"] = (True, None) if on else (None, True)
        return
    if item == "target_logits":  # off = the public code's full-vocabulary logits
        if on:
            model.llm.__dict__.pop("forward", None)
        else:
            model.llm.forward = types.MethodType(full_vocab_forward, model.llm)
    elif item == "sdpa":
        base.set_attn_implementation("sdpa" if on else "eager")
    elif item == "grad_checkpointing":
        if on:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_disable()
    elif item != "trim":
        raise ValueError(f"unknown speed-work item {item!r} (known: {AB_ITEMS})")


def _section_medians(rows: list[dict]) -> dict:
    """Median seconds of every section over ``rows`` (one dict of section seconds per micro-step)."""
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} if rows else {}


def text_padding_stats(texts: list, bucket: int) -> dict:
    """Texts per micro-batch and padded / real text tokens, one padded batch vs length-sorted chunks of ``bucket``.

    Args:
        texts: ``TextInputs`` of the micro-batches (online source).
        bucket: chunk size (see ``LLMRecommender.encode_text``).
    """
    real = one = chunked = n = 0
    for t in texts:
        if t.attention_mask is None:
            continue
        lengths = torch.sort(t.attention_mask.long().sum(1)).values
        n += len(lengths)
        real += int(lengths.sum())
        one += len(lengths) * int(lengths.max()) if len(lengths) else 0
        chunked += sum(len(c) * int(c.max()) for c in lengths.split(bucket))
    return {"texts_per_micro_batch": n / max(len(texts), 1), "padded_over_real_one_batch": one / max(real, 1),
            f"padded_over_real_buckets_of_{bucket}": chunked / max(real, 1)}


class _Trial:
    """One engine whose speed-work items are switched on and off between timed micro-steps."""

    def __init__(self, cfg: AlignStageConfig, parts: BenchParts, device: str, cuda: bool) -> None:
        self.cfg, self.parts, self.device, self.cuda = cfg, parts, device, cuda
        self.opt = _torch_optimizer(parts.engine)
        self.bucket = cfg.text_bucket or AB_TEXT_BUCKET  # the chunk size the text_bucket item switches on
        self.k = 0  # micro-steps taken: seeds each one like the training loop does

    def step(self, raw: dict, item: str, on: bool) -> tuple[float, int, dict]:
        """Time one micro-step with ``item`` switched ``on`` (or off), then restore ours.

        Returns:
            ``(seconds, peak CUDA bytes or 0, seconds per section)``.
        """
        p = self.parts
        _set_item(p.model, item, on, self.opt, self.bucket)
        seed_micro_step(self.cfg.seed, 0, self.k)
        self.k += 1
        batch, text = to_tensors(raw, self.device), text_inputs(raw, p.num_videos, p.encode, self.device)
        if not (item == "trim" and not on):
            batch, text = trim_prompts(batch), trim_text(text)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        timer = SectionTimer(self.cuda)
        timer.start()
        timed_micro_step(p.engine, p.loss_fn, batch, text, self.cfg.rand_pos, timer, gather=False)
        _set_item(p.model, item, baseline_on(item, self.cuda, self.cfg.text_bucket), self.opt, self.bucket)
        return sum(timer.total.values()), int(torch.cuda.max_memory_allocated()) if self.cuda else 0, dict(timer.total)


def ab_compare(cfg: AlignStageConfig, data_dir: str, batches: list[dict], items: tuple[str, ...] = AB_ITEMS,
               rounds: int = 5, threads: int = 0) -> dict:
    """Paired A/B timing of speed-work items in ONE process on the same engine and the same micro-batches.

    Every round times one micro-step per (item, without/with), alternating which goes first, on the round's batch;
    separate runs on a shared, loaded box drift far more than a step. The baseline is ours (trim, target-only
    logits, SDPA, no checkpointing, fused AdamW on GPU only: ``baseline_on``); each item is switched alone. Needs an
    initialized process group (world 1 is fine).

    Args:
        cfg: alignment config.
        data_dir: prepared data.
        batches: numpy ALIGN micro-batches (round r uses ``batches[(r + 1) % len(batches)]``); the first is the
            warm-up of every variant.
        items: subset of ``AB_ITEMS``.
        rounds: timed rounds.
        threads: torch threads (0 = unchanged).

    Returns:
        ``{item: {"median_s_without", "median_s_with", "speedup_with" (= without / with), "peak_mem_*"}}`` and
        ``text_padding``; peak memory per variant only on CUDA (CPU RSS peaks never go down).
    """
    if threads > 0:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    parts = build_parts(cfg, data_dir, 1, "cuda" if cuda else "cpu", rounds + 1, False)
    trial = _Trial(cfg, parts, device, cuda)
    variants = [(i, on) for i in items for on in (False, True)]
    times, mem, sections = ({v: [] for v in variants}, {v: 0 for v in variants}, {v: [] for v in variants})
    for item, on in variants:  # warm-up every variant once (kernel choice, allocator)
        sections[(item, on)].append(trial.step(batches[0], item, on)[2])
    for r in range(rounds):
        raw = batches[(r + 1) % len(batches)]
        for item in items:
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                dt, m, sec = trial.step(raw, item, on)
                times[(item, on)].append(dt)
                mem[(item, on)] = max(mem[(item, on)], m)
                sections[(item, on)].append(sec)
    texts = [text_inputs(b, parts.num_videos, parts.encode, "cpu") for b in batches]
    out = {"text_padding": text_padding_stats(texts, trial.bucket)}
    for item in items:
        out[item] = _item_result(times, sections, item)
        if cuda:
            out[item].update(peak_mem_without=mem[(item, False)], peak_mem_with=mem[(item, True)])
    return out


def _item_result(times: dict, sections: dict, item: str) -> dict:
    """Medians of one item's timed rounds, without and with it (section medians skip the warm-up step)."""
    off, on = statistics.median(times[(item, False)]), statistics.median(times[(item, True)])
    return {"median_s_without": off, "median_s_with": on, "speedup_with": off / on,
            "times_without": times[(item, False)], "times_with": times[(item, True)],
            "section_median_s_without": _section_medians(sections[(item, False)][1:]),
            "section_median_s_with": _section_medians(sections[(item, True)][1:])}
