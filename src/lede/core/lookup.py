"""Prompt lookup as one more drafter of the engine: "exit layer 0", drafts copied from the context.

    from lede.core.policy import LOOKUP, Static
    Decoder(lm).generate(prompt, Static(LOOKUP, 4), max_new_tokens=64)   # prompt-lookup decoding, K <= 4

A round at ``LOOKUP`` runs no layer to draft: it finds the longest suffix n-gram of the context (prompt +
output, the pending token included; n from ``max_ngram`` down to ``min_ngram``) that occurred earlier, and
proposes the tokens that followed its most recent earlier occurrence (Saxena's prompt lookup decoding;
transformers' ``prompt_lookup_num_tokens`` and Spec-Bench's PLD take the earliest occurrence instead: the most
recent one follows the text being written, which is what a model repeating itself copies). Verification is
the engine's, so the output stays the full model's. The policy sees how many candidate tokens there are before
it chooses (``DecodeState.lookup``), and decides after each one whether to take one more, as for a layer's
drafts; with no candidate the round is a plain step.

Why it belongs in LEDE's action space: on a small model the early exits draft well only in easy stretches,
and the copy-heavy ones (translation of names and numbers, summarization, code that repeats identifiers) are
where a copy drafter is right for free. Which drafter pays is a property of the context: the policy's job.

The index is incremental (one dictionary write per n and token), so the lookup costs microseconds a round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


MIN_NGRAM, MAX_NGRAM = 2, 3  # the n-gram sizes the engine, the replay and the oracle use unless told otherwise


class NgramIndex:
    """The most recent end position of every n-gram (min_ngram <= n <= max_ngram) of a growing token sequence,
    over the n-grams that end before its last token (so the current suffix does not find itself)."""

    def __init__(self, min_ngram: int = MIN_NGRAM, max_ngram: int = MAX_NGRAM):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup n-gram sizes min={min_ngram}, max={max_ngram}: need 1 <= min <= max")
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.seq: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> index of its last token, most recent occurrence
        self._indexed = 0  # n-grams ending at positions < _indexed are in _last
        self._matched: tuple[int, int, int] | None = None  # (len(seq), n, end) of the last match()
        self._run: tuple[tuple[int, int], int] | None = None  # ((len(seq), cap), match_run) of the last match_run()

    def sync(self, prompt: Sequence[int], tokens: Sequence[int]) -> "NgramIndex":
        """Make the indexed sequence ``prompt + tokens`` (which only ever grows by appending tokens)."""
        if not self.seq:
            self.seq.extend(prompt)
        have = len(self.seq) - len(prompt)
        if have < 0 or have > len(tokens):
            raise ValueError(f"prompt lookup index out of sync: it holds {len(self.seq)} tokens, the context "
                             f"{len(prompt) + len(tokens)}")
        self.seq.extend(tokens[have:])
        seq, last = self.seq, self._last
        while self._indexed < len(seq) - 1:  # every n-gram ending before the last token
            end = self._indexed
            for n in range(self.min_ngram, min(self.max_ngram, end + 1) + 1):
                last[tuple(seq[end - n + 1 : end + 1])] = end
            self._indexed += 1
        return self

    def match(self) -> tuple[int, int]:
        """(n, end): the longest suffix n-gram with an earlier occurrence and where that occurrence ends;
        (0, -1) when none does."""
        seq = self.seq
        for n in range(min(self.max_ngram, len(seq)), self.min_ngram - 1, -1):
            end = self._last.get(tuple(seq[-n:]))
            if end is not None:
                return n, end
        return 0, -1

    def _match_cached(self) -> tuple[int, int]:
        """``match()``, computed once per length of the sequence (the engine and the features both ask a round)."""
        if self._matched is None or self._matched[0] != len(self.seq):
            self._matched = (len(self.seq), *self.match())
        return self._matched[1:]

    def match_size(self) -> int:
        """n of the current match (0: none)."""
        return self._match_cached()[0]

    def match_run(self, cap: int = 64) -> int:
        """How long the context has been copying: the number of tokens, up to ``cap``, in which the context's
        suffix equals the text ending at the match's earlier occurrence (>= n; 0 without a match). Acceptance of a
        lookup draft grows with it (measured on the dev sequences: P(first candidate right) 0.53 at 2, 0.75 at 5,
        0.95 at 16 or more), which the n-gram size (at most ``max_ngram``) cannot tell."""
        key = (len(self.seq), cap)
        if self._run is not None and self._run[0] == key:  # the features ask at every decision of a round
            return self._run[1]
        n, end = self._match_cached()
        seq, top = self.seq, len(self.seq) - 1
        run = n
        while n and run < cap and end - run >= 0 and seq[top - run] == seq[end - run]:
            run += 1
        self._run = (key, run)
        return run

    def candidates(self, max_len: int) -> list[int]:
        """Up to ``max_len`` tokens that followed the match (empty without one)."""
        n, end = self._match_cached()
        return self.seq[end + 1 : end + 1 + max_len] if n else []


@dataclass
class LookupRuns:
    """Per row j of a greedy continuation c (a round whose pending token is c[j-1], its first draft predicting
    c[j]; row 0 is the prefill's token, never drafted for): how many candidates a lookup draft has there
    (``available``) and how many of them equal c[j], c[j+1], ... in a row (``run``: the accepted length of a
    lookup draft of any K >= it)."""

    run: list[int]
    available: list[int]


def lookup_runs(prompt_ids: Sequence[int], continuation: Sequence[int], min_ngram: int = MIN_NGRAM,
                max_ngram: int = MAX_NGRAM, max_len: int = 16) -> LookupRuns:
    index = NgramIndex(min_ngram, max_ngram)
    out = LookupRuns([0], [0])
    for j in range(1, len(continuation)):
        cands = index.sync(prompt_ids, continuation[:j]).candidates(max_len)
        run = 0
        while run < len(cands) and j + run < len(continuation) and cands[run] == continuation[j + run]:
            run += 1
        out.run.append(run)
        out.available.append(len(cands))
    return out
