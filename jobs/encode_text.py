"""Encode every title and comment with the LLM into the embedding store (Ray Data batch inference).

    python jobs/encode_text.py --config jobs/configs/tiny.yaml [which=base|aligned num_actors=2 batch_size=64]
    ray job submit --working-dir . -- python jobs/encode_text.py --config jobs/configs/tiny.yaml which=aligned
"""

from __future__ import annotations

import json
import sys

from _cli import init_ray, parse


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse("encode", __doc__.splitlines()[0], argv)
    from lsvcr_dist.embeddings import EmbeddingError
    from lsvcr_dist.encode import encode_texts

    init_ray()
    try:
        manifest = encode_texts(cfg)
    except (FileNotFoundError, EmbeddingError) as e:  # missing inputs / bad vectors: one clear line
        print(f"encode_text: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: manifest[k] for k in ("which", "model", "dim", "count", "projected", "seconds",
                                                "texts_per_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
