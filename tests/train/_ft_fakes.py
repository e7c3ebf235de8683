"""Tiny stand-ins for fine-tune / evaluation / export tests: a prepared data dir, a text store, an aligned SR file.

Data has a learnable signal: a user's next video is ``(last video in history + 1)`` wrapped into 1..V, and the
positive comment of the comment task is the watched video's first comment.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml
from safetensors.torch import save_file

from lsvcr_dist import schema
from lsvcr_dist.config import FinetuneStageConfig, SRConfig

V, C_PER_VIDEO = 30, 6
C = V * C_PER_VIDEO
DIMS = {"L": 6, "LA": 4, "K": 2, "P": 4, "NV": 10, "NC": 8, "NT": 5}
TEXT_DIM = 8


def comments_of(v: int) -> np.ndarray:
    """Comment ids under video v (1-based, contiguous blocks)."""
    return np.arange((v - 1) * C_PER_VIDEO + 1, v * C_PER_VIDEO + 1)


def _rows(rng: np.random.Generator, n: int, split: str, task: int) -> dict[str, np.ndarray]:
    L, K, NV, NC, NT = (DIMS[k] for k in ("L", "K", "NV", "NC", "NT"))
    out = {k: [] for k in schema.INSTANCE}
    for i in range(n):
        hl = int(rng.integers(1, L + 1))
        start = int(rng.integers(1, V + 1))
        vh = np.zeros(L, np.int64)
        vh[:hl] = (np.arange(start, start + hl) - 1) % V + 1
        chl = int(rng.integers(1, L + 1))
        chv = np.zeros(L, np.int64)
        chv[:chl] = rng.integers(1, V + 1, chl)
        chc = np.zeros((L, K), np.int64)
        for j in range(chl):
            chc[j, 0] = comments_of(int(chv[j]))[0]
        nxt = int(vh[hl - 1]) % V + 1
        cur = int(rng.integers(1, V + 1)) if task == 1 else 0
        tgt_c = int(comments_of(cur)[0]) if task == 1 else 0
        cand_v = np.zeros(NV, np.int64)
        cand_c = np.zeros(NC, np.int64)
        cmask = np.zeros(NC, np.int64)
        tcc = np.zeros(NT, np.int64)
        if task == 0 and split != "train":
            others = rng.permutation(np.setdiff1d(np.arange(1, V + 1), [nxt]))[: NV - 1]
            cand_v = rng.permutation(np.concatenate([[nxt], others]))
        if task == 1 and split != "train":
            cs = comments_of(cur)
            cand_c[: len(cs)] = rng.permutation(cs)
            cmask[: len(cs)] = 1
        if task == 1 and split == "train":
            tcc[:] = np.concatenate([[tgt_c], comments_of(cur)[1:NT]])
        tk = np.zeros(K, np.int64)
        tk[0] = tgt_c
        vals = dict(user_id=i % 7 + 1, task=task, timestamp=1000 + i, hist_last_ts=999 + i, video_hist=vh,
                    video_hist_len=hl, comment_hist_video=chv, comment_hist_comments=chc, comment_hist_len=chl,
                    current_video=cur, target_video=nxt if task == 0 else 0, target_comment=tgt_c,
                    target_comments=tk, cand_videos=cand_v, cand_comments=cand_c, cand_comment_mask=cmask,
                    train_comment_cands=tcc, target_seen=int(i % 3 != 0), user_seen=int(i % 4 != 0))
        for k, v in vals.items():
            out[k].append(v)
    return {k: np.asarray(v) for k, v in out.items()}


def make_prepared(root: Path, rows: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write ``root/data`` (manifest, video table, one Parquet shard per split with both tasks). Returns root."""
    rows = rows or {"train": 40, "val": 12, "test": 12}
    rng = np.random.default_rng(seed)
    data = Path(root) / "data"
    shards = {}
    for split, n in rows.items():
        d = data / "parquet" / split
        d.mkdir(parents=True, exist_ok=True)
        parts = [_rows(rng, n, split, 0), _rows(rng, n, split, 1)]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in schema.INSTANCE}
        pq.write_table(schema.numpy_to_table(batch, schema.INSTANCE, DIMS), d / "part-00000.parquet")
        shards[split] = [f"parquet/{split}/part-00000.parquet"]
    pop = np.zeros((V, DIMS["P"]), np.int64)
    for v in range(1, V + 1):
        n_pop = 0 if v == 1 else (1 if v == 2 else DIMS["P"])  # video 1: none, video 2: one popular comment
        pop[v - 1, :n_pop] = comments_of(v)[:n_pop]
    vt = {"video_id": np.arange(1, V + 1), "title": np.array([f"t{v}" for v in range(1, V + 1)], dtype=object),
          "popular_comments": pop, "num_comments": np.full(V, C_PER_VIDEO)}
    (data / "tables").mkdir(parents=True, exist_ok=True)
    pq.write_table(schema.numpy_to_table(vt, schema.VIDEO_TABLE, DIMS), data / "tables" / "videos.parquet")
    manifest = {"schema_version": schema.SCHEMA_VERSION, "num_users": 7, "num_videos": V, "num_comments": C,
                "dims": DIMS, "splits": {s: {"video": n, "comment": n} for s, n in rows.items()},
                "shards": {"parquet": shards}, "tables": {}, "filtered": {}, "seed": seed, "raw_dir": ""}
    (data / "manifest.json").write_text(json.dumps(manifest))
    return Path(root)


