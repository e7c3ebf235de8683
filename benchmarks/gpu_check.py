"""One-script GPU check: the ChatGLM3-6B-shaped alignment step in bf16, MFU, the reference recipe, the A/B items.

    python benchmarks/gpu_check.py --out $OUT/gpu.json                       # one H100 / H200, < 10 minutes
    python benchmarks/gpu_check.py --out /tmp/gpu_rehearsal.json --rehearsal  # CPU: 1 layer, short prompts

Made for a bare GPU image (torch, transformers, peft, pyarrow; no Ray, DeepSpeed, webdataset, no network): it
imports only the library's model, loss and FLOP code, builds synthetic micro-batches in memory with the paper's
shapes (instruction 1,200-3,840 real tokens + target 8-40 of at most 256 + eos, history 20 records, K = 3
comments per record, about 100 distinct short texts per sample for the online LLM(t) encoder) and times the step
in plain torch on one device. ``ray``, ``deepspeed`` and ``webdataset`` imports are made to fail at start, so any
hidden dependency shows up as an error here rather than on the GPU.

Why plain torch and not DeepSpeed: on one device ZeRO-2 partitions nothing (the LoRA optimizer state is ~100 MB),
so DeepSpeed would add only its own overhead; its wheel plus dependencies (pydantic-core, ninja, hjson, msgpack,
py-cpuinfo) would fit in the 64 MiB carried with the tree, but its first use on a new CUDA image may JIT-build ops
or probe the toolkit, a failure mode a 15-minute device budget cannot afford. Multi-GPU ZeRO figures stay with
``benchmarks/align_throughput.py``.

Phases, each written to the JSON as soon as it ends (a timeout keeps what finished): build, ``ours`` window, the
``reference`` window (the public code's recipe: prompts padded to T = 3,840 + 256 + 1, fp32 logits over the full
vocabulary at every position, negatives local to the device, which on one device equals ours), then paired A/B
rounds of: trim padding, target-only logits, SDPA vs eager, gradient checkpointing, fused vs foreach AdamW.
A variant that runs out of memory is recorded as ``oom`` (one that fails as ``error``) and the run continues.
"""

from __future__ import annotations

import argparse
import builtins
import json
import statistics
import sys
import time
import types
from pathlib import Path

BLOCKED = ("ray", "deepspeed", "webdataset")
_real_import = builtins.__import__


def _guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name.split(".")[0] in BLOCKED:
        raise ImportError(f"gpu_check: '{name}' must not be imported here (the GPU image has no {name.split('.')[0]})")
    return _real_import(name, globals, locals, fromlist, level)


builtins.__import__ = _guarded_import
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lsvcr_dist.flops import LLMShape, StepCounts, align_step_flops, cpu_matmul_probe, mfu, peak_flops_for_device  # noqa: E402,E501
from lsvcr_dist.losses import AlignmentLoss  # noqa: E402
from lsvcr_dist.models.align_model import AlignModel, TextInputs, unique_text_ids  # noqa: E402
from lsvcr_dist.models.builders import build_sr_model  # noqa: E402
from lsvcr_dist.models.llm_builders import GLM_LORA_TARGETS, apply_lora, chatglm3_6b_shaped_config  # noqa: E402
from lsvcr_dist.models.llm_rec import LLMRecommender  # noqa: E402

AB_ITEMS = ("trim", "target_logits", "sdpa", "grad_checkpointing", "fused_adamw")
NUM_VIDEOS, NUM_COMMENTS = 100_000, 1_000_000
TOKENIZER_VOCAB, GMASK, SOP, EOS = 64_798, 64_790, 64_792, 2  # ChatGLM3's tokenizer
SECTIONS = ("forward", "loss", "backward", "optimizer")


