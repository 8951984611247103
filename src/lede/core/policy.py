"""The decision points of the decoding loop, and the simple policies.

The loop asks a ``Policy`` two things:

* ``choose_exit(state)`` at the start of every round: the exit layer L to draft from, ``LOOKUP`` (0) to
  draft by prompt lookup (``lede.core.lookup``), or ``None`` for a plain decoding step (no draft this round);
* ``keep_drafting(state)`` after every drafted token: draft one more, or stop and verify.
  The loop also stops at its own hard maximum and at the token budget.

``state`` is a ``DecodeState``: what the loop knows (previous rounds, position, the current draft's
confidence at the exit layer, the full model's confidence on the last verified token). Confidences
are computed lazily, so a policy that never looks at them costs nothing.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from lede.core.lookup import NgramIndex

LOOKUP = 0  # the "exit layer" of the prompt-lookup drafter (``lede.core.lookup``): drafts copied from the context


@dataclass
class RoundRecord:
    """One draft→verify round. ``exit_layer`` is None for a plain step (nothing drafted), ``LOOKUP`` (0) for a
    prompt-lookup draft."""

    exit_layer: int | None
    drafted: int  # K: tokens drafted this round
    accepted: int  # drafts accepted by verification (0..K); the round emits accepted + 1 tokens
    draft_s: float  # wall time in early-exit forwards (incl. exit head)
    verify_s: float  # wall time in the full-model pass and acceptance
    policy_s: float  # wall time in policy calls

    @property
    def emitted(self) -> int:
        return self.accepted + 1


def top_prob_margin_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-1 probability, top-1 − top-2 probability margin and entropy (nats) of softmax(``logits``) [..., V] -> [...].

    With m = max x, d = x − m, e = exp(d), Z = Σ e:  p_top = 1/Z,  margin = (1 − exp(x_2 − m))/Z,
    entropy = log Z − Σ e·d / Z. Five passes over the vocabulary and no softmax tensor: on a 49k vocabulary
    the engine computes this twice a round (``Confidence``, for one row on the CPU in numpy: torch's argmax and
    topk on one 49k row cost ~40 and ~80 us, numpy's argmax 3 us; softmax + topk + p·log p took ~280 us of a
    ~30 ms round)."""
    x = logits.float()
    m = x.amax(-1, keepdim=True)
    d = (x - m).clamp_min(-1e4)  # -inf logits (tokens outside a draft vocabulary) add 0, not 0 * -inf
    e = d.exp()
    z = e.sum(-1)
    entropy = z.log() - (e * d).sum(-1) / z
    second = torch.topk(d, 2, dim=-1).values[..., 1] if x.shape[-1] > 1 else torch.full_like(z, -math.inf)
    return 1.0 / z, (1.0 - second.exp()) / z, entropy


class Confidence:
    """Top-1 probability, entropy (nats) and top-1/top-2 margin of one logits row, computed on demand
    (once, together: a policy that reads one of them reads the others too). ``support``: the token ids
    whose logits can be finite (a reduced-vocabulary draft head's set; the others are -inf and add nothing),
    so that only those are read — 4k instead of 49k entries for SmolLM2's draft heads, ~150 us less per
    drafted token in the loop."""

    __slots__ = ("logits", "support", "__dict__")

    def __init__(self, logits: torch.Tensor, support: torch.Tensor | None = None):
        self.logits = logits  # [V]
        self.support = support  # [V'] token ids, or None: every entry

    @cached_property
    def _values(self) -> tuple[float, float, float]:
        logits = self.logits if self.support is None else self.logits.index_select(-1, self.support)
        if logits.device.type != "cpu" or logits.dim() != 1:
            return tuple(float(v) for v in top_prob_margin_entropy(logits))
        x = logits.float().numpy()  # the same maths as top_prob_margin_entropy, for one row
        i = int(x.argmax())
        d = np.maximum(x - x[i], -1e4)  # -inf logits (tokens outside a draft vocabulary) add 0, not 0 * -inf
        e = np.exp(d)
        z = float(e.sum())
        second = max(d[:i].max(initial=-np.inf), d[i + 1:].max(initial=-np.inf))  # a tied max gives 0
        return 1.0 / z, (1.0 - math.exp(second)) / z, math.log(z) - float(e @ d) / z

    @property
    def top_prob(self) -> float:
        return self._values[0]

    @property
    def margin(self) -> float:
        return self._values[1]

    @property
    def entropy(self) -> float:
        return self._values[2]


