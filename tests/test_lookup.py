"""The prompt-lookup drafter's index (``lede.core.lookup``): longest and most recent match, never the suffix itself."""

from __future__ import annotations

import pytest

from lede.core.lookup import NgramIndex, lookup_runs


def naive(seq, min_n, max_n, k):
    """The definition, by brute force: the longest suffix n-gram with an earlier occurrence, its most recent one."""
    for n in range(min(max_n, len(seq)), min_n - 1, -1):
        suffix = seq[-n:]
        ends = [e for e in range(n - 1, len(seq) - 1) if seq[e - n + 1 : e + 1] == suffix]
        if ends:
            return seq[ends[-1] + 1 : ends[-1] + 1 + k]
    return []


@pytest.mark.parametrize("min_n,max_n", [(1, 1), (2, 3), (1, 4)])
def test_candidates_equal_the_definition_as_the_sequence_grows(min_n, max_n):
    import random

    rng = random.Random(min_n * 10 + max_n)
    for _ in range(20):
        prompt = [rng.randrange(5) for _ in range(rng.randrange(1, 15))]
        tokens: list[int] = []
        index = NgramIndex(min_n, max_n)
        for _ in range(30):
            tokens.append(rng.randrange(5))
            got = index.sync(prompt, tokens).candidates(4)
            assert got == naive(prompt + tokens, min_n, max_n, 4)


def test_trigram_beats_a_more_recent_bigram_and_no_self_match():
    index = NgramIndex(2, 3).sync([1, 2, 3, 7, 9, 2, 3, 8], [1, 2, 3])
    assert index.match()[0] == 3 and index.candidates(2) == [7, 9]  # "1 2 3" -> 7, not "2 3" -> 8
    assert NgramIndex(2, 3).sync([4, 5], [6]).candidates(3) == []  # "5 6" and "4 5 6" never occurred before
    assert NgramIndex(1, 1).sync([4], [4]).candidates(3) == [4]  # the match's continuation may run into the suffix


def test_runs_count_the_candidates_that_come_true():
    prompt, cont = [1, 2, 3], [1, 2, 3, 1, 9]
    runs = lookup_runs(prompt, cont, 2, 3, max_len=8).run
    # row 1: context 1 2 3 1, "3 1" never seen (unigrams are below min) -> 0; row 2: context 1 2 3 1 2, "1 2"
    # occurred at the start -> proposes 3 1 2, and the continuation goes on 3 1 9 -> 2
    assert runs[0] == 0 and runs[1] == 0 and runs[2] == 2
    assert len(runs) == len(cont)


def test_bad_sizes_and_a_shrinking_context_fail_clearly():
    with pytest.raises(ValueError, match="n-gram sizes min=3, max=2"):
        NgramIndex(3, 2)
    index = NgramIndex().sync([1, 2], [3, 4])
    with pytest.raises(ValueError, match="out of sync"):
        index.sync([1, 2], [3])
