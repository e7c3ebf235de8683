"""How much a text-embedding store keeps: geometry and a linear topic probe of the title vectors.

    python benchmarks/store_probe.py --store RUN/embeddings/base --data RUN/data [--num-topics 16] [--out F.json]

Reports, for the video titles of a store written by ``jobs/encode_text.py``:

* the manifest's spread statistics (``embeddings.StoreStats``: mean pairwise cosine, offset vs spread);
* the mean pairwise cosine after centring the titles on their mean (what is left once the shared offset is gone);
* linear-probe accuracy of each title's primary topic (synthetic logs only: the topic is the one whose noun list
  holds the title's first topic noun, ``data/generate_vocab.py``): multinomial logistic regression on standardised
  vectors, trained on a seeded 70 % of the titles and scored on the rest, beside the majority-class rate.

The probe is invariant to centring and scaling (it standardises), so it measures what information a pooling keeps;
the cosine measures how the SR model's cosine logits see it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def title_topics(titles: list[str], num_topics: int) -> np.ndarray:
    """``[V]`` primary topic of each title (-1 when no topic noun occurs): the topic of its first topic noun."""
    from lsvcr_dist.data.generate_vocab import topic_words

    nouns, _ = topic_words(num_topics)
    owner = {}
    for t, words in enumerate(nouns):
        for w in words:
            owner.setdefault(w, set()).add(t)
    out = np.full(len(titles), -1, np.int64)
    for i, title in enumerate(titles):
        for w in title.split():
            if len(owner.get(w, ())) == 1:
                out[i] = next(iter(owner[w]))
                break
    return out


def mean_pairwise_cosine(x: np.ndarray) -> float:
    """Mean cosine over all pairs of distinct non-zero rows of ``x [N, D]``."""
    n = np.linalg.norm(x, axis=1)
    u = x[n > 0] / n[n > 0, None]
    m = len(u)
    s = u.sum(0)
    return float((s @ s - m) / (m * (m - 1)))


def linear_probe(x: np.ndarray, y: np.ndarray, seed: int = 0, steps: int = 300) -> dict:
    """Held-out accuracy of a multinomial logistic regression (L2 1e-3, LBFGS) on standardised ``x``."""
    import torch

    keep = y >= 0
    x, y = x[keep].astype(np.float64), y[keep]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    cut = int(0.7 * len(y))
    tr, te = perm[:cut], perm[cut:]
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-8
    xt = torch.tensor((x - mu) / sd, dtype=torch.float64)
    yt = torch.tensor(y)
    k = int(y.max()) + 1
    w = torch.zeros(x.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt[tr] @ w + b, yt[tr]) + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = float(((xt[te] @ w + b).argmax(1) == yt[te]).double().mean())
    majority = float(np.bincount(y[te]).max() / len(te))
    return {"accuracy": acc, "majority": majority, "n_train": len(tr), "n_test": len(te), "classes": k}


def probe_titles(vectors: np.ndarray, titles: list[str], num_topics: int) -> dict:
    """All measurements of ``[V, D]`` title vectors."""
    y = title_topics(titles, num_topics)
    centred = vectors - vectors.mean(0, keepdims=True)
    return {"mean_pairwise_cosine": mean_pairwise_cosine(vectors),
            "mean_pairwise_cosine_centred": mean_pairwise_cosine(centred),
            "probe": linear_probe(vectors, y), "labelled": int((y >= 0).sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="embedding store folder (run_dir/embeddings/<which>)")
    p.add_argument("--data", required=True, help="prepared data folder (run_dir/data) for the titles")
    p.add_argument("--num-topics", type=int, default=16, help="generate.num_topics of the synthetic logs")
    p.add_argument("--out", default="", help="write the result as JSON here")
    args = p.parse_args(argv)
    import pyarrow.parquet as pq

    from lsvcr_dist.embeddings import EmbeddingStore

    store = EmbeddingStore.open(args.store)
    table = pq.read_table(Path(args.data) / "tables" / "videos.parquet", columns=["video_id", "title"])
    ids = table.column("video_id").to_numpy()
    res = {"store": str(args.store), "manifest_stats": store.manifest.get("stats"),
           **probe_titles(store.lookup(ids), table.column("title").to_pylist(), args.num_topics)}
    text = json.dumps(res, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
