"""Exactness and cache correctness of self-speculative decoding on tiny random models (float64)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Scripted, tiny
from lede import Autoregressive, Decoder, RandomSchedule, Static
from lede.core.exits import ExitHead, LinearResidual

MODEL_TYPES = ["llama", "mistral", "qwen2", "qwen3"]


def hf_greedy(lm, prompt, n):
    out = lm.model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_autoregressive_equals_transformers_generate(model_type):
    lm = tiny(model_type)
    dec = Decoder(lm)
    for prompt in ([3], [5, 17, 33, 2, 9], list(range(1, 40))):
        assert dec.generate(prompt, Autoregressive(), max_new_tokens=30).token_ids == hf_greedy(lm, prompt, 30)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_static_configurations_are_exact_and_sometimes_accept(model_type):
    lm = tiny(model_type)
    dec = Decoder(lm)
    prompt = [5, 17, 33, 2, 9]
    ref = dec.generate(prompt, Autoregressive(), max_new_tokens=40).token_ids
    accepted = 0
    for layer in range(1, lm.num_layers):
        for k in (1, 3, 8):
            out = dec.generate(prompt, Static(layer, k), max_new_tokens=40)
            assert out.token_ids == ref, (layer, k)
            assert all(r.exit_layer == layer and 1 <= r.drafted <= k for r in out.rounds[:-1])
            accepted += sum(r.accepted for r in out.rounds)
            rejected = sum(r.drafted - r.accepted for r in out.rounds)
    # the test is only meaningful if both acceptance and rejection happen
    assert accepted > 0 and rejected > 0


schedules = st.lists(  # exit layer 1..5, LOOKUP (0) or a plain step
    st.tuples(st.one_of(st.none(), st.integers(0, 5)), st.integers(1, 9)), min_size=1, max_size=12
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model_type=st.sampled_from(MODEL_TYPES),
    prompt=st.lists(st.integers(0, 95), min_size=1, max_size=24) | st.lists(st.integers(0, 5), min_size=1, max_size=24),
    schedule=schedules,
    max_new=st.integers(1, 40),
)
def test_any_schedule_is_exact(model_type, prompt, schedule, max_new):
    """Any sequence of exit layers (prompt lookup among them) and draft lengths gives plain greedy's tokens. The
    engine checks the cache invariant (every layer holds prompt + tokens[:-1]) at the start of every round."""
    lm = tiny(model_type)
    dec = Decoder(lm, max_draft_len=8)
    ref = dec.generate(prompt, Autoregressive(), max_new_tokens=max_new)
    out = dec.generate(prompt, Scripted(schedule), max_new_tokens=max_new)
    assert out.token_ids == ref.token_ids
    assert len(out.token_ids) == max_new
    assert sum(r.emitted for r in out.rounds) + 1 >= max_new  # +1: the prefill's token
    assert all(r.drafted <= 8 and 0 <= r.accepted <= r.drafted for r in out.rounds)


@pytest.mark.parametrize("seed", range(4))
def test_random_policy_exact_with_adapters(seed):
    """Exit heads with (random, untrained) adapters change the drafts, never the output."""
    lm = tiny("llama")
    torch.manual_seed(seed)
    heads = {}
    for layer in (1, 3, 5):
        adapter = LinearResidual(lm.hidden_size).double()
        torch.nn.init.normal_(adapter.proj.weight, std=0.1)
        heads[layer] = ExitHead(lm.model.model.norm, lm.model.lm_head, adapter)
    dec = Decoder(lm, exit_heads=heads)
    prompt = [seed + 1, 40, 7]
    ref = dec.generate(prompt, Autoregressive(), max_new_tokens=50).token_ids
    out = dec.generate(prompt, RandomSchedule([1, 2, 3, 4, 5], 6, seed=seed), max_new_tokens=50)
    assert out.token_ids == ref
    assert {r.exit_layer for r in out.rounds} - {None}, "the random schedule drafted nothing"


@pytest.mark.parametrize("seed", range(3))
def test_context_adapters_keep_output_and_draft_from_the_whole_context(seed):
    """Kangaroo-style context adapters (an extra decoder layer with its own KV cache) at several layers, mixed
    rounds and plain steps: the output is plain greedy's, and every first draft of a round equals the context
    layer run over the whole sequence so far, teacher-forced (its cache held exactly the settled positions)."""
    from lede.drafters.adapters import context_rows
    from lede.drafters.distill import Sequence
    from lede.core.exits import build_adapter, build_exit_heads

    lm = tiny("llama")
    torch.manual_seed(seed)
    adapters = {}
    for layer in (1, 3):
        adapters[layer] = build_adapter("decoder", lm.hidden_size, template=lm.model.model.layers[-1])
        for p in adapters[layer].parameters():
            p.data.add_(0.05 * torch.randn_like(p))
    heads = build_exit_heads(lm, adapters)
    dec = Decoder(lm, exit_heads=heads)
    prompt = [seed + 1, 40, 7, 19]
    ref = dec.generate(prompt, Autoregressive(), max_new_tokens=40).token_ids
    out = dec.generate(prompt, RandomSchedule([1, 3, 5], 4, seed=seed, p_plain=0.3), max_new_tokens=40)
    assert out.token_ids == ref
    seq = Sequence(prompt, ref)
    first = {l: heads[l](context_rows(lm, heads[l].context, seq, l)).argmax(-1).tolist() for l in (1, 3)}
    n, checked = 1, 0  # tokens emitted before the round (the prefill's first)
    for r in out.rounds:
        if r.exit_layer in first and r.drafted and r.accepted:  # the first draft was right: compare it
            assert first[r.exit_layer][n] == ref[n]
            checked += 1
        elif r.exit_layer in first and r.drafted:  # rejected: the teacher-forced draft is wrong too
            assert first[r.exit_layer][n] != ref[n]
            checked += 1
        n += r.emitted
    assert checked >= 3


def test_cache_invariant_is_enforced(monkeypatch):
    """The always-on check fires if a round leaves the cache out of sync (guards the guard): here a
    cache that forgets to crop rejected drafts."""
    from lede.core.engine import KVCache

    crop = KVCache.crop
    # forget the crop after verification (the one over all layers)
    monkeypatch.setattr(KVCache, "crop", lambda self, n, layers=None: crop(self, n, layers) if layers else None)
    with pytest.raises(RuntimeError, match="out of sync"):
        Decoder(tiny("llama")).generate([1, 2, 3], Static(2, 2), max_new_tokens=20)


def test_records_and_timing_fields():
    lm = tiny("llama")
    out = Decoder(lm).generate([1, 2, 3], Static(3, 4), max_new_tokens=25)
    assert out.new_tokens == 25 and out.finish_reason == "length"
    assert out.policy == "static_L3_K4"
    assert all(r.draft_s > 0 and r.verify_s > 0 and r.policy_s >= 0 for r in out.rounds)
    assert 0 <= out.overhead_s < out.decode_s
    assert out.mean_accepted >= 1.0
    assert isinstance(out.text, str) and len(out.text) == 25


def test_eos_stops_generation():
    lm = tiny("llama")
    dec = Decoder(lm)
    ref = dec.generate([4, 5, 6], Autoregressive(), max_new_tokens=30).token_ids
    eos = ref[10]
    dec._eos = {eos}
    first = ref.index(eos)
    for policy in (Autoregressive(), Static(2, 5), Static(4, 3)):
        out = dec.generate([4, 5, 6], policy, max_new_tokens=30)
        assert out.finish_reason == "eos"
        assert out.token_ids == ref[: first + 1]


@pytest.mark.parametrize("layer", [-1, 6, 7])
def test_exit_layer_out_of_range(layer):
    lm = tiny("llama")  # 6 layers: valid exits are 1..5 (and 0, LOOKUP)
    with pytest.raises(ValueError, match=r"exit layer .* outside 1\.\.5"):
        Decoder(lm).generate([1, 2], Scripted([(layer, 2)]), max_new_tokens=5)


def test_bad_arguments():
    lm = tiny("llama")
    dec = Decoder(lm)
    with pytest.raises(ValueError, match="draft_len=0"):
        Static(2, 0)
    with pytest.raises(ValueError, match="exit_layer=-1"):
        Static(-1, 2)
    with pytest.raises(ValueError, match="exit layer 0"):
        Decoder(lm, exit_heads={0: dec.plain_head})
    with pytest.raises(ValueError, match="empty prompt"):
        dec.generate([], Autoregressive())
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        dec.generate([1], Autoregressive(), max_new_tokens=0)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        dec.generate([1] * 500, Autoregressive(), max_new_tokens=100)
    with pytest.raises(ValueError, match="exit layer 9"):
        Decoder(lm, exit_heads={9: dec.plain_head})


def test_stop_strings_end_generation_at_the_completing_token():
    lm = tiny("llama")
    dec = Decoder(lm)
    ref = dec.generate([4, 5, 6], Autoregressive(), max_new_tokens=40)
    stop = ref.text[12:14]  # two characters = two tokens of the byte tokenizer
    first = ref.text.find(stop)
    for policy in (Autoregressive(), Static(2, 5), RandomSchedule([1, 3, 5], 6, seed=1)):
        out = dec.generate([4, 5, 6], policy, max_new_tokens=40, stop_strings=[stop, "never-there"])
        assert out.finish_reason == "stop"
        assert out.token_ids == ref.token_ids[: first + len(stop)]
        assert out.text_until(lm.tokenizer, [stop]) == ref.text[:first]
    assert dec.generate([4, 5, 6], Static(2, 5), max_new_tokens=40, stop_strings=["never-there"]).token_ids == ref.token_ids


def test_kv_cache_appends_a_range_of_layers_in_one_copy_and_refuses_overflow_and_uneven_layers():
    from lede.core.engine import KVCache

    cache = KVCache(num_layers=4, kv_heads=2, head_dim=3, max_len=5, dtype=torch.float32, device="cpu")
    keys, values = torch.randn(2, 1, 2, 3, 3), torch.randn(2, 1, 2, 3, 3)  # layers 1-2, 3 positions
    assert cache.append(1, keys, values) == 3
    assert cache.lengths == [0, 3, 3, 0]
    torch.testing.assert_close(cache.k[1:3, :, :, :3], keys, rtol=0, atol=0)
    torch.testing.assert_close(cache.v[1:3, :, :, :3], values, rtol=0, atol=0)
    k, v = cache.update(torch.randn(1, 2, 2, 3), torch.randn(1, 2, 2, 3), 3)  # transformers' per-layer call
    assert k.shape == (1, 2, 2, 3) and cache.lengths == [0, 3, 3, 2]
    with pytest.raises(RuntimeError, match="overflow at layer 1: 3\\+3 > 5"):
        cache.append(1, keys, values)
    with pytest.raises(RuntimeError, match="layers 2..3 hold different lengths \\[3, 2\\]"):
        cache.append(2, keys[:, :, :, :1], values[:, :, :, :1])
    assert cache.lengths == [0, 3, 3, 2]  # nothing written by a refused call
