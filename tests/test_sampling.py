"""Speculative sampling is lossless: the emitted tokens are distributed exactly as the full model's.

Chi-square goodness-of-fit tests at significance level ALPHA against exactly computed probabilities.
Each test also runs a deliberately wrong acceptance rule on the same samples budget and checks that it
*is* rejected, so the sample sizes are shown to be large enough to catch a wrong rule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from conftest import tiny
from lede import Autoregressive, Decoder, Sampling, Static
from lede.core.engine import Decoder as _D
from lede.core.policy import LOOKUP

ALPHA = 1e-3


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    probs = probs.astype(np.float64) / probs.sum()
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability zero"
    # pool cells with small expectation so the chi-square approximation holds
    order = np.argsort(expected[keep])
    e, c = expected[keep][order], counts[keep][order]
    e = e * (c.sum() / e.sum())
    small = np.cumsum(e) < 5
    if small.any():
        e = np.concatenate([[e[small].sum()], e[~small]])
        c = np.concatenate([[c[small].sum()], c[~small]])
    return float(chisquare(c, e).pvalue)


def wrong_rule(drafts, q_rows, logits, sampling, gen):
    """A classic bug: on rejection resample from p instead of norm(max(0, p - q))."""
    p = sampling.probs(logits)
    for i, d in enumerate(drafts):
        if torch.rand((), generator=gen) * q_rows[i][d] <= p[i, d]:
            continue
        return i, drafts[:i] + [int(torch.multinomial(p[i], 1, generator=gen))]
    return len(drafts), drafts + [int(torch.multinomial(p[len(drafts)], 1, generator=gen))]


@pytest.mark.parametrize("rule", ["correct", "wrong"])
def test_acceptance_rule_matches_target_distribution(rule):
    """Synthetic target logits p and draft distributions q: the first emitted token must be ~ p_0."""
    gen = torch.Generator().manual_seed(0)
    v, n = 6, 20000
    torch.manual_seed(1)
    logits = torch.randn(3, v, dtype=torch.float64) * 1.5
    q = torch.softmax(torch.randn(2, v, dtype=torch.float64) * 1.5, -1)
    s = Sampling(temperature=1.0)
    accept = _D._accept_sampled if rule == "correct" else wrong_rule
    first = np.zeros(v)
    for _ in range(n):
        drafts = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(2)]
        a, emitted = accept(drafts, list(q), logits, s, gen)
        first[emitted[0]] += 1
    p = s.probs(logits).numpy()
    pv = chi2_pvalue(first, p[0])
    if rule == "correct":
        assert pv > ALPHA, f"speculative sampling is off the target distribution (p={pv:.2e})"
    else:
        assert pv < ALPHA, f"test too weak to catch the wrong rule (p={pv:.2e})"


@pytest.mark.parametrize("temperature,top_p,drafter", [(1.0, 1.0, 1), (0.7, 0.8, 1), (1.0, 1.0, LOOKUP)])
def test_engine_sampling_is_lossless(temperature, top_p, drafter):
    """Tiny model, vocab 12: the 2nd and 3rd generated tokens come from one draft→verify round
    (Static(1, 3), exit after layer 1 of 3: drafts are often rejected; or prompt lookup, whose draft
    distribution is a point mass, over a prompt holding every token so that each first token has a match).
    Their marginals must equal the full model's, computed exactly by enumerating the earlier tokens."""
    lm = tiny("llama", num_layers=3, vocab_size=12, seed=3)
    dec = Decoder(lm, lookup_ngram=(1, 3))
    prompt = [1, 5, 7] if drafter else [1, 5, 7, *range(12)]
    s = Sampling(temperature=temperature, top_p=top_p)
    v, n = 12, 3000
    counts2, counts3 = np.zeros(v), np.zeros(v)
    rejected = 0
    for seed in range(n):
        out = dec.generate(prompt, Static(drafter, 3), max_new_tokens=3,
                           sampling=Sampling(temperature, top_p, seed=seed), stop_at_eos=False)
        counts2[out.token_ids[1]] += 1
        counts3[out.token_ids[2]] += 1
        rejected += out.rounds[0].drafted - out.rounds[0].accepted
    assert rejected > n // 10, "drafts were almost never rejected: the test would not exercise the residual"

    with torch.no_grad():
        def probs(prefixes):  # next-token distributions after each prefix: [B, V]
            ids = torch.tensor([prompt + list(p) for p in prefixes])
            return s.probs(lm.model(ids).logits[:, -1]).double()

        p1 = probs([()])[0]  # [V]
        p2_given1 = probs([(a,) for a in range(v)])  # [V, V]
        p2 = p1 @ p2_given1
        p3_given12 = probs([(a, b) for a in range(v) for b in range(v)]).view(v, v, v)
        p3 = torch.einsum("a,ab,abc->c", p1, p2_given1, p3_given12)
    for counts, p in ((counts2, p2), (counts3, p3)):
        pv = chi2_pvalue(counts, p.numpy())
        assert pv > ALPHA, f"token distribution differs from the full model's (p={pv:.2e})"


def test_sampling_is_reproducible_and_plain_sampling_works():
    lm = tiny("llama")
    dec = Decoder(lm)
    s = Sampling(temperature=0.9, seed=7)
    a = dec.generate([1, 2], Static(2, 3), max_new_tokens=20, sampling=s).token_ids
    b = dec.generate([1, 2], Static(2, 3), max_new_tokens=20, sampling=s).token_ids
    c = dec.generate([1, 2], Autoregressive(), max_new_tokens=20, sampling=s).token_ids
    assert a == b and len(c) == 20
    with pytest.raises(ValueError, match="temperature=-1"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match="top_p=0"):
        Sampling(temperature=1, top_p=0)
