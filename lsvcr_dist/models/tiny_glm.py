"""A tiny random GLM and the bundled offline tokenizer (CI, the README demo, unit tests).

Nothing here touches the network: the tokenizer is a small byte-level BPE trained in code on an English corpus
(the paper's two instruction templates, their record labels and a few hundred generic words) and saved once into
``lsvcr_dist/assets/tiny_tokenizer``. Byte-level means any text (emoji, Chinese, typos) still tokenizes, just into
more pieces. ``build_tiny_tokenizer(out_dir)`` rebuilds the same files; ``tests/models/test_llm_tokenizer.py`` checks
the bundled copy equals a rebuild.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_tokenizer"
SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
TINY_VOCAB_SIZE = 3072

# The templates are duplicated here (not imported from data/prompts.py) so the bundled vocabulary never changes when
# a prompt's wording is edited; merges covering these words keep tiny prompts short.
_TEMPLATE_TEXT = (
    "A user has interacted with the following videos: , and his/her comment interaction history is as follows: . "
    "Please recommend the next video for him/her based on these interaction histories: "
    "A user's comment interaction history is as follows: , and he/she has interacted with the following videos: . "
    "Now he/she is watching a video: . Please generate a potentially interactive comment based on the above "
    "historical interactions and the current video content: "
    "Title: ; Popular comment: ; Comments: | 1. 2. 3. 4. 5. 6. 7. 8. 9. 10. 11. 12. 13. 14. 15. 16. 17. 18. 19. 20."
)
_WORDS = """
the a an and or but of to in on at for with from by about as into like through after over between out against during
without before under around among is are was were be been being have has had do does did will would can could should
may might must shall this that these those it its they them their he she his her him we us our you your i me my who
what which when where why how all any both each few more most other some such no nor not only own same so than too
very just now then here there up down again further once new old good bad best great little big small long short high
low first last next early late young happy sad funny cute amazing beautiful awesome cool nice love loved lovely like
likes liked watch watching watched video videos clip clips short title titles comment comments popular reply replies
user users recommend recommendation history interaction interactions content current generate potentially
interactive based above following previous today tonight tomorrow yesterday week weekend morning night day days year
years time times life world home family friend friends dog dogs cat cats pet pets baby kids food cooking recipe
recipes cake pizza noodles rice tea coffee dinner lunch breakfast delicious tasty spicy sweet travel trip city
mountain mountains beach sea river lake snow winter summer spring autumn rain sun sky music song songs dance dancing
singer sing singing guitar piano game games gaming play player players team match goal win won lose lost football
basketball soccer tennis olympics olympic figure skating skiing sports sport fitness workout gym yoga running car cars
drive driving road phone review unboxing tech technology computer camera photo photos art drawing painting craft
diy fashion makeup style outfit hair beauty movie movies film films show shows episode series drama comedy anime
cartoon news story stories history science nature animal animals bird birds fish flower flowers garden farm school
student students teacher class study learn learning book books reading english chinese language tips tricks tutorial
how guide challenge prank vlog live stream streaming highlights moments best top funniest epic fail fails wow omg
haha lol yes yeah thanks thank please sorry hello hi bye welcome congratulations congrats agree true real really
totally absolutely definitely maybe never always sometimes everyone everything someone something nothing again
part one two three four five six seven eight nine ten hundred thousand million second minute hour beijing china
review daily street dance rap rock pop classical band concert festival party wedding birthday holiday christmas
new year spring festival lantern dragon panda tiger horse magic trick puzzle quiz answer question questions
topic topics item items record records list next previous interest interests channel creator creators subscribe
follow followers share shared collect collected watch later favorite favourite cheer cheering support supporting
""".split()
_SYNTH = [f"{c}{v}{e}" for c in "bdfgklmnprstvz" for v in "aeiou" for e in ("", "n", "r", "s", "la", "to")]


def tiny_corpus() -> list[str]:
    """The fixed English training corpus of the tiny tokenizer (deterministic, no randomness)."""
    lines = [_TEMPLATE_TEXT] * 8
    words = _WORDS + _SYNTH
    for i in range(0, len(words), 12):
        chunk = words[i:i + 12]
        lines.append(" ".join(chunk))
        lines.append(" ".join(w.capitalize() for w in chunk) + ".")
    lines += [f"Title: {a} {b}; Popular comment: {b} {a}!" for a, b in zip(words, words[7:])]
    lines += [" ".join(str(n) for n in range(k, k + 20)) for k in range(0, 200, 20)]
    return lines


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = TINY_VOCAB_SIZE) -> Path:
    """Train the byte-level BPE on ``tiny_corpus()`` and save ``tokenizer.json`` + ``tokenizer_config.json``.

    Args:
        out_dir: folder to write (created).
        vocab_size: target vocabulary size including the 4 special tokens.

    Returns:
        ``out_dir`` as a Path; ``AutoTokenizer.from_pretrained(out_dir)`` loads it offline.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIAL_TOKENS[k] for k in ("pad_token", "eos_token", "bos_token", "unk_token")]  # ids 0..3
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    # A <bos> in front of an instruction (add_special_tokens=True), nothing around a target or a short text.
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        **SPECIAL_TOKENS,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")
    return out


def load_tiny_tokenizer(path: str | Path = TINY_TOKENIZER_DIR):
    """The bundled tokenizer as a ``PreTrainedTokenizerFast`` (offline).

    Raises:
        FileNotFoundError: the folder has no ``tokenizer.json`` (rebuild with ``build_tiny_tokenizer``).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path}/tokenizer.json is missing; rebuild it with "
            "`python -c 'from lsvcr_dist.models.tiny_glm import build_tiny_tokenizer as b; b(\"{path}\")'`"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tiny_glm_config(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                    num_kv_heads: int = 2, ffn_size: int = 128, vocab_size: int = 0,
                    max_position: int = 4096):
    """A small ``transformers.GlmConfig`` whose special ids live inside the tokenizer's vocabulary.

    ``GlmConfig`` keeps GLM-4's ids (pad 151329) unless told otherwise; an embedding row that does not exist would
    fail only at the first padded batch, so pad/eos/bos come from ``tokenizer`` here.

    Args:
        tokenizer: the tokenizer the model will read (its ``len`` sets the vocabulary unless ``vocab_size``).
        hidden_size: width H; must be divisible by ``num_heads``.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key-value groups (GQA); divides ``num_heads``.
        ffn_size: MLP width.
        vocab_size: rows of the embedding; 0 = ``len(tokenizer)``.
        max_position: longest sequence (RoPE table).

    Returns:
        A ``GlmConfig`` (GLM-4 architecture) with random init left to ``GlmForCausalLM(config)``.

    Raises:
        ValueError: shapes that do not divide, or a vocabulary smaller than the tokenizer's.
    """
    from transformers import GlmConfig

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"hidden_size={hidden_size}, num_heads={num_heads}, num_kv_heads={num_kv_heads} do not divide")
    vocab = vocab_size or len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"llm.vocab_size={vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
    return GlmConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=ffn_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        use_cache=False,
    )
