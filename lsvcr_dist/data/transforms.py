"""AlignTransform (INSTANCE rows -> ``schema.ALIGN_BATCH``) and TextTokenizer (text ids -> LLM(t) token tensors).

``AlignTransform`` is a callable class for ``ray.data.Dataset.map_batches(AlignTransform,
fn_constructor_kwargs={...}, batch_format="pyarrow")``; tests call it directly on a pyarrow table or a dict of
ndarrays. Per row it keeps the most recent LH records, chooses each video record's popular comment and applies
ComDiv (``comdiv.py``), renders + tokenizes the paper's instruction (``prompts.py``) and emits fixed-shape int64
arrays. Randomness is a ``np.random.Generator`` seeded from ``(seed, epoch, user_id, timestamp, task)``, so a row
gets the same draw whatever batch it lands in. No Ray import (boundary rule).

Comment-task target: like the public code, the target text is one of the record's positive comments
(``target_comments``) drawn uniformly each epoch; ``target_comment`` and ``target_text_id`` of the output are that
comment, so the SR side's target and the LLM's target text agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from lsvcr_dist import schema
from lsvcr_dist.data.comdiv import ComDiv
from lsvcr_dist.data.history import keep_recent
from lsvcr_dist.data.manifest import read_dims
from lsvcr_dist.data.tables import TextLookup, load_popular_comments
from lsvcr_dist.data.prompts import TASK_COMMENT, TASK_VIDEO, fit_instruction, prompt_length, tokenize_prompt

OUT_KEYS = tuple(schema.ALIGN_BATCH)


class TextTokenizer:
    """Text ids -> fixed-width LLM(t) token arrays for the online text path and the encode job.

    Args:
        tokenizer: an HF tokenizer (``build_tokenizer``); texts are encoded with its special tokens.
        texts: a ``TextLookup``.
        max_text_len: tokens kept per text (``LLMConfig.max_text_len``).
    """

    def __init__(self, tokenizer, texts: TextLookup, max_text_len: int) -> None:
        self.tokenizer, self.texts, self.max_text_len = tokenizer, texts, int(max_text_len)

    @classmethod
    def from_data_dir(cls, data_dir: str | Path, llm) -> "TextTokenizer":
        """Build from the prepared data folder and an ``LLMConfig`` (or its dict)."""
        from lsvcr_dist.config import LLMConfig
        from lsvcr_dist.models.llm_builders import build_tokenizer

        llm = LLMConfig(**llm) if isinstance(llm, dict) else llm
        dims = read_dims(data_dir)
        return cls(build_tokenizer(llm), TextLookup(data_dir, dims["num_videos"], dims["num_comments"]),
                   llm.max_text_len)

    def tokenize(self, text_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of each text, right-padded (id 0 gives an all-padding row with a zero mask).

        Args:
            text_ids: ``[N]`` text ids.

        Returns:
            ``(input_ids [N, max_text_len], attention_mask [N, max_text_len])`` int64.
        """
        t = np.asarray(text_ids, dtype=np.int64).reshape(-1)
        ids = np.full((len(t), self.max_text_len), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(t), self.max_text_len), dtype=np.int64)
        real = np.flatnonzero(t > 0)
        if len(real):
            enc = self.tokenizer(self.texts.texts(t[real]), add_special_tokens=True, truncation=True,
                                 max_length=self.max_text_len)["input_ids"]
            for row, toks in zip(real, enc):
                ids[row, : len(toks)] = toks
                mask[row, : len(toks)] = 1
        return ids, mask

    def unique(self, text_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Tokenize each distinct non-zero id once.

        Args:
            text_ids: any shape ``[...]``.

        Returns:
            ``(unique_ids [U], index [...], input_ids [U, Tl], attention_mask [U, Tl])`` where ``index`` points
            into ``concat([zero_row, encode(unique)])``: 0 for padding id 0, ``1 + position`` otherwise.
        """
        t = np.asarray(text_ids, dtype=np.int64)
        uniq = np.unique(t[t > 0])
        index = np.where(t > 0, np.searchsorted(uniq, np.maximum(t, 1)) + 1, 0)
        ids, mask = self.tokenize(uniq)
        return uniq, index, ids, mask


# ------------------------------------------------------------------------------------------------ align transform
class AlignTransform:
    """Callable class for ``map_batches``: INSTANCE rows -> ALIGN_BATCH ndarrays (Section 3.2-3.3).

    Args:
        data_dir: prepared data folder (manifest and tables are read once per actor).
        llm: ``LLMConfig`` as a dict (``dataclasses.asdict``) or object: tokenizer and prompt/target lengths.
        comdiv: ``ComDivConfig`` as a dict or object (None = defaults).
        align_hist_len: LH records kept per history (<= prepared L); 0 = the manifest's ``LA``.
        seed: base seed.
        epoch: epoch (a new ComDiv/popular-comment draw every epoch).
        popular_top: popular comments a video record draws from (public code: 3).
    """

    def __init__(self, data_dir: str, llm, comdiv=None, align_hist_len: int = 0, seed: int = 0, epoch: int = 0,
                 popular_top: int = 3) -> None:
        from lsvcr_dist.config import LLMConfig
        from lsvcr_dist.models.llm_builders import build_tokenizer

        self.llm = LLMConfig(**llm) if isinstance(llm, dict) else llm
        cd = comdiv if isinstance(comdiv, dict) or comdiv is None else vars(comdiv)
        self.comdiv = ComDiv.from_dict({**(cd or {}), "popular_top": popular_top})
        self.dims = read_dims(data_dir)
        self.lh = int(align_hist_len) or int(self.dims.get("LA", self.dims["L"]))
        if self.lh > int(self.dims["L"]):
            raise ValueError(f"align_hist_len={self.lh} exceeds the prepared history length L={self.dims['L']}")
        self.num_videos, self.num_comments = int(self.dims["num_videos"]), int(self.dims["num_comments"])
        self.popular = load_popular_comments(data_dir, self.num_videos)  # [V + 1, P]
        self.texts = TextLookup(data_dir, self.num_videos, self.num_comments)
        self.tokenizer = build_tokenizer(self.llm)
        self.seed, self.epoch = int(seed), int(epoch)
        self.t_len = prompt_length(self.llm.max_prompt_len, self.llm.max_target_len)

    def out_dims(self) -> dict[str, int]:
        """Symbolic dims of the output (``LH``, ``K``, ``T``) for ``schema.numpy_to_table``."""
        return {"LH": self.lh, "K": int(self.dims["K"]), "T": self.t_len}

    def _row(self, r: dict, i: int) -> dict:
        """One output row from column arrays ``r`` at index ``i``."""
        task = int(r["task"][i])
        rng = np.random.default_rng([self.seed, self.epoch, int(r["user_id"][i]), int(r["timestamp"][i]), task])
        vh, ch, cc = r["video_hist"][i], r["comment_hist_video"][i], r["comment_hist_comments"][i]
        v_llm, v_sr = self.comdiv.video_comments(self.popular[vh], vh > 0, rng)
        c_llm, c_sr = self.comdiv.comment_records(cc, self.popular[ch], ch > 0, rng, self.num_comments)
        title, text = self.texts.title, self.texts.comment
        video_records = [(title(v), text(c) if c else "") for v, c in zip(vh, v_llm) if v > 0]
        comment_records = [(title(v), [text(c) for c in cs if c > 0]) for v, cs in zip(ch, c_llm) if v > 0]
        if task == TASK_VIDEO:
            target = int(r["target_video"][i])
            if target <= 0:
                raise ValueError(f"video-task row (user {int(r['user_id'][i])}) has target_video={target}")
            target_text, text_id, target_comment, current = title(target), target, 0, ""
        elif task == TASK_COMMENT:
            pos = r["target_comments"][i]
            pos = pos[pos > 0] if (pos > 0).any() else np.asarray([r["target_comment"][i]])
            target_comment = int(pos[rng.integers(len(pos))])
            if target_comment <= 0:
                raise ValueError(f"comment-task row (user {int(r['user_id'][i])}) has no target comment")
            target_text, text_id = text(target_comment), self.num_videos + target_comment
            target, current = 0, title(int(r["current_video"][i]))
        else:
            raise ValueError(f"row {i}: column 'task' is {task}, expected {TASK_VIDEO} or {TASK_COMMENT}")
        instr, _, _ = fit_instruction(self.tokenizer, task, video_records, comment_records, current,
                                      self.llm.max_prompt_len)
        out = tokenize_prompt(self.tokenizer, instr, target_text, self.llm.max_prompt_len, self.llm.max_target_len)
        out.update(task=task, user_id=int(r["user_id"][i]), video_hist=vh, video_hist_comment=v_sr, comment_hist_video=ch,
                   comment_hist_comments=c_sr, current_video=int(r["current_video"][i]), target_video=target,
                   target_comment=target_comment, target_text_id=text_id)
        return out

    def __call__(self, batch) -> dict[str, np.ndarray]:
        """Transform one batch (pyarrow Table or dict of ndarrays with the INSTANCE columns).

        Returns:
            dict of int64 ndarrays with every ``schema.ALIGN_BATCH`` key: ``[B]`` scalars, histories ``[B, LH]``,
            ``comment_hist_comments [B, LH, K]``, prompt columns ``[B, T]``.

        Raises:
            schema.SchemaError: missing input columns (named).
        """
        need = ("user_id", "task", "timestamp", "video_hist", "video_hist_len", "comment_hist_video",
                "comment_hist_comments", "comment_hist_len", "current_video", "target_video", "target_comment",
                "target_comments")
        names = batch.column_names if isinstance(batch, pa.Table) else list(batch)
        missing = [c for c in need if c not in names]
        if missing:
            raise schema.SchemaError(f"align transform input: missing columns {missing}")
        if isinstance(batch, pa.Table):
            spec = {k: schema.INSTANCE[k] for k in need}
            batch = schema.table_to_numpy(batch.select(list(need)), spec, self.dims)
        b = {k: np.asarray(batch[k]).astype(np.int64) for k in need}
        r = dict(b)
        r["video_hist"] = keep_recent(b["video_hist"], b["video_hist_len"], self.lh)
        r["comment_hist_video"] = keep_recent(b["comment_hist_video"], b["comment_hist_len"], self.lh)
        r["comment_hist_comments"] = keep_recent(b["comment_hist_comments"], b["comment_hist_len"], self.lh)
        rows = [self._row(r, i) for i in range(len(b["task"]))]
        if not rows:
            dims = self.out_dims()
            return {k: np.zeros((0, *schema.resolve_shape(c.shape, dims)), np.int64)
                    for k, c in schema.ALIGN_BATCH.items()}
        return {k: np.ascontiguousarray(np.stack([np.asarray(x[k]) for x in rows]), dtype=np.int64)
                for k in OUT_KEYS}