# ------------------------------------------------------------------------------------------------ data
def synthetic_micro_batch(rng: np.random.Generator, a) -> tuple[dict, TextInputs]:
    """One ALIGN micro-batch with paper-like lengths, prompts right-padded to ``T = max_prompt + max_target + 1``.

    Returns:
        ``(batch, text)``: ``schema.ALIGN_BATCH`` tensors (CPU) and the ``TextInputs`` of its distinct texts, each
        text ``[gMASK] sop`` + 6-48 tokens, padded to the longest (the public code's ``padding="longest"``).
    """
    b, lh, k = a.micro_batch, a.hist, 3
    t_full = a.max_prompt + a.max_target + 1
    ids = np.zeros((b, t_full), np.int64)
    mask, labels = np.zeros_like(ids), np.full_like(ids, -100)
    last = np.zeros(b, np.int64)
    for i in range(b):
        n_i = int(rng.integers(a.min_instruction, a.max_prompt + 1))
        n_t = int(rng.integers(8, min(40, a.max_target) + 1))
        row = np.concatenate([[GMASK, SOP], rng.integers(3, TOKENIZER_VOCAB - 9, n_i - 2 + n_t), [EOS]])
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
        labels[i, n_i: len(row)] = row[n_i:]
        last[i] = n_i - 1
    comments = rng.integers(1, NUM_COMMENTS, (b, lh, k)) * (rng.random((b, lh, k)) < 0.7)
    task = np.arange(b) % 2
    batch = {"task": task, "video_hist": rng.integers(1, NUM_VIDEOS, (b, lh)),
             "video_hist_comment": rng.integers(1, NUM_COMMENTS, (b, lh)),
             "comment_hist_video": rng.integers(1, NUM_VIDEOS, (b, lh)), "comment_hist_comments": comments,
             "current_video": rng.integers(1, NUM_VIDEOS, b) * task,
             "target_video": rng.integers(1, NUM_VIDEOS, b), "target_comment": rng.integers(1, NUM_COMMENTS, b),
             "prompt_input_ids": ids, "prompt_attention_mask": mask, "prompt_labels": labels,
             "prompt_last_index": last}
    batch["target_text_id"] = np.where(task == 0, batch["target_video"], NUM_VIDEOS + batch["target_comment"])
    text_ids = unique_text_ids(batch, NUM_VIDEOS)
    lengths = rng.integers(6, a.max_text + 1, len(text_ids)) + 2
    t_ids = np.zeros((len(text_ids), lengths.max()), np.int64)
    t_mask = np.zeros_like(t_ids)
    for j, n in enumerate(lengths):
        t_ids[j, :n] = np.concatenate([[GMASK, SOP], rng.integers(3, TOKENIZER_VOCAB - 9, n - 2)])
        t_mask[j, :n] = 1
    tensors = {key: torch.as_tensor(v) for key, v in batch.items()}
    return tensors, TextInputs(torch.as_tensor(text_ids), torch.as_tensor(t_ids), torch.as_tensor(t_mask))


def to_device(batch: dict, text: TextInputs, device: str, trim: bool) -> tuple[dict, TextInputs]:
    """Move a micro-batch; ``trim`` cuts the prompt columns to the longest real prompt (exact: right padding)."""
    out = {key: v.to(device, non_blocking=True) for key, v in batch.items()}
    if trim:
        t = int(batch["prompt_attention_mask"].sum(1).max())
        for key in ("prompt_input_ids", "prompt_attention_mask", "prompt_labels"):
            out[key] = out[key][:, :t]
    return out, TextInputs(*(x.to(device) for x in text))


def counts_of(batch: dict, text: TextInputs, n_target: int, logit_positions: int | None) -> StepCounts:
    """Real-token counts of one micro-batch for ``flops.align_step_flops``."""
    b, lh = batch["video_hist"].shape
    k = batch["comment_hist_comments"].shape[-1]
    return StepCounts(samples=b, prompt_lengths=batch["prompt_attention_mask"].sum(1).tolist(),
                      text_lengths=text.attention_mask.sum(1).tolist(), target_tokens=n_target,
                      logit_positions=logit_positions, sr_positions=b * (lh * (3 + k) + 2))


