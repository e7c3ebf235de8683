"""Paired A/B timing of the alignment step's speed-work items (issue 6), for ``benchmarks/align_throughput.py --ab``.

Separate benchmark runs on a shared, loaded machine drift more than the effects measured, so each item is
switched on and off on ONE engine in ONE process, on the same micro-batches, alternating the order every round.
"""

from __future__ import annotations

import types

import torch

from lsvcr_dist.train.bench import SectionTimer, _build, full_vocab_forward, timed_micro_step, trim_prompts, trim_text

AB_ITEMS = ("trim", "target_logits", "sdpa", "grad_checkpointing")


def _set_item(model, item: str, on: bool) -> None:
    """Switch one speed-work item of an ``AlignModel`` in place (``trim`` is applied by the caller)."""
    base = model.llm._base()
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


def ab_compare(cfg, data_dir: str, batches: list, items=AB_ITEMS, rounds: int = 5, threads: int = 0) -> dict:
    """Paired A/B timing of speed-work items in ONE process on the same engine and the same micro-batches.

    Every round times one micro-step per (item, without/with), alternating which goes first, on the round's batch;
    separate runs on a shared, loaded box drift far more than a step. The baseline is ours (trim, target-only
    logits, SDPA, no checkpointing); each item is switched off (or, for checkpointing, on) alone. Needs an
    initialized process group (world 1 is fine).

    Args:
        cfg: ``AlignStageConfig``.
        data_dir: prepared data.
        batches: numpy ALIGN micro-batches (round r uses ``batches[r % len(batches)]``); the first is a warm-up.
        items: subset of ``AB_ITEMS``.
        rounds: timed rounds.
        threads: torch threads (0 = unchanged).

    Returns:
        ``{item: {"median_s_without", "median_s_with", "speedup_with" (= without / with), "peak_mem_*"}}``;
        peak memory per variant only on CUDA (CPU RSS peaks never go down).
    """
    import statistics

    from lsvcr_dist.train.align_step import seed_micro_step, text_inputs, to_tensors

    if threads > 0:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    model, engine, loss_fn, encode, nv = _build(cfg, data_dir, 1, "cuda" if cuda else "cpu", rounds + 1, False)
    times = {(i, on): [] for i in items for on in (False, True)}
    mem = {(i, on): 0 for i in items for on in (False, True)}

    def step(raw, item, on, k):
        _set_item(model, item, on)
        seed_micro_step(cfg.seed, 0, k)
        batch, text = to_tensors(raw, device), text_inputs(raw, nv, encode, device)
        if not (item == "trim" and not on):
            batch, text = trim_prompts(batch), trim_text(text)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        timer = SectionTimer(cuda)
        timer.start()
        timed_micro_step(engine, loss_fn, batch, text, cfg.rand_pos, timer, gather=False)
        _set_item(model, item, item != "grad_checkpointing")  # back to the baseline
        return sum(timer.total.values()), (int(torch.cuda.max_memory_allocated()) if cuda else 0)

    k = 0
    for item in items:  # warm-up every variant once (kernel choice, allocator)
        for on in (False, True):
            step(batches[0], item, on, k)
            k += 1
    for r in range(rounds):
        raw = batches[(r + 1) % len(batches)]
        for item in items:
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                dt, m = step(raw, item, on, k)
                k += 1
                times[(item, on)].append(dt)
                mem[(item, on)] = max(mem[(item, on)], m)
    out = {}
    for item in items:
        off, on = statistics.median(times[(item, False)]), statistics.median(times[(item, True)])
        out[item] = {"median_s_without": off, "median_s_with": on, "speedup_with": off / on,
                     "times_without": times[(item, False)], "times_with": times[(item, True)]}
        if cuda:
            out[item].update(peak_mem_without=mem[(item, False)], peak_mem_with=mem[(item, True)])
    return out
