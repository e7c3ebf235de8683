"""ComDiv (Section 3.3.1): distinct popular comments, real/virtual mixing, 'w/o ComDiv' identity, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from lsvcr_dist.data.comdiv import ComDiv

POP = np.array([[5, 6, 7, 8], [9, 0, 0, 0], [0, 0, 0, 0], [11, 12, 0, 0], [5, 6, 7, 8]])  # [LH=5, P=4]
VALID = np.array([True, True, True, True, False])
ALWAYS = dict(video_sample_p=1.0, video_item_p=1.0, comment_sample_p=1.0, comment_record_p=1.0)


def rng(i=0):
    return np.random.default_rng([1, i])


def test_video_always_diversified_gives_distinct_top3_comments():
    cd = ComDiv(**ALWAYS)
    for i in range(50):
        llm, sr = cd.video_comments(POP, VALID, rng(i))
        assert llm[0] != sr[0] and {llm[0], sr[0]} <= {5, 6, 7}  # never the 4th most popular
        assert llm[1] == sr[1] == 9  # a single popular comment is used on both sides
        assert llm[2] == sr[2] == 0  # no comments -> 0 (zero text vector)
        assert llm[3] != sr[3] and {llm[3], sr[3]} == {11, 12}
        assert llm[4] == sr[4] == 0  # padding record


def test_video_disabled_or_never_sampled_is_identical_and_uniform_top3():
    counts = {5: 0, 6: 0, 7: 0}
    for i in range(600):
        a_llm, a_sr = ComDiv(enabled=False, **ALWAYS).video_comments(POP, VALID, rng(i))
        b_llm, b_sr = ComDiv(video_sample_p=0.0).video_comments(POP, VALID, rng(i))
        c_llm, _ = ComDiv(**ALWAYS).video_comments(POP, VALID, rng(i))
        assert (a_llm == a_sr).all() and (b_llm == b_sr).all()
        assert (a_llm == c_llm).all()  # enabling ComDiv does not shift the LLM side's draw
        counts[int(a_llm[0])] += 1
    assert all(150 <= c <= 250 for c in counts.values()), counts  # uniform over top-3: 200 each


def test_video_item_probability_is_respected():
    cd = ComDiv(video_sample_p=1.0, video_item_p=0.3)
    pop = np.tile(np.array([[1, 2, 3, 0]]), (2000, 1))
    llm, sr = cd.video_comments(pop, np.ones(2000, bool), rng(3))
    assert 0.25 < (llm != sr).mean() < 0.35


def test_mix_record_deals_k_real_and_k_virtual():
    cd = ComDiv(**ALWAYS)
    real = np.array([1, 2])
    pool = np.array([1, 30, 31, 32, 2, 0, 0, 0, 0, 0, 0, 99])  # 99 is 12th: outside the top-10 pool
    for i in range(30):
        llm, sr = cd.mix_record(real, pool, rng(i), num_comments=200)
        assert len(llm) == len(sr) == 2
        both = np.concatenate([llm, sr])
        assert sorted(set(both) & {1, 2}) == [1, 2]  # all real comments dealt somewhere
        virtual = [c for c in both if c not in (1, 2)]
        assert len(virtual) == 2 and len(set(virtual)) == 2 and set(virtual) <= {30, 31, 32}


def test_mix_record_repeats_or_falls_back_to_corpus():
    cd = ComDiv(**ALWAYS)
    llm, sr = cd.mix_record(np.array([1, 2, 3]), np.array([1, 2, 3, 40, 0]), rng(1), num_comments=50)
    assert sorted(np.concatenate([llm, sr]).tolist()) == [1, 2, 3, 40, 40, 40]  # one candidate, repeated
    llm, sr = cd.mix_record(np.array([4, 5]), np.array([4, 5, 0]), rng(2), num_comments=50)
    virtual = [c for c in np.concatenate([llm, sr]) if c not in (4, 5)]
    assert len(virtual) == 2 and all(1 <= c <= 50 for c in virtual)


def test_comment_records_disabled_identical_and_subsampled():
    records = np.array([[1, 2, 3, 4], [5, 0, 0, 0], [0, 0, 0, 0]])
    pools = np.array([[1, 2, 3, 4, 20, 21], [5, 22, 0, 0, 0, 0], [0] * 6])
    valid = np.array([True, True, False])
    llm, sr = ComDiv(enabled=False, **ALWAYS).comment_records(records, pools, valid, rng(0), 100)
    assert (llm == sr).all()
    kept = llm[0][llm[0] > 0]
    assert len(kept) == 3 and set(kept) <= {1, 2, 3, 4} and (np.diff(kept) > 0).all()  # 3 of 4, in order
    assert llm[1].tolist() == [5, 0, 0, 0] and llm[2].tolist() == [0, 0, 0, 0]
    llm, sr = ComDiv(**ALWAYS).comment_records(records, pools, valid, rng(0), 100)
    assert (llm[0] > 0).sum() == (sr[0] > 0).sum() == 3
    assert (llm[1] > 0).sum() == (sr[1] > 0).sum() == 1
    assert set(np.concatenate([llm[1], sr[1]])) - {0} == {5, 22}
    assert not (llm[2].any() or sr[2].any())


def test_same_generator_seed_same_draw():
    cd = ComDiv(video_sample_p=0.5, comment_sample_p=0.5, video_item_p=0.5, comment_record_p=0.5)
    records = np.array([[1, 2, 0, 0], [5, 6, 7, 0]])
    pools = np.array([[1, 2, 3, 4, 20, 21], [5, 22, 23, 24, 0, 0]])
    a = cd.video_comments(POP, VALID, rng(9)) + cd.comment_records(records, pools, np.ones(2, bool), rng(9), 99)
    b = cd.video_comments(POP, VALID, rng(9)) + cd.comment_records(records, pools, np.ones(2, bool), rng(9), 99)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_from_dict_rejects_unknown_key():
    assert ComDiv.from_dict({"enabled": False}).enabled is False
    with pytest.raises(KeyError, match="unknown comdiv key 'probability'"):
        ComDiv.from_dict({"probability": 0.5})