def text_table(dim: int = TEXT_DIM, seed: int = 0) -> torch.Tensor:
    """``[1 + V + C, dim]`` random text vectors, row 0 zeros."""
    t = torch.randn(1 + V + C, dim, generator=torch.Generator().manual_seed(seed))
    t[0] = 0
    return t


def write_store(path: Path, table: torch.Tensor) -> Path:
    """Write ``table`` as an EmbeddingStore with the library's own writer."""
    from lsvcr_dist.embeddings import EmbeddingWriter

    w = EmbeddingWriter(path, table.shape[1], V, C, shard_rows=64, meta={"projected": True})
    w.write(np.arange(1, V + C + 1), table[1:].numpy())
    w.close()
    return path


def ft_config(run_dir: Path, **kw) -> FinetuneStageConfig:
    """Small fine-tune config (d = 8, text_dim = 8)."""
    sr = SRConfig(dim=8, n_layers=1, n_heads=2, inner_size=16, dropout=0.0, max_position=DIMS["L"],
                  text_dim=TEXT_DIM, text_mlp_hidden=12)
    cfg = FinetuneStageConfig(run_dir=str(run_dir), sr=sr, **kw)
    cfg.loss.reg_negatives = 5
    return cfg


def write_aligned(run_dir: Path, cfg: FinetuneStageConfig, base_dim: int = 12, rows: int | None = None,
                  rand_pos: bool = True, dim: int | None = None) -> dict[str, torch.Tensor]:
    """An align-stage ``final/`` folder: SR weights of a text-only model (with text MLP) + config.yaml."""
    from lsvcr_dist.models.builders import build_sr_model

    s = cfg.sr
    torch.manual_seed(1)
    sr = build_sr_model(text_in_dim=base_dim, dim=dim or s.dim, n_layers=s.n_layers, n_heads=s.n_heads,
                        inner_size=s.inner_size, dropout=s.dropout, max_position=rows or s.max_position,
                        text_dim=s.text_dim, text_mlp_hidden=s.text_mlp_hidden, use_text_mlp=True, num_videos=0)
    final = Path(run_dir) / "align" / "final"
    final.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in sr.state_dict().items()}
    save_file(state, str(final / "sr.safetensors"))
    (final / "config.yaml").write_text(yaml.safe_dump({"rand_pos": rand_pos}))
    return state
