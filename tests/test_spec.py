"""The one policy grammar (lede.rl.spec): what parses, what each spec builds, and the errors that name the fix."""

from __future__ import annotations

import pytest

from lede.core.policy import LOOKUP, Autoregressive, Static
from lede.rl.heuristics import AdaptiveDraftLength, ConfidenceThreshold
from lede.rl.spec import PolicyContext, PolicySpec, PolicySpecError, parse_policy

CTX = PolicyContext(num_layers=6, max_draft_len=8)


@pytest.mark.parametrize("text,cls,attrs", [
    ("plain", Autoregressive, {}),
    ("autoregressive", Autoregressive, {}),
    ("static:2:3", Static, {"exit_layer": 2, "draft_len": 3}),
    ("2:3", Static, {"exit_layer": 2, "draft_len": 3}),
    ("static:0:4", Static, {"exit_layer": LOOKUP, "draft_len": 4}),
    ("lookup:4", Static, {"exit_layer": LOOKUP, "draft_len": 4}),
    (" lookup:4 ", Static, {"exit_layer": LOOKUP, "draft_len": 4}),
    ("adaptive:3", AdaptiveDraftLength, {}),
    ("adaptive:3:2", AdaptiveDraftLength, {}),
    ("confidence:2:0.6", ConfidenceThreshold, {}),
])
def test_specs_build_their_policy(text, cls, attrs):
    policy = parse_policy(text, CTX)
    assert isinstance(policy, cls)
    for k, v in attrs.items():
        assert getattr(policy, k) == v
    assert PolicySpec.parse(text) == PolicySpec.parse(text.strip())  # parsing is deterministic


@pytest.mark.parametrize("text,needle", [
    ("bogus", "unknown policy kind 'bogus'"),
    ("static:2", "'static' takes 2"),
    ("static:a:b", "integers"),
    ("static:-1:2", "0 is prompt lookup"),
    ("static:2:0", "plain decoding is 'plain'"),
    ("lookup", "'lookup' takes 1"),
    ("plain:3", "takes no arguments"),
    ("confidence:2:1.5", "strictly between 0 and 1"),
    ("confidence:2:nan", "strictly between 0 and 1"),
    ("file:", "give the policy file"),
    ("dynamic:3", "takes no arguments"),
])
def test_malformed_specs_fail_at_parse_naming_the_grammar(text, needle):
    with pytest.raises(PolicySpecError, match=needle) as err:
        PolicySpec.parse(text)
    assert "the grammar is plain | static:L:K" in str(err.value)


@pytest.mark.parametrize("text,needle", [
    ("static:9:2", r"outside 1\.\.5"),
    ("static:2:9", "exceeds the draft cap 8"),
    ("dynamic", "needs a cost model"),
    ("file:/no/such/policy.pt", "does not exist"),
])
def test_specs_that_do_not_fit_the_model_fail_at_build(text, needle):
    spec = PolicySpec.parse(text)  # the syntax is fine: this needs the model
    with pytest.raises(PolicySpecError, match=needle):
        spec.build(CTX)


def test_a_policy_object_passes_through():
    policy = Static(2, 2)
    assert parse_policy(policy, CTX) is policy
