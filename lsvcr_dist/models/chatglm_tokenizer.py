"""ChatGLM3's SentencePiece ``tokenizer.model`` as a transformers fast tokenizer (no remote code).

ChatGLM3's own tokenizer (``tokenization_chatglm.py``, remote code) wraps a SentencePiece BPE model and adds, in
Python, nine special tokens after the model's ``n`` pieces: ``[MASK] [gMASK] [sMASK] sop eop <|system|> <|user|>
<|assistant|> <|observation|>`` get ids ``n .. n+8``. Its rules, which the converted tokenizer reproduces:

* text -> ``SentencePieceProcessor.encode(text)`` ids; special-token strings inside the text are NOT recognised
  (its ``encode_special_tokens`` is off by default), so a title containing ``sop`` stays plain text;
* ``add_special_tokens=True`` prepends the prefix ``[gMASK] sop`` (``get_prefix_tokens``); a pair ``(a, b)`` is
  ``[gMASK] sop a b </s>``;
* eos = the model's ``</s>``, pad = unk = the model's ``<unk>``; no bos is added.

The conversion reads the model proto (pieces, scores, normalizer spec) and builds a ``tokenizers`` BPE whose merges
are ranked by the score of the merged piece, as SentencePiece's BPE encoder picks them, with the normalizer steps
in SentencePiece's order (charsmap, extra-whitespace removal, dummy prefix, whitespace escaping) and byte fallback.
``tests/models/test_chatglm_tokenizer.py`` checks it against ``SentencePieceProcessor`` on the paper's prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATGLM3_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                           "<|observation|>")
PREFIX_TOKENS = ("[gMASK]", "sop")
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BPE = 2


def load_sp_proto(model_file: str | Path):
    """Parse a SentencePiece ``tokenizer.model`` into its ``ModelProto``.

    Raises:
        FileNotFoundError: no such file; ValueError: not a SentencePiece model (file named).
    """
    path = Path(model_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no SentencePiece tokenizer.model there")
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb2
    except ImportError:  # protobuf alone is enough: transformers ships the generated module
        from transformers.convert_slow_tokenizer import import_protobuf

        pb2 = import_protobuf()
    proto = pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf raises its own DecodeError type
        raise ValueError(f"{path} is not a SentencePiece model ({exc})") from exc
    if not proto.pieces:
        raise ValueError(f"{path} is not a SentencePiece model (no pieces)")
    return proto


def _bpe_merges(proto) -> list[tuple[str, str]]:
    """Merges of every normal piece from two normal pieces, best score first (ties: lower id first)."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = []
    for piece, (score, idx) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, idx, normal[left][1], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def sp_proto_to_tokenizer(proto):
    """A ``tokenizers.Tokenizer`` that encodes text like ``SentencePieceProcessor(proto).encode``.

    Raises:
        ValueError: a model type other than BPE, or user-defined pieces (neither occurs in ChatGLM3's model).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers

    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != _BPE:
        raise ValueError(f"SentencePiece model type {spec.model_type} is not BPE (ChatGLM3's is BPE); unsupported")
    user = [p.piece for p in proto.pieces if p.type == _USER_DEFINED]
    if user:
        raise ValueError(f"user-defined SentencePiece pieces {user[:5]} are not supported (ChatGLM3 has none)")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = proto.pieces[spec.unk_id].piece
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(proto), unk_token=unk, fuse_unk=True,
                               byte_fallback=bool(spec.byte_fallback)))
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        # SentencePiece trims and collapses spaces only; newlines and tabs stay.
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("\u2581", " ")]
    if spec.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    # The model's own control pieces (<unk>, <s>, </s>) are special for decoding only.
    from tokenizers import AddedToken

    controls = [p.piece for p in proto.pieces if p.type in (_CONTROL, _UNKNOWN)]
    tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in controls])
    return tok


def build_chatglm3_fast_tokenizer(model_file: str | Path):
    """ChatGLM3's tokenizer as a ``tokenizers.Tokenizer`` plus its special ids.

    Returns:
        ``(tokenizer, ids)`` with ``ids`` = ``{token: id}`` for the nine ChatGLM3 specials and ``eos``/``pad``/
        ``unk`` (``</s>``/``<unk>``/``<unk>``).

    Raises:
        ValueError: the model lacks ``</s>`` or ``<unk>``, or a ChatGLM3 special already exists as a piece.
    """
    from tokenizers import AddedToken, processors

    proto = load_sp_proto(model_file)
    tok = sp_proto_to_tokenizer(proto)
    n = len(proto.pieces)
    spec = proto.trainer_spec
    if spec.eos_id < 0 or spec.unk_id < 0:
        raise ValueError(f"{model_file}: the SentencePiece model has no eos or unk piece (ChatGLM3's has both)")
    clash = [t for t in CHATGLM3_SPECIAL_TOKENS if tok.token_to_id(t) is not None]
    if clash:
        raise ValueError(f"{model_file}: ChatGLM3 special tokens {clash} already exist as pieces")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHATGLM3_SPECIAL_TOKENS])
    ids = {t: tok.token_to_id(t) for t in CHATGLM3_SPECIAL_TOKENS}
    if [ids[t] for t in CHATGLM3_SPECIAL_TOKENS] != list(range(n, n + len(CHATGLM3_SPECIAL_TOKENS))):
        raise ValueError(f"special ids {ids} do not follow the {n} pieces as ChatGLM3 numbers them")
    eos, unk = proto.pieces[spec.eos_id].piece, proto.pieces[spec.unk_id].piece
    g, s = PREFIX_TOKENS
    tok.post_processor = processors.TemplateProcessing(
        single=f"{g} {s} $A", pair=f"{g} {s} $A $B {eos}",
        special_tokens=[(g, ids[g]), (s, ids[s]), (eos, spec.eos_id)])
    ids.update({"eos": spec.eos_id, "pad": spec.unk_id, "unk": spec.unk_id, "eos_token": eos, "unk_token": unk})
    return tok, ids


def convert_chatglm3_tokenizer(model_file: str | Path, out_dir: str | Path, model_max_length: int = 8192) -> Path:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` into ``out_dir``.

    ``AutoTokenizer.from_pretrained(out_dir)`` then loads it without remote code. ``split_special_tokens`` is set so
    that special-token strings inside a text stay text, as in ChatGLM3's tokenizer; padding is left, as there.

    Args:
        model_file: ChatGLM3's SentencePiece ``tokenizer.model``.
        out_dir: folder to write into (created).
        model_max_length: the checkpoint's ``seq_length``.

    Returns:
        ``out_dir`` as a Path.
    """
    tok, ids = build_chatglm3_fast_tokenizer(model_file)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    specials = {"eos_token": ids["eos_token"], "unk_token": ids["unk_token"], "pad_token": ids["unk_token"]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(model_max_length),
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return out
