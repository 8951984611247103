"""The one policy grammar: every place that names a decoding policy as text — the command line, the lm-eval model's
``policy=`` argument, the workflow's methods — parses it here.

    plain                  plain decoding (alias: autoregressive)
    static:L:K             draft K tokens from exit layer L every round (L:K alone is the same)
    lookup:K               prompt lookup: copy up to K tokens that followed the context's last n-gram (= static:0:K)
    adaptive:L[:K0]        transformers' adaptive draft length at exit layer L, starting at K0 (default 4)
    confidence:L:T         draft at L while the exit head's top-1 probability is at least T (0 < T < 1)
    dynamic                dynamic exit: the cheapest expected exit layer per round, priced by a cost model
    file:PATH              a learned LEDE policy (``lede.rl.offline.RLPolicy``; FullInfo files too)
    floor:SPEC             SPEC with the online floor: a drafter whose rounds lose against plain decoding is suspended
                           for the rest of a back-off (``lede.rl.online.OnlineFloor``; needs the cost model)
    correct:file:PATH      a FullInfo policy with the per-prompt correction: each drafter's predicted accepted drafts
                           rescaled by what its rounds delivered on this prompt (``lede.rl.online.PromptCorrection``;
                           needs the cost model)

Parsing is in two steps, so that a command fails on a malformed spec before any model loads:
``PolicySpec.parse(text)`` checks the syntax and the numbers that need no model; ``spec.build(context)`` checks
what needs one (the layer range, the learned policy's model and layers) and returns the ``Policy``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lede.core.costs import CostModel
from lede.core.policy import LOOKUP, Autoregressive, Policy, Static
from lede.rl.heuristics import AdaptiveDraftLength, ConfidenceThreshold, DynamicExit

GRAMMAR = ("plain | static:L:K | lookup:K | adaptive:L[:K0] | confidence:L:T | dynamic | file:PATH | floor:SPEC | "
           "correct:file:PATH")


class PolicySpecError(ValueError):
    """A policy spec that does not parse or does not fit the model; the message names the spec and the fix."""


@dataclass(frozen=True)
class PolicyContext:
    """What building a policy needs from the loaded model and the study: its depth, the draft cap, the candidate
    drafters a learned policy was trained with, the cost model (``dynamic``)."""

    num_layers: int
    max_draft_len: int = 8
    lm_name: str | None = None
    exit_layers: Sequence[int] | None = None  # the candidate drafters (LOOKUP = 0 included) for file: and dynamic
    costs: CostModel | None = None


@dataclass(frozen=True)
class PolicySpec:
    """A parsed policy spec: ``kind`` and its arguments (``layer``, ``draft_len``, ``threshold``, ``path``)."""

    kind: str
    layer: int | None = None
    draft_len: int | None = None
    threshold: float | None = None
    path: Path | None = None
    inner: "PolicySpec | None" = None  # floor:SPEC, correct:file:PATH
    text: str = field(default="", compare=False)

    @property
    def base(self) -> "PolicySpec":
        """The policy that drafts: the spec itself, or for ``floor:SPEC`` / ``correct:SPEC`` the SPEC inside."""
        return self.inner or self

    @classmethod
    def parse(cls, text: str) -> "PolicySpec":
        raw = str(text).strip()
        kind, _, rest = raw.partition(":")
        args = rest.split(":") if rest else []

        def fail(why: str) -> PolicySpecError:
            return PolicySpecError(f"policy {raw!r}: {why}; the grammar is {GRAMMAR}")

        def ints(n_min: int, n_max: int) -> list[int]:
            if not n_min <= len(args) <= n_max:
                raise fail(f"'{kind}' takes {n_min}" + (f" to {n_max}" if n_max > n_min else "") + " number(s)")
            try:
                return [int(a) for a in args]
            except ValueError:
                raise fail("exit layer and draft length must be integers") from None

        if kind in ("plain", "autoregressive"):
            if args:
                raise fail("'plain' takes no arguments")
            return cls("plain", text=raw)
        if kind == "floor":
            if not rest:
                raise fail("give the policy to put the floor under: floor:SPEC")
            inner = cls.parse(rest)
            if inner.kind in ("plain", "floor"):
                raise fail(f"the floor needs a drafting policy, not {inner.kind!r}")
            return cls("floor", inner=inner, text=raw)
        if kind == "correct":
            inner = cls.parse(rest) if rest else None
            if inner is None or inner.kind != "file":
                raise fail("the per-prompt correction wraps a learned FullInfo policy: correct:file:PATH")
            return cls("correct", inner=inner, text=raw)
        if kind == "file":
            if not rest:
                raise fail("give the policy file: file:PATH")
            return cls("file", path=Path(rest), text=raw)
        if kind == "dynamic":
            if args:
                raise fail("'dynamic' takes no arguments (its layers are the study's candidate exit layers)")
            return cls("dynamic", text=raw)
        if kind.lstrip("-").isdigit():  # the short form L:K
            kind, args = "static", [kind, *args]
        if kind == "static":
            layer, k = ints(2, 2)
            spec = cls("lookup" if layer == LOOKUP else "static", layer, k, text=raw)
        elif kind == "lookup":
            (k,) = ints(1, 1)
            spec = cls("lookup", LOOKUP, k, text=raw)
        elif kind == "adaptive":
            layer, *k0 = ints(1, 2)
            spec = cls("adaptive", layer, k0[0] if k0 else 4, text=raw)
        elif kind == "confidence":
            if len(args) != 2:
                raise fail("'confidence' takes an exit layer and a threshold: confidence:L:T")
            try:
                layer, threshold = int(args[0]), float(args[1])
            except ValueError:
                raise fail("confidence:L:T needs an integer layer and a number T") from None
            if not (math.isfinite(threshold) and 0.0 < threshold < 1.0):
                raise fail(f"threshold {args[1]} must lie strictly between 0 and 1")
            spec = cls("confidence", layer, None, threshold, text=raw)
        else:
            raise fail(f"unknown policy kind {kind!r}")
        if spec.layer is not None and spec.layer < (0 if spec.kind == "lookup" else 1):
            raise fail(f"exit layer {spec.layer} must be >= 1 (0 is prompt lookup: lookup:K)")
        if spec.draft_len is not None and spec.draft_len < 1:
            raise fail(f"draft length {spec.draft_len} must be >= 1 (plain decoding is 'plain')")
        return spec

    def build(self, ctx: PolicyContext) -> Policy:
        """The policy, checked against the model and the study (``ctx``)."""
        if self.layer is not None and self.layer != LOOKUP and not 1 <= self.layer <= ctx.num_layers - 1:
            raise PolicySpecError(f"policy {self.text!r}: exit layer {self.layer} is outside 1..{ctx.num_layers - 1} "
                                  f"for this model ({ctx.num_layers} layers), or 0 for prompt lookup")
        if self.draft_len is not None and self.draft_len > ctx.max_draft_len:
            raise PolicySpecError(f"policy {self.text!r}: draft length {self.draft_len} exceeds the draft cap "
                                  f"{ctx.max_draft_len}: lower it or raise max_draft_len")
        if self.kind == "floor":
            from lede.rl.online import OnlineFloor

            if ctx.costs is None:
                raise PolicySpecError(f"policy {self.text!r}: the online floor prices rounds with the cost model "
                                      "(the workflow's cost_model output); none was given")
            return OnlineFloor(self.inner.build(ctx), ctx.costs)
        if self.kind == "correct":
            from lede.rl.offline import PolicyError
            from lede.rl.online import PromptCorrection

            if ctx.costs is None:
                raise PolicySpecError(f"policy {self.text!r}: the per-prompt correction prices rounds with the cost "
                                      "model (the workflow's cost_model output); none was given")
            try:
                return PromptCorrection(self.inner.build(ctx), ctx.costs)
            except PolicyError as err:
                raise PolicySpecError(f"policy {self.text!r}: {err}") from None
        if self.kind == "plain":
            return Autoregressive()
        if self.kind in ("static", "lookup"):
            return Static(self.layer, self.draft_len)
        if self.kind == "adaptive":
            return AdaptiveDraftLength(self.layer, initial=self.draft_len, max_len=ctx.max_draft_len)
        if self.kind == "confidence":
            return ConfidenceThreshold(self.layer, self.threshold, ctx.max_draft_len)
        if self.kind == "dynamic":
            if ctx.costs is None or not ctx.exit_layers:
                raise PolicySpecError(f"policy {self.text!r}: dynamic exit needs a cost model and candidate exit "
                                      "layers (the workflow's cost_model output)")
            return DynamicExit([l for l in ctx.exit_layers if l != LOOKUP], ctx.costs, ctx.max_draft_len)
        from lede.rl.offline import RLPolicy  # a learned policy (FullInfo's files load the same way)

        if not self.path.is_file():
            raise PolicySpecError(f"policy {self.text!r}: {self.path} does not exist: train one with the workflow's "
                                  "train_policy rule")
        return RLPolicy.load(self.path, lm_name=ctx.lm_name, exit_layers=ctx.exit_layers)


def parse_policy(spec: str | Policy, ctx: PolicyContext) -> Policy:
    """A policy from its text (see the module's grammar), or a ``Policy`` as it is."""
    if isinstance(spec, Policy) and not isinstance(spec, str):
        return spec
    return PolicySpec.parse(spec).build(ctx)
