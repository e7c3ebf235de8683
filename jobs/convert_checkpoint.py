"""Convert an LLM checkpoint folder into the native transformers layout the project loads without remote code.

    python jobs/convert_checkpoint.py --from chatglm --src /models/chatglm3-6b --out /models/chatglm3-6b-glm

``--from chatglm``: a ChatGLM3-6B (or ChatGLM2 / GLM-4-9B-chat original-format) folder with ``config.json``
(``model_type: chatglm``), its weights (safetensors or ``pytorch_model*.bin``, sharded with an index or single) and
``tokenizer.model`` -> a ``GlmForCausalLM`` folder (safetensors shards + index, ``config.json``) plus a fast
tokenizer that encodes like ChatGLM3's (``[gMASK] sop`` prefix, ``</s>`` eos, ``<unk>`` pad). Use it with
``llm.kind=hf llm.path=OUT llm.trust_remote_code=false``. GLM-4's tiktoken tokenizer is not converted: add
``--no-tokenizer`` and point ``llm.tokenizer_path`` at a native GLM-4 tokenizer. Tensors are streamed one at a time
(memory stays near one output shard); ``--out`` must be new or empty. Prints the summary as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _cli import DEFAULT_ENV  # importing _cli also puts the repository on sys.path when run from a checkout


def main(argv: list[str] | None = None) -> int:
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source_format", required=True, choices=["chatglm"],
                   help="layout of --src (chatglm: ChatGLM2/3, GLM-4 original format)")
    p.add_argument("--src", required=True, help="checkpoint folder to read (never modified)")
    p.add_argument("--out", required=True, help="new folder to write (must not exist, or be empty)")
    p.add_argument("--dtype", default="keep", choices=["keep", "bf16", "fp16", "fp32"],
                   help="weight dtype of the output (keep = the checkpoint's own; ChatGLM3-6B ships fp16)")
    p.add_argument("--max-shard-gib", type=float, default=2.0, help="output shard size, also bounds memory")
    p.add_argument("--no-tokenizer", action="store_true", help="convert the weights only")
    args = p.parse_args(argv)
    from lsvcr_dist.models.convert_chatglm import convert_chatglm_checkpoint

    t0 = time.time()
    try:
        info = convert_chatglm_checkpoint(args.src, args.out, dtype=args.dtype,
                                          max_shard_bytes=int(args.max_shard_gib * (1 << 30)),
                                          tokenizer=not args.no_tokenizer)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: one line naming file / key
        print(f"convert_checkpoint: {e}", file=sys.stderr)
        return 1
    info["wall_s"] = round(time.time() - t0, 2)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
