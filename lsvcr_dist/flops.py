"""FLOP model of one alignment step (LoRA LLM recommender + online LLM text encoder + SR model) and MFU.

What is counted (model FLOPs of the *real* tokens; padding, recomputation and optimizer work are NOT counted, so a
run that pads or recomputes shows a lower MFU instead of a higher FLOP count). A multiply-add is 2 FLOPs.

Let ``N`` be the decoder's matmul weights per token (every layer's q, k, v, o, gate_up, down projections; embeddings,
norms, biases and the LM head excluded), ``N_lora`` the LoRA adapter weights (``r * (in + out)`` per adapted
linear), ``L`` layers, ``d = n_heads * head_dim`` the attention width, ``H`` hidden size, ``V`` vocabulary.

* Frozen base, per real token of a pass WITH backward: ``4 N`` = forward ``2 N`` + activation gradients ``2 N``.
  Frozen weights get no weight gradient, so the usual ``6 N`` of full training does not apply. (Layer 0's q/k/v
  read the frozen embeddings, so autograd skips their input gradients: ``4 N`` overcounts by ``2 (q+k+v)`` of one
  layer per token, 0.17 % at ChatGLM3-6B shape; ``tests/test_flops.py`` checks the formula against torch's
  ``FlopCounterMode`` to the FLOP with that correction.)
* Attention scores and the weighted sum, per sequence of ``T`` real tokens: forward ``4 L d T^2`` (``Q K^T`` and
  ``P V``, each ``2 T^2 d`` per layer), backward ``8 L d T^2`` (``dQ, dK, dP, dV``), so ``12 L d T^2`` in all.
  The full ``T x T`` matrix is counted (the PaLM / Megatron convention; causal masking is not discounted).
* LoRA, per real token: ``6 N_lora`` (forward 2, activation gradient 2, weight gradient 2).
* LM head (frozen): ``4 V H`` per position that computes logits (forward 2 + activation gradient 2). Our step
  computes logits only at the target positions; the public code's recipe at every position (``logit_positions``).
* Text encoder LLM(t) (online source, trained through L_SR / L_SSC / L_VCC): the same ``4 N + 6 N_lora`` per real
  token plus ``12 L d T^2`` per text; no LM head. Without gradients (``text_grad=False``) it is
  ``2 N + 2 N_lora`` per token and ``4 L d T^2`` per text.
* Preference head ``s~ = W h`` (trainable ``H x d_sr``): ``6 H d_sr`` per sample.
* SR model: ``6 P_sr`` per text vector fed to it (``sr_positions``), an upper-bound approximation (its text MLP sees
  every vector, its transformer fewer). Below 0.1 % of the total at ChatGLM3-6B shape; with the 64-wide tiny CPU
  GLM it is a visible share (about 15 %), which overstates the tiny run's MFU by at most that much.

Tokens: a prompt's real tokens are instruction + target + eos (its attention mask); a text's are its mask too.

Peak FLOP/s per device: H100 SXM and H200 bf16 dense 989.4 TFLOP/s (``PEAK_TFLOPS``); on CPU the peak is MEASURED
by a short fp32 matmul probe (``cpu_matmul_probe``) with the process's thread count, so a CPU MFU is relative to
what this box's matmul kernel delivers, not to a datasheet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

# bf16 dense tensor-core peaks (no sparsity), TFLOP/s per device.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4}
GLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class LLMShape:
    """Shape of a GLM-style decoder (fused ``gate_up_proj``, GQA)."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @classmethod
    def from_hf_config(cls, c) -> "LLMShape":
        """From a ``transformers`` config (``GlmConfig`` and Llama-like configs)."""
        heads = int(c.num_attention_heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
        return cls(n_layers=int(c.num_hidden_layers), hidden=int(c.hidden_size), n_heads=heads,
                   n_kv_heads=int(getattr(c, "num_key_value_heads", None) or heads), head_dim=head_dim,
                   ffn=int(c.intermediate_size), vocab=int(c.vocab_size))

    @property
    def attn_width(self) -> int:
        """``d = n_heads * head_dim`` (query width)."""
        return self.n_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in, out)`` of each linear of one layer (GLM names)."""
        h, q, kv = self.hidden, self.attn_width, self.n_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_up_proj": (h, 2 * self.ffn), "down_proj": (self.ffn, h)}

    def matmul_params(self) -> int:
        """``N``: decoder matmul weights per token (all layers; no embeddings, norms, biases or LM head)."""
        return self.n_layers * sum(i * o for i, o in self.linear_shapes().values())

    def lora_params(self, r: int, targets=GLM_LINEARS) -> int:
        """``N_lora``: ``r * (in + out)`` summed over adapted linears of every layer.

        Raises:
            ValueError: a target name that is not a GLM linear (named).
        """
        shapes = self.linear_shapes()
        bad = [t for t in targets if t not in shapes]
        if bad:
            raise ValueError(f"LoRA targets {bad} are not GLM linears (known: {sorted(shapes)})")
        return self.n_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


# ChatGLM3-6B's shape (random weights in benchmarks): models/llm_builders.chatglm3_6b_shaped_config.
CHATGLM3_6B = LLMShape(n_layers=28, hidden=4096, n_heads=32, n_kv_heads=2, head_dim=128, ffn=13696, vocab=65024)


@dataclass
class StepCounts:
    """Real-token counts of the micro-batches of a measured window (one worker or summed over workers).

    Attributes:
        samples: rows (prompts).
        prompt_lengths: ``[B]`` real tokens per prompt (instruction + target + eos).
        text_lengths: ``[U]`` real tokens per encoded text (online source); empty for the store source.
        target_tokens: positions that predict a target token (L_LM terms).
        logit_positions: positions whose full-vocabulary logits were computed; None = ``target_tokens``.
        sr_positions: text vectors fed to the SR model (see module docstring).
    """

    samples: int = 0
    prompt_lengths: list = field(default_factory=list)
    text_lengths: list = field(default_factory=list)
    target_tokens: int = 0
    logit_positions: int | None = None
    sr_positions: int = 0

    def add(self, other: "StepCounts") -> None:
        """Accumulate another window's counts in place."""
        self.samples += other.samples
        self.prompt_lengths = list(self.prompt_lengths) + list(other.prompt_lengths)
        self.text_lengths = list(self.text_lengths) + list(other.text_lengths)
        self.target_tokens += other.target_tokens
        if other.logit_positions is not None:
            self.logit_positions = (self.logit_positions or 0) + other.logit_positions
        self.sr_positions += other.sr_positions

    @property
    def prompt_tokens(self) -> int:
        """Real prompt tokens (instruction + target + eos)."""
        return int(np.sum(np.asarray(self.prompt_lengths, dtype=np.int64)))

    @property
    def text_tokens(self) -> int:
        """Real text-encoder tokens."""
        return int(np.sum(np.asarray(self.text_lengths, dtype=np.int64)))