# ------------------------------------------------------------------------------------------------ model
def full_vocab_forward(self, prompt_input_ids, prompt_attention_mask, prompt_labels, prompt_last_index):
    """The public code's L_LM: fp32 logits ``[B, T, V]`` at every position, then the shifted mean CE."""
    h = self.hidden_states(prompt_input_ids, prompt_attention_mask)  # [B, T, H]
    s_tilde = self.pref_head(h[torch.arange(h.shape[0], device=h.device), prompt_last_index.long()])
    logits = self._lm_head()(h).float()  # [B, T, V]
    labels = prompt_labels[:, 1:].reshape(-1)
    n_tok = (labels != -100).sum()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels, ignore_index=-100)
    return loss, s_tilde, n_tok


def build_model(a, device: str, dtype: torch.dtype):
    """ChatGLM3-6B-shaped GLM (random weights, created on ``device`` in ``dtype``) + LoRA r 8 on every linear +
    pref head + the paper's SR model, as one ``AlignModel``; and AdamW over the trainable parameters."""
    from transformers import GlmForCausalLM

    conf = chatglm3_6b_shaped_config(num_layers=a.layers)
    conf._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            lm = GlmForCausalLM(conf)
    finally:
        torch.set_default_dtype(default)
    lm.config.use_cache = False
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = types.SimpleNamespace(r=8, alpha=32, dropout=0.1, target_modules=list(GLM_LORA_TARGETS))  # paper.yaml
    lm = apply_lora(lm, lora)
    rec = LLMRecommender(lm, conf.hidden_size, 64, lm_reduction="mean", pooling="mean")
    sr = build_sr_model(text_in_dim=conf.hidden_size, dim=64, n_layers=2, n_heads=2, inner_size=256, dropout=0.3,
                        max_position=50, text_dim=256, text_mlp_hidden=1024)
    model = AlignModel(rec, sr, NUM_VIDEOS).to(device=device, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0, fused=device.startswith("cuda"))
    return model, opt, AlignmentLoss(tau=0.07, lam=1.0, mu=0.5)


def set_variant(model, opt, trim_on: bool = True, **items) -> bool:
    """Switch the speed items of ``model`` in place (missing items = ours); returns whether to trim prompts."""
    base = model.llm._base()
    if items.get("target_logits", True):
        model.llm.__dict__.pop("forward", None)
    else:
        model.llm.forward = types.MethodType(full_vocab_forward, model.llm)
    base.set_attn_implementation("sdpa" if items.get("sdpa", True) else "eager")
    if items.get("grad_checkpointing", True):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()
    fused = items.get("fused_adamw", next(iter(opt.param_groups))["params"][0].is_cuda)
    for g in opt.param_groups:
        g["fused"], g["foreach"] = (True, None) if fused else (None, True)
    return items.get("trim", trim_on)


# ------------------------------------------------------------------------------------------------ timing
def micro_step(model, opt, loss_fn, batch, text, cuda: bool) -> dict:
    """Forward, L_ALI (Eq. 16, pool = this device's micro-batch), backward, AdamW step; seconds per section."""
    times, t = {}, time.perf_counter()

    def lap(name):
        nonlocal t
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        times[name], t = now - t, now

    out = model(batch, text, rand_pos=True)
    lap("forward")
    pos = torch.arange(out["s"].shape[0], device=out["s"].device)
    keys = batch["target_text_id"]
    loss, _ = loss_fn(loss_lm=out["loss_lm"], s=out["s"], s_cross=out["s_cross"], s_tilde=out["s_tilde"],
                      e_all=out["e"], s_all=out["s"], s_tilde_all=out["s_tilde"], pos_index=pos, keys=keys,
                      keys_all=keys)
    lap("loss")
    loss.backward()
    lap("backward")
    opt.step()
    opt.zero_grad(set_to_none=True)
    lap("optimizer")
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {float(loss)}")
    return {"sections": times, "loss": float(loss.detach()), "n_target": int(out["n_target_tokens"])}


