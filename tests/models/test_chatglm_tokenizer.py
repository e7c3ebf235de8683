"""ChatGLM3's SentencePiece tokenizer converted to a fast tokenizer encodes the paper's prompts as ChatGLM3 does.

The reference follows ChatGLM3's ``tokenization_chatglm.py`` rules on top of ``SentencePieceProcessor`` (what that
tokenizer wraps): text -> ``sp.encode(text)``, special strings inside text stay text, ``[gMASK] sop`` prefix with
special tokens, the nine specials numbered after the model's pieces, eos ``</s>``, pad ``<unk>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from lsvcr_dist.config import LLMConfig
from lsvcr_dist.data.prompts import fit_instruction, render_prompt, tokenize_prompt
from lsvcr_dist.models.chatglm_tokenizer import CHATGLM3_SPECIAL_TOKENS, convert_chatglm3_tokenizer
from lsvcr_dist.models.llm_builders import build_tokenizer
from lsvcr_dist.models.tiny_glm import tiny_corpus
from lsvcr_dist.schema import TASK_COMMENT, TASK_VIDEO

sys.path.insert(0, str(Path(__file__).parent))
from _chatglm_fakes import train_sentencepiece  # noqa: E402

CHINESE = ["视频标题：今天的晚饭；热门评论：太好吃了！", "用户交互评论：{'哈哈', '好看'}", "北京的冬天 下雪了 ❄️",
           "猫咪和狗狗一起玩耍，太可爱了"]


class ChatGLM3Reference:
    """ChatGLM3's tokenizer rules over a SentencePiece model (the callable subset prompts.py uses)."""

    def __init__(self, model_file: Path) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        n = self.sp.vocab_size()
        self.special = {t: n + i for i, t in enumerate(CHATGLM3_SPECIAL_TOKENS)}
        self.eos_token_id, self.pad_token_id = self.sp.eos_id(), self.sp.unk_id()

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = self.sp.encode(text)
        prefix = [self.special["[gMASK]"], self.special["sop"]] if add_special_tokens else []
        return {"input_ids": prefix + ids}


def _records(rng: np.random.Generator):
    words = tiny_corpus()[20:60]
    pick = lambda: str(rng.choice(words))[: int(rng.integers(5, 60))]  # noqa: E731
    video = [(pick() + " " + CHINESE[i % 4], pick() if i % 3 else "") for i in range(6)]
    video.append(("isopropyl sop eop [gMASK] </s> <unk>  two  spaces", "emoji 😀🎉 ½ ﬁ\ttab"))
    comments = [(CHINESE[i % 4], [pick(), CHINESE[(i + 1) % 4]]) for i in range(4)]
    return video, comments


@pytest.fixture(scope="module", params=[True, False], ids=["chatglm-normalizer", "nfkc-collapse"])
def converted(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    lines = tiny_corpus() + CHINESE * 4
    model = train_sentencepiece(folder / "tokenizer.model", lines, vocab_size=1200, chatglm_like=request.param)
    out = convert_chatglm3_tokenizer(model, folder / "fast", model_max_length=8192)
    return ChatGLM3Reference(model), build_tokenizer(LLMConfig(kind="hf", path=str(out)))


def test_special_ids_and_prefix_follow_chatglm3(converted):
    ref, tok = converted
    n = ref.sp.vocab_size()
    assert len(tok) == n + 9
    assert [tok.convert_tokens_to_ids(t) for t in CHATGLM3_SPECIAL_TOKENS] == list(range(n, n + 9))
    assert (tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 0, 0)
    assert (tok.eos_token, tok.pad_token) == ("</s>", "<unk>")
    assert tok("video")["input_ids"][:2] == [n + 1, n + 3]  # [gMASK] sop
    assert tok("a", "b")["input_ids"] == [n + 1, n + 3] + ref.sp.encode("a") + ref.sp.encode("b") + [2]
    assert tok.padding_side == "right"  # the project pads by hand; build_tokenizer sets right


def test_paper_prompts_encode_identically(converted):
    ref, tok = converted
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(6):
        video, comments = _records(rng)
        for task in (TASK_VIDEO, TASK_COMMENT):
            text = render_prompt(task, video, comments, current_title=CHINESE[trial % 4] + " sop")
            assert tok(text)["input_ids"] == ref(text)["input_ids"], text
            assert tok(text, add_special_tokens=False)["input_ids"] == ref.sp.encode(text)
            checked += 1
    assert checked == 12
    for text in ["", " ", "  lead and trail  ", "\n", "a\n\nb", "1234567 8.9", "[gMASK]sop<|user|>"] + CHINESE:
        assert tok(text, add_special_tokens=False)["input_ids"] == ref.sp.encode(text), repr(text)


def test_prompt_arrays_equal_through_the_project_pipeline(converted):
    """fit_instruction + tokenize_prompt (the ALIGN batch columns) give the same arrays with either tokenizer."""
    ref, tok = converted
    video, comments = _records(np.random.default_rng(1))
    for task, budget in ((TASK_VIDEO, 400), (TASK_COMMENT, 120)):  # 120 forces dropping old records
        a = fit_instruction(tok, task, video, comments, CHINESE[0], budget)
        b = fit_instruction(ref, task, video, comments, CHINESE[0], budget)
        assert a == b
        pa = tokenize_prompt(tok, a[0], CHINESE[1] + " target sop", budget, 32)
        pb = tokenize_prompt(ref, b[0], CHINESE[1] + " target sop", budget, 32)
        for k in pa:
            assert np.array_equal(pa[k], pb[k]), k
    assert a[1] + a[2] < len(video) + len(comments)  # the short budget really cut records


def test_decode_gives_the_text_back(converted):
    ref, tok = converted
    text = "Title: 好看的猫; Popular comment: wow 😀\n2. Title: x"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == ref.sp.decode(ids[2:])


def test_unsupported_models_are_refused(tmp_path):
    import sentencepiece as spm

    bad = tmp_path / "garbage.model"
    bad.write_bytes(b"not a protobuf at all \x00\xff")
    with pytest.raises(ValueError, match="garbage.model"):
        convert_chatglm3_tokenizer(bad, tmp_path / "o1")
    uni = tmp_path / "uni"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(tiny_corpus()), model_prefix=str(uni), vocab_size=300,
                                   model_type="unigram", minloglevel=2, num_threads=1)
    with pytest.raises(ValueError, match="not BPE"):
        convert_chatglm3_tokenizer(f"{uni}.model", tmp_path / "o2")
    with pytest.raises(FileNotFoundError, match="no SentencePiece"):
        convert_chatglm3_tokenizer(tmp_path / "absent.model", tmp_path / "o3")