@dataclass
class DecodeState:
    """What the loop exposes to the policy. Updated in place by the loop."""

    num_layers: int
    prompt_len: int
    max_new_tokens: int
    tokens: list[int] = field(default_factory=list)  # generated so far
    prompt_ids: list[int] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)
    last_verify: Confidence | None = None  # full model, at the last accepted position
    # the current round
    exit_layer: int | None = None
    drafted: int = 0
    draft: Confidence | None = None  # exit head, for the token just drafted (None for a lookup draft)
    draft_tokens: list[int] = field(default_factory=list)
    lookup: NgramIndex = field(default_factory=NgramIndex)  # over prompt + tokens, for the lookup drafter

    @property
    def position(self) -> int:
        return self.prompt_len + len(self.tokens)

    def lookup_candidates(self, max_len: int) -> list[int]:
        """What a ``LOOKUP`` draft would propose this round (up to ``max_len`` tokens; empty: no match)."""
        return self.lookup.sync(self.prompt_ids, self.tokens).candidates(max_len)


def drafter_name(layer: int | None) -> str:
    """``L<layer>``, ``lookup`` or ``plain``: how tables, features and policy names call a drafter."""
    return "plain" if layer is None else "lookup" if layer == LOOKUP else f"L{layer}"


@runtime_checkable
class Policy(Protocol):
    name: str

    def reset(self) -> None:
        """Called once before each generation."""

    def choose_exit(self, state: DecodeState) -> int | None:
        """Exit layer for this round, or None for a plain decoding step."""

    def keep_drafting(self, state: DecodeState) -> bool:
        """After each drafted token: draft another (True) or verify now (False)."""


class Autoregressive:
    """Plain decoding: never draft."""

    name = "autoregressive"

    def reset(self) -> None:
        pass

    def choose_exit(self, state: DecodeState) -> int | None:
        return None

    def keep_drafting(self, state: DecodeState) -> bool:
        return False


class Static:
    """Always draft ``draft_len`` tokens from ``exit_layer`` (LayerSkip / Draft&Verify style); with
    ``exit_layer=LOOKUP``, up to ``draft_len`` prompt-lookup tokens (prompt lookup decoding)."""

    def __init__(self, exit_layer: int, draft_len: int):
        if draft_len < 1:
            raise ValueError(f"draft_len={draft_len} must be >= 1 (use Autoregressive for no drafting)")
        if exit_layer < 0:
            raise ValueError(f"exit_layer={exit_layer} must be >= 1 (or LOOKUP = 0)")
        self.exit_layer = exit_layer
        self.draft_len = draft_len
        self.name = f"static_{drafter_name(exit_layer)}_K{draft_len}"

    def reset(self) -> None:
        pass

    def choose_exit(self, state: DecodeState) -> int | None:
        return self.exit_layer

    def keep_drafting(self, state: DecodeState) -> bool:
        return state.drafted < self.draft_len


class RandomSchedule:
    """Random exit layer (or no draft) and random draft length every round: for exactness tests and as a
    behaviour policy that covers the action space."""

    def __init__(self, exit_layers: list[int], max_draft_len: int, seed: int = 0, p_plain: float = 0.1):
        self.exit_layers = list(exit_layers)
        self.max_draft_len = max_draft_len
        self.p_plain = p_plain
        self.seed = seed
        self.name = f"random_s{seed}"
        self.reset()

    def reset(self) -> None:
        self._rng = random.Random(self.seed)
        self._target = 0

    def choose_exit(self, state: DecodeState) -> int | None:
        if self._rng.random() < self.p_plain:
            return None
        self._target = self._rng.randint(1, self.max_draft_len)
        return self._rng.choice(self.exit_layers)

    def keep_drafting(self, state: DecodeState) -> bool:
        return state.drafted < self._target
