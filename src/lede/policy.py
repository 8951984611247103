"""The decision points of the decoding loop, and the simple policies.

The loop asks a ``Policy`` two things:

* ``choose_exit(state)`` at the start of every round: the exit layer L to draft from, or ``None``
  for a plain decoding step (no draft this round);
* ``keep_drafting(state)`` after every drafted token: draft one more, or stop and verify.
  The loop also stops at its own hard maximum and at the token budget.

``state`` is a ``DecodeState``: what the loop knows (previous rounds, position, the current draft's
confidence at the exit layer, the full model's confidence on the last verified token). Confidences
are computed lazily, so a policy that never looks at them costs nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, runtime_checkable

import torch


@dataclass
class RoundRecord:
    """One draft→verify round. ``exit_layer`` is None for a plain step (nothing drafted)."""

    exit_layer: int | None
    drafted: int  # K: tokens drafted this round
    accepted: int  # drafts accepted by verification (0..K); the round emits accepted + 1 tokens
    draft_s: float  # wall time in early-exit forwards (incl. exit head)
    verify_s: float  # wall time in the full-model pass and acceptance
    policy_s: float  # wall time in policy calls

    @property
    def emitted(self) -> int:
        return self.accepted + 1


def top_prob_margin_entropy(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-1 probability, top-1 − top-2 margin and entropy (nats) of distribution(s) ``probs`` [..., V] -> [...]."""
    top2 = torch.topk(probs, 2, dim=-1).values
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    return top2[..., 0], top2[..., 0] - top2[..., 1], entropy


class Confidence:
    """Top-1 probability, entropy (nats) and top-1/top-2 margin of one logits row, computed on demand."""

    __slots__ = ("logits", "__dict__")

    def __init__(self, logits: torch.Tensor):
        self.logits = logits  # [V]

    @cached_property
    def _probs(self) -> torch.Tensor:
        return torch.softmax(self.logits.float(), dim=-1)

    @cached_property
    def top_prob(self) -> float:
        return float(self._probs.max())

    @cached_property
    def _margin_entropy(self) -> tuple[float, float]:
        _, margin, entropy = top_prob_margin_entropy(self._probs)
        return float(margin), float(entropy)

    @property
    def margin(self) -> float:
        return self._margin_entropy[0]

    @property
    def entropy(self) -> float:
        return self._margin_entropy[1]


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
    draft: Confidence | None = None  # exit head, for the token just drafted
    draft_tokens: list[int] = field(default_factory=list)

    @property
    def position(self) -> int:
        return self.prompt_len + len(self.tokens)


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
    """Always draft ``draft_len`` tokens from ``exit_layer`` (LayerSkip / Draft&Verify style)."""

    def __init__(self, exit_layer: int, draft_len: int):
        if draft_len < 1:
            raise ValueError(f"draft_len={draft_len} must be >= 1 (use Autoregressive for no drafting)")
        if exit_layer < 1:
            raise ValueError(f"exit_layer={exit_layer} must be >= 1")
        self.exit_layer = exit_layer
        self.draft_len = draft_len
        self.name = f"static_L{exit_layer}_K{draft_len}"

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
