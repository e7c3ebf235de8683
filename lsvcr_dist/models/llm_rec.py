"""LLMRecommender: the supplemental LLM recommender of Section 3.2 and the LLM text encoder LLM(t).

One decoder pass per prompt serves both L_LM (Eq. 14) and s~ (Eq. 10). Unlike the public code, which computes
fp32 logits over the full vocabulary at every position (about 2 GB per ChatGLM3 micro-batch), logits are computed
only at the positions that predict a target token: ``[n_target, V]`` instead of ``[B, T, V]``.

The wrapped LM may be a ``peft.PeftModel`` (LoRA applied from outside by ``llm_builders.apply_lora``) or a plain
``PreTrainedModel``; LoRA layers live inside the base modules, so calling the base decoder runs them too. No Ray,
DeepSpeed or process-group collectives here: the loop weights ``loss_lm`` across workers with ``n_target_tokens``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class LLMRecommender(nn.Module):
    """Causal LM (optionally with LoRA) + ``pref_head`` (the public code's ``contrast_adapter``).

    Args:
        lm: causal LM, usually a ``PeftModel``; must expose ``get_decoder()`` and ``get_output_embeddings()``
            (GLM-4, Llama) or ChatGLM3's ``transformer`` with ``output_layer`` (remote code, sequence-first).
        hidden_size: H, width of the LM's last hidden state.
        sr_dim: d, width of the SR preference vectors s (s~ is projected to it).
        lm_reduction: ``mean`` over target tokens of the micro-batch (public code) or ``sum`` (paper Eq. 14).
        pooling: LLM(t) pooling: ``mean`` over real tokens (public code) or ``last`` real token.
    """

    def __init__(self, lm: nn.Module, hidden_size: int, sr_dim: int, lm_reduction: str = "mean",
                 pooling: str = "mean") -> None:
        super().__init__()
        if lm_reduction not in ("mean", "sum"):
            raise ValueError(f"lm_reduction must be 'mean' or 'sum', got {lm_reduction!r}")
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        self.lm = lm
        self.pref_head = nn.Linear(hidden_size, sr_dim)
        self.hidden_size = hidden_size
        self.lm_reduction = lm_reduction
        self.pooling = pooling

    # ------------------------------------------------------------------------------------------------ internals
    def _base(self) -> nn.Module:
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def _is_chatglm(self) -> bool:
        base = self._base()
        return hasattr(base, "transformer") and hasattr(base.transformer, "output_layer")

    def _lm_head(self) -> nn.Module:
        base = self._base()
        return base.transformer.output_layer if self._is_chatglm() else base.get_output_embeddings()

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states after the final norm.

        Args:
            input_ids: ``[B, T]`` token ids (right-padded).
            attention_mask: ``[B, T]`` 1 for real tokens.

        Returns:
            ``[B, T, H]`` in the LM's dtype.
        """
        base = self._base()
        if self._is_chatglm():
            # ChatGLM3 remote code is sequence-first: [T, B, H]; its encoder applies the final LayerNorm.
            out = base.transformer(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                   return_dict=True)
            return out.last_hidden_state.transpose(0, 1)
        out = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                 return_dict=True)
        return out.last_hidden_state

    # ------------------------------------------------------------------------------------------------ API
    def forward(self, prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor,
                prompt_labels: torch.Tensor, prompt_last_index: torch.Tensor):
        """L_LM (Eq. 14) and s~ (Eq. 10) from one decoder pass.

        Args:
            prompt_input_ids: ``[B, T]`` instruction + target + eos, right-padded.
            prompt_attention_mask: ``[B, T]``.
            prompt_labels: ``[B, T]`` -100 except target tokens and eos.
            prompt_last_index: ``[B]`` position of the instruction's final token.

        Returns:
            ``(loss_lm, s_tilde, n_target_tokens)``: scalar fp32 loss (mean or sum over target tokens),
            ``[B, sr_dim]`` preference vectors, and the int64 scalar count of predicted target tokens.
        """
        h = self.hidden_states(prompt_input_ids, prompt_attention_mask)  # [B, T, H]
        b = torch.arange(h.shape[0], device=h.device)
        h_last = h[b, prompt_last_index.long()]  # [B, H]
        s_tilde = self.pref_head(h_last.to(self.pref_head.weight.dtype))  # [B, d]
        # Position t predicts token t+1: keep only positions whose next label is a target token.
        next_labels = prompt_labels[:, 1:]  # [B, T-1]
        sel = next_labels != IGNORE_INDEX  # [B, T-1]
        h_sel = h[:, :-1][sel]  # [n, H]
        logits = self._lm_head()(h_sel).float()  # [n, V], never [B, T, V]
        n_tok = sel.sum()
        loss_sum = F.cross_entropy(logits, next_labels[sel], reduction="sum")
        loss = loss_sum / n_tok.clamp(min=1).to(loss_sum.dtype) if self.lm_reduction == "mean" else loss_sum
        return loss, s_tilde, n_tok

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, bucket: int = 0) -> torch.Tensor:
        """LLM(t) (Eq. 1-2, and e = LLM(T) in Eq. 15): pooled last hidden state of each text.

        Args:
            input_ids: ``[N, T]`` right-padded tokens of N texts.
            attention_mask: ``[N, T]``; a row of zeros (padding text) gives a zero vector.
            bucket: > 0 runs the texts in length-sorted chunks of at most ``bucket``, each cut to its own longest
                text, so short titles are not padded to the longest comment. Exact: attention is causal and the
                padding is on the right, so a text's real positions never see the cut columns.

        Returns:
            ``[N, H]`` float32 (mean over real tokens, or the last real token when ``pooling='last'``).
        """
        n = input_ids.shape[0]
        if 0 < bucket < n:
            lengths = attention_mask.long().sum(1)  # [N]
            order = torch.argsort(lengths, stable=True)
            parts = []
            for idx in order.split(bucket):
                t = max(int(lengths[idx].max()), 1)
                parts.append(self.encode_text(input_ids[idx, :t], attention_mask[idx, :t]))
            return torch.cat(parts)[torch.argsort(order)]  # back to the caller's order; autograd flows through
        h = self.hidden_states(input_ids, attention_mask).float()  # [N, T, H]
        m = attention_mask.to(h.dtype)  # [N, T]
        if self.pooling == "mean":
            return (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)
        last = (attention_mask.long().sum(1) - 1).clamp(min=0)  # right padding: last real token
        out = h[torch.arange(h.shape[0], device=h.device), last]
        return out * (m.sum(1, keepdim=True) > 0).to(out.dtype)