def run_window(model, opt, loss_fn, batches, a, device, cuda, reference: bool, peak: float) -> dict:
    """Warm-up + timed micro-steps of one recipe; samples/s, tokens/s, TFLOP/s, MFU, breakdown, peak memory."""
    # Same AdamW kernel in both windows (its effect is the fused_adamw A/B item; LoRA's state is ~100 MB).
    trim = set_variant(model, opt, trim_on=not reference, target_logits=not reference)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    counts, rows, t0, processed = StepCounts(), [], 0.0, 0
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            if cuda:
                torch.cuda.synchronize()
            t0, counts, rows, processed = time.perf_counter(), StepCounts(), [], 0
        batch, text = to_device(*batches[i % len(batches)], device, trim)
        r = micro_step(model, opt, loss_fn, batch, text, cuda)
        rows.append(r)
        counts.add(counts_of(batch, text, r["n_target"], None))  # model FLOPs of real tokens for both recipes
        processed += batch["prompt_input_ids"].numel()
    elapsed = time.perf_counter() - t0
    shape = LLMShape.from_hf_config(model.llm.lm.config)
    sr_params = sum(p.numel() for p in model.sr.parameters() if p.requires_grad)
    flops = align_step_flops(shape, counts, lora_r=8, lora_targets=GLM_LORA_TARGETS, sr_params=sr_params, sr_dim=64)
    tokens = counts.prompt_tokens + counts.text_tokens
    return {"recipe": "reference" if reference else "ours", "steps": a.steps, "elapsed_s": elapsed,
            "samples_per_s": counts.samples / elapsed, "tokens_per_s": tokens / elapsed,
            "prompt_tokens_per_step": counts.prompt_tokens / a.steps, "text_tokens_per_step": counts.text_tokens / a.steps,
            "padded_over_real_prompt": processed / max(counts.prompt_tokens, 1),
            "tflops": flops["total"] / elapsed / 1e12, "mfu": mfu(flops["total"] / elapsed, peak),
            "flop_shares": {k: v / flops["total"] for k, v in flops.items() if k != "total"},
            "ms_per_step": {s: 1e3 * statistics.mean(r["sections"][s] for r in rows) for s in SECTIONS},
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "losses": [r["loss"] for r in rows]}


def ab_rounds(model, opt, loss_fn, batches, a, device, cuda) -> dict:
    """Paired A/B: each item switched alone against ours on the same batch, order alternating every round."""
    out = {}
    for item in AB_ITEMS:
        times, mem, status = {False: [], True: []}, {False: 0.0, True: 0.0}, {False: "ok", True: "ok"}
        for r in range(a.ab_rounds + a.ab_warmup):  # the first ab_warmup rounds warm both variants up
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                if status[on] != "ok":
                    continue
                trim = set_variant(model, opt, **{item: on})
                batch, text = to_device(*batches[r % len(batches)], device, trim)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                res, err = None, ""
                try:
                    res = micro_step(model, opt, loss_fn, batch, text, cuda)
                except torch.cuda.OutOfMemoryError:
                    err = "oom"  # handled below: the traceback still holds the step's activations in here
                except Exception as exc:  # one item failing must not lose the others
                    err = f"error: {type(exc).__name__}: {exc}"
                if res is None:
                    status[on] = err
                    opt.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    continue
                if r >= a.ab_warmup:
                    times[on].append(sum(res["sections"].values()))
                    mem[on] = max(mem[on], torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)
        row = {"status_without": status[False], "status_with": status[True],
               "times_without_s": times[False], "times_with_s": times[True]}
        if times[False] and times[True]:
            off, on_ = statistics.median(times[False]), statistics.median(times[True])
            row.update(median_s_without=off, median_s_with=on_, speedup_with=off / on_)
        if cuda:
            row.update(peak_gib_without=mem[False], peak_gib_with=mem[True])
        out[item] = row
    set_variant(model, opt)
    return out


