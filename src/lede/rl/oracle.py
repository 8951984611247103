"""The hindsight oracle: for each round, the best (L, K) given the true accepted run lengths (greedy only).

    runs = oracle_runs(lm, heads, prompt_ids, continuation, layers)   # per layer: run length at each row
    policy = Oracle(runs, costs)

``runs[L][j]`` is how many consecutive drafts from exit layer L would be accepted in a round whose
first draft predicts continuation token j (teacher-forced on the model's own greedy continuation, which
is what greedy decoding produces; see ``lede.drafters.distill``). Each round the oracle takes the (L, K) — or a
plain step — with the most tokens per millisecond under the cost model at the round's context:
(min(K, run) + 1) / round_ms(L, K).
It is myopic (best round by round), the upper bound the paper reports next to LEDE.
"""

from __future__ import annotations

from lede.core.costs import CostModel
from lede.core.policy import DecodeState


class Oracle:
    def __init__(self, runs: dict[int, list[int]], costs: CostModel, max_draft_len: int = 8):
        self.runs, self.costs, self.max_draft_len = runs, costs, max_draft_len
        self.name = "oracle"
        self._k = 0

    def reset(self) -> None:
        self._k = 0

    def choose_exit(self, state: DecodeState) -> int | None:
        row = len(state.tokens)
        costs = self.costs.at(state.position)  # priced at this round's context
        best, choice = 1.0 / costs.plain_ms, (None, 0)
        for layer, runs in self.runs.items():
            run = runs[row] if row < len(runs) else 0
            for k in range(1, self.max_draft_len + 1):
                rate = (min(k, run) + 1) / costs.round_ms(layer, k)
                if rate > best:
                    best, choice = rate, (layer, k)
        layer, self._k = choice
        return layer

    def keep_drafting(self, state: DecodeState) -> bool:
        return state.drafted < self._k


def oracle_runs(lm, heads: dict, prompt_ids: list[int], continuation: list[int], layers: list[int]) -> dict[int, list[int]]:
    """Accepted run lengths per exit layer along a greedy continuation (exit heads as the engine drafts); for
    ``LOOKUP`` in ``layers``, of the prompt-lookup drafter (``lede.core.lookup.lookup_runs``)."""
    import torch

    from lede.drafters.adapters import head_input
    from lede.drafters.distill import Sequence, accepted_runs, collect

    from lede.core.lookup import lookup_runs
    from lede.core.policy import LOOKUP

    seq = Sequence(prompt_ids, continuation)
    model_layers = [l for l in layers if l != LOOKUP]
    data = collect(lm, [seq], model_layers, progress=False, store_dtype=lm.dtype)
    out = {LOOKUP: lookup_runs(prompt_ids, continuation, max_len=len(continuation)).run} if LOOKUP in layers else {}
    with torch.no_grad():
        for layer in model_layers:
            logits = heads[layer](head_input(lm, heads[layer], data, layer, seq, (0, len(data))))
            agree = logits.argmax(-1).cpu() == data.target
            out[layer] = accepted_runs(agree, data.seq, max_k=10**6).tolist()
    return out