def _sq_sum(lengths) -> float:
    a = np.asarray(lengths, dtype=np.float64)
    return float(np.sum(a * a))


def align_step_flops(shape: LLMShape, counts: StepCounts, lora_r: int, lora_targets=GLM_LINEARS,
                     sr_params: int = 0, sr_dim: int = 0, text_grad: bool = True) -> dict[str, float]:
    """FLOPs of the alignment work in ``counts`` by term (see the module docstring for every formula).

    Args:
        shape: decoder shape.
        counts: real-token counts.
        lora_r: LoRA rank (0 = no adapters).
        lora_targets: adapted GLM linears.
        sr_params: trainable SR-model parameters ``P_sr``.
        sr_dim: d_sr (preference head output width).
        text_grad: the text encoder runs with gradients (online source during alignment).

    Returns:
        ``{"prompt_base", "prompt_attn", "prompt_lora", "lm_head", "text_base", "text_attn", "text_lora",
        "pref_head", "sr", "total"}`` in FLOPs.
    """
    n = shape.matmul_params()
    n_lora = shape.lora_params(lora_r, lora_targets) if lora_r else 0
    ld = shape.n_layers * shape.attn_width
    p_tok, t_tok = counts.prompt_tokens, counts.text_tokens
    logit_pos = counts.target_tokens if counts.logit_positions is None else counts.logit_positions
    fb, att, lo = (4, 12, 6) if text_grad else (2, 4, 2)
    out = {
        "prompt_base": 4.0 * n * p_tok,
        "prompt_attn": 12.0 * ld * _sq_sum(counts.prompt_lengths),
        "prompt_lora": 6.0 * n_lora * p_tok,
        "lm_head": 4.0 * shape.vocab * shape.hidden * logit_pos,
        "text_base": float(fb) * n * t_tok,
        "text_attn": float(att) * ld * _sq_sum(counts.text_lengths),
        "text_lora": float(lo) * n_lora * t_tok,
        "pref_head": 6.0 * shape.hidden * sr_dim * counts.samples,
        "sr": 6.0 * sr_params * counts.sr_positions,
    }
    out["total"] = float(sum(out.values()))
    return out


def peak_flops_for_device(device_name: str) -> float | None:
    """bf16 dense peak FLOP/s of a known GPU name (``torch.cuda.get_device_name``), else None.

    H100 is assumed SXM (989.4 TFLOP/s); pass an explicit peak for a PCIe card (756 TFLOP/s).
    """
    up = device_name.upper()
    for key, tf in PEAK_TFLOPS.items():
        if key in up:
            return tf * 1e12
    return None


def cpu_matmul_probe(n: int = 512, seconds: float = 0.5, dtype=None) -> float:
    """Measured fp32 matmul FLOP/s of this process (its torch thread count): the CPU "peak" for MFU.

    Args:
        n: square matrix size.
        seconds: rough measuring time after one warm-up product.
        dtype: torch dtype (fp32 by default).

    Returns:
        FLOP/s of the best of several timed batches of ``[n, n] @ [n, n]`` products (``2 n^3`` FLOPs each).
    """
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: thread pool and kernel selection
    best, t_end = 0.0, time.perf_counter() + seconds
    reps = 4
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        dt = time.perf_counter() - t0
        best = max(best, reps * 2.0 * n ** 3 / max(dt, 1e-9))
        if time.perf_counter() >= t_end:
            return best


def mfu(flops_per_s: float, peak_per_device: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over ``devices x peak``.

    Raises:
        ValueError: a non-positive peak or device count.
    """
    if peak_per_device <= 0 or devices < 1:
        raise ValueError(f"peak_per_device={peak_per_device} and devices={devices} must be positive")
    return flops_per_s / (peak_per_device * devices)