# ------------------------------------------------------------------------------------------------ driver
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON to write (rewritten after every phase)")
    p.add_argument("--rehearsal", action="store_true",
                   help="CPU plumbing check: 1 layer, fp32, prompts <= 96 + 16 tokens, 2 history records, texts "
                        "<= 8 tokens, 1 warm-up + 2 steps, 1 A/B round without warm-up")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--max-prompt", type=int, default=3840)
    p.add_argument("--max-target", type=int, default=256)
    p.add_argument("--min-instruction", type=int, default=1200)
    p.add_argument("--hist", type=int, default=20, help="history records per sequence (paper: 20 in alignment)")
    p.add_argument("--max-text", type=int, default=48, help="longest short text (titles, comments) in tokens")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--ab-rounds", type=int, default=3, help="timed A/B rounds per item")
    p.add_argument("--ab-warmup", type=int, default=1, help="untimed A/B rounds per item before them")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip the phases that would start after this")
    p.add_argument("--threads", type=int, default=0, help="CPU torch threads (0 = leave)")
    a = p.parse_args(argv)
    if a.rehearsal:
        a.layers, a.max_prompt, a.max_target, a.min_instruction, a.hist, a.max_text = 1, 96, 16, 48, 2, 8
        a.warmup, a.steps, a.ab_rounds, a.ab_warmup = 1, 2, 1, 0
    return a


def header(a, cuda: bool, dtype: torch.dtype) -> dict:
    """The JSON's identification: command, date, device, library versions, settings."""
    import peft
    import transformers

    return {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__, "cuda": torch.version.cuda},
            "blocked_imports": list(BLOCKED), "dtype": str(dtype).replace("torch.", ""),
            "settings": {k: v for k, v in vars(a).items() if k != "out"}, "phases": {}}


def main(argv=None) -> int:
    a = parse(argv)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(a.dtype, torch.bfloat16 if cuda else torch.float32)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = header(a, cuda, dtype)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(result, indent=2) + "\n")

    def phase(name, fn):
        if name != "build" and time.perf_counter() - t_start > a.budget_s:
            result["phases"][name] = "skipped: over --budget-s"
            save()
            return None
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # keep the other phases: one OOM or error must not lose the whole device run
            result["phases"][name] = f"failed after {time.perf_counter() - t0:.1f} s: {type(exc).__name__}: {exc}"
            save()
            if name == "build":
                raise
            if cuda:
                torch.cuda.empty_cache()
            return None
        result["phases"][name] = f"ok in {time.perf_counter() - t0:.1f} s"
        if name != "build":
            result[name] = value
        save()
        return value

    rng = np.random.default_rng(2024)
    batches = [synthetic_micro_batch(rng, a) for _ in range(max(a.warmup + a.steps, a.ab_rounds + a.ab_warmup))]
    model, opt, loss_fn = phase("build", lambda: build_model(a, device, dtype))
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = (peak_flops_for_device(result["device"]) or 0.0) if cuda else cpu_matmul_probe()
    result["peak_tflops"] = peak / 1e12 if peak else None
    peak = peak or float("nan")
    phase("ours", lambda: run_window(model, opt, loss_fn, batches, a, device, cuda, False, peak))
    phase("reference", lambda: run_window(model, opt, loss_fn, batches, a, device, cuda, True, peak))
    if result.get("ours") and result.get("reference"):
        result["ours_over_reference"] = result["ours"]["samples_per_s"] / result["reference"]["samples_per_s"]
    phase("ab", lambda: ab_rounds(model, opt, loss_fn, batches, a, device, cuda))
    result["wall_s"] = time.perf_counter() - t_start
    save()
    o, r = result.get("ours") or {}, result.get("reference") or {}
    print(json.dumps({"device": result["device"], "ours_samples_per_s": o.get("samples_per_s"),
                      "ours_mfu": o.get("mfu"), "reference_samples_per_s": r.get("samples_per_s"),
                      "ours_over_reference": result.get("ours_over_reference"),
                      "ab_speedups": {k: v.get("speedup_with") for k, v in (result.get("ab") or {}).items()},
                      "wall_s": round(result["wall_s"], 1), "phases": result["phases"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
