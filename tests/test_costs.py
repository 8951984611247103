"""The cost model at several context lengths: measured per context, looked up by position, and used to price
each round where it happens (rewards, replayed speed, the oracle, dynamic exit)."""

import json
from dataclasses import asdict

import pytest

from lede.eval.bench import BenchRecord
from lede.core.costs import CostModel, modelled_ms, pricing_ratios, round_costs
from lede.eval.cost_probe import FloorProbe, drift_corrected, measure_costs, price_check
from lede.core.engine import Decoder
from lede.rl.features import ActionSpace, decision_rewards
from lede.rl.heuristics import DynamicExit
from lede.rl.oracle import Oracle
from lede.core.policy import DecodeState, RoundRecord
from conftest import tiny

SPACE = ActionSpace((1, 2), 4)


def _cm(ctx, plain, draft, verify2, **kw):
    return CostModel(model="tiny", dtype="float32", device="cpu", threads=1, context_len=ctx,
                     draft_ms={1: draft, 2: 2 * draft}, verify_ms={1: plain, 2: verify2, 3: verify2 * 1.3,
                                                                  4: verify2 * 1.6, 5: verify2 * 1.9}, **kw)


# at 8 tokens a one-draft round costs 0.1 + 1.0 plain steps; at 64, 0.1 + 1.5
SHORT = _cm(8, 10.0, 1.0, 10.0, by_context={64: _cm(64, 20.0, 2.0, 30.0)})


def test_at_picks_the_nearest_measured_context_in_log_scale(tmp_path) -> None:
    long = SHORT.by_context[64]
    assert [SHORT.at(p).context_len for p in (1, 8, 22, 23, 64, 5000)] == [8, 8, 8, 64, 64, 64]  # sqrt(8*64) = 22.6
    assert _cm(8, 1, 1, 1).at(10**6).context_len == 8  # one context: every position
    SHORT.save(tmp_path / "c.json")
    back = CostModel.load(tmp_path / "c.json")
    assert back == SHORT and back.at(100).verify_ms == long.verify_ms and isinstance(back.by_context[64], CostModel)
    rounds = [RoundRecord(1, 1, 1, 0, 0, 0)] * 3  # 2 tokens each
    assert [c.context_len for c in round_costs(SHORT, 19, rounds)] == [8, 8, 64]  # positions 20, 22, 24


def test_rewards_price_each_round_at_its_context() -> None:
    rounds = [RoundRecord(1, 1, 0, 0, 0, 0), RoundRecord(1, 1, 0, 0, 0, 0)]  # one rejected draft each
    actions = [1, 3, 1, 3]
    base = decision_rewards(actions, rounds, SPACE, SHORT)  # no prompt_len: every round at the base context
    assert base == pytest.approx([-0.1, 1 - 1.0, -0.1, 1 - 1.0])
    # a 60-token prompt: both rounds at ~61-62 tokens, priced in plain steps of the 64-token context
    assert decision_rewards(actions, rounds, SPACE, SHORT, prompt_len=60) == pytest.approx([-0.1, 1 - 1.5, -0.1, 1 - 1.5])
    # a 4-token prompt whose second round is still short: the base context for both
    assert decision_rewards(actions, rounds, SPACE, SHORT, prompt_len=4) == pytest.approx(base)


def test_oracle_and_dynamic_exit_stop_drafting_where_rounds_cost_more() -> None:
    # a one-token accepted run: 2 tokens for 1.1 plain steps at 8 tokens of context pays; for 1.6 at 64 too,
    # but a round at layer 2 (1.2 / 1.7 plain steps) whose draft is rejected does not
    oracle = Oracle({1: [1] * 100}, SHORT, max_draft_len=4)
    short = DecodeState(num_layers=4, prompt_len=5, max_new_tokens=50, tokens=[1])
    long = DecodeState(num_layers=4, prompt_len=70, max_new_tokens=50, tokens=[1])
    assert oracle.choose_exit(short) == 1 and oracle.choose_exit(long) == 1
    oracle = Oracle({1: [0] * 100}, _cm(8, 10.0, 0.1, 9.0, by_context={64: _cm(64, 20.0, 2.0, 30.0)}), 4)
    assert oracle.choose_exit(short) == 1  # drafting is cheaper than a plain step at 8 tokens (verify 2 < plain)
    assert oracle.choose_exit(long) is None
    # dynamic exit with acceptance estimates at the prior 0.5: E_1 = 1.5 tokens per round
    dyn = DynamicExit([1], _cm(8, 10.0, 1.0, 10.0, by_context={64: _cm(64, 10.0, 1.0, 16.0)}), 1, explore_every=10**6)
    assert dyn.plan(short) == (1, 1)  # 1.5 / 11 ms > 1 / 10 ms
    assert dyn.plan(long) == (None, 0)  # 1.5 / 17 ms < 1 / 10 ms


def test_measure_costs_times_every_context() -> None:
    lm = tiny("llama")
    dec = Decoder(lm, max_draft_len=3)
    cm = measure_costs(dec, [1, 2], 3, context_len=16, repeats=3, warmup=1, long_contexts=[128])
    assert cm.context_len == 16 and list(cm.by_context) == [128]
    long = cm.by_context[128]
    for c in (cm, long):
        assert set(c.draft_ms) == {1, 2} and set(c.verify_ms) == {1, 2, 3, 4} and all(v > 0 for v in c.verify_ms.values())
    assert not long.by_context  # one level
    assert cm.at(100) is long and cm.at(20) is cm
    for c in (cm, long):  # monotone where the hardware is: a deeper exit, more verified tokens never cost less
        assert c.draft_ms[1] <= c.draft_ms[2] and c.draft_plain_ms[1] <= c.draft_plain_ms[2]
        assert [c.verify_ms[t] for t in range(1, 5)] == sorted(c.verify_ms.values())
    with pytest.raises(ValueError, match=r"context length 4096 .* exceeds the model's 512 positions: lower costs.long_contexts"):
        measure_costs(dec, [1], 2, context_len=16, repeats=1, long_contexts=[4096])
    with pytest.raises(ValueError, match="distinct"):
        measure_costs(dec, [1], 2, context_len=16, repeats=1, long_contexts=[32, 32])


def test_designs_are_timed_and_priced_per_selected_head(tmp_path) -> None:
    """measure_costs times other adapter designs (a context adapter through its own cache); with_heads prices
    each layer's draft as its selected head at every context, with the numbers the report's replay uses."""
    from lede.core.exits import build_adapter, build_exit_heads

    lm = tiny("llama")
    ctx_heads = build_exit_heads(lm, {l: build_adapter("decoder", lm.hidden_size, template=lm.model.model.layers[-1])
                                      for l in (1, 2)})
    cm = measure_costs(Decoder(lm, max_draft_len=2), [1, 2], 2, context_len=16, repeats=3, warmup=1,
                       long_contexts=[64], designs={"decoder": ctx_heads})
    assert set(cm.draft_design_ms["decoder"]) == {1, 2} and set(cm.by_context[64].draft_design_ms["decoder"]) == {1, 2}
    cm.save(tmp_path / "c.json")
    cm = CostModel.load(tmp_path / "c.json")
    sel = cm.with_heads({1: "decoder_V48", 2: "plain"})
    for base, picked in ((cm, sel), (cm.by_context[64], sel.by_context[64])):
        assert picked.draft_ms == {1: base.draft_design_ms["decoder"][1], 2: base.draft_plain_ms[2]}
    # not measured separately: the configured heads' cost (a reduced-vocabulary plain head is not the full one)
    assert cm.with_heads({1: "linear_V48", 2: "plain_V48"}).draft_ms == cm.draft_ms
    assert cm.head_draft_ms("decoder_V48", 1) == cm.draft_design_ms["decoder"][1]
    assert cm.head_draft_ms("plain", 2) == cm.draft_plain_ms[2] and cm.head_draft_ms("linear_V48", 2) == cm.draft_ms[2]


def test_drift_correction_removes_a_slow_pass_and_keeps_the_level() -> None:
    base = {"a": [10.0] * 6, "b": [20.0] * 6, "c": [40.0] * 6}
    slow = [1, 1, 1.5, 1, 0.8, 1]  # the machine's speed in each pass: every item slower / faster alike
    noisy = {k: [x * f for x, f in zip(xs, slow)] for k, xs in base.items()}
    noisy["c"][3] = 60.0  # scatter within one pass stays
    out = drift_corrected(noisy)
    assert out["a"] == pytest.approx(base["a"]) and out["b"] == pytest.approx(base["b"])
    assert out["c"][:3] == pytest.approx([40.0] * 3) and out["c"][3] == pytest.approx(60.0)


def _record(config, prompt, decode_s, rounds, prompt_tokens=10):
    return BenchRecord(prompt=prompt, category="qa", config=config, repeat=0, new_tokens=0, wall_s=decode_s,
                       tokens_per_s=0, rounds=len(rounds or []), mean_accepted=0, identical=True, overhead_frac=0,
                       policy_frac=0, rounds_detail=rounds, decode_s=decode_s, prompt_tokens=prompt_tokens)


def test_pricing_ratios_compare_engine_time_with_the_model_relative_to_plain() -> None:
    drafting = [(1, 1, 1), (2, 2, 0), (None, 0, 0)]  # at 8 tokens: 1 + 10, 2*2 + 13, 10 ms
    assert modelled_ms(SHORT, 7, drafting) == pytest.approx(11 + 17 + 10)
    # a 20-token prompt: the first round at position 21 (base context), the next ones nearer 64 (context 64)
    assert modelled_ms(SHORT, 20, drafting) == pytest.approx(11 + (8 + 39) + 20)
    plain = [(None, 0, 0)] * 4
    recs = [_record("plain", "p1", 0.080, plain, 7), _record("lede", "p1", 0.038 * 1.1 * 2, drafting, 7),  # plain 2x slower
            _record("plain", "p2", 0.040, plain, 7), _record("lede", "p2", 0.038, drafting, 7),
            _record("hf_generate", "p2", 1.0, None, 7)]
    ratios = pricing_ratios(recs, SHORT)
    assert set(ratios) == {"plain", "lede"} and ratios["plain"] == 1.0
    assert ratios["lede"] == pytest.approx(1.05)  # median of 1.1 and 1.0
    with pytest.raises(ValueError, match="keep_rounds"):
        pricing_ratios([_record("lede", "p1", 1.0, drafting)], SHORT)


def test_cost_model_records_its_kernels_and_a_job_on_others_is_told() -> None:
    """With kernels: auto every job chooses its CPU kernels at load: the cost model says which it was timed on
    (kept through save/load), and a decoding job on other kernels gets a reason to distrust its prices."""
    from types import SimpleNamespace

    from lede.core.costs import kernels_mismatch
    from lede.core.kernels import KernelChoice

    lm = tiny("llama")
    lm.kernels = KernelChoice("torch", "lede")
    cm = measure_costs(Decoder(lm, max_draft_len=2), [1], 2, context_len=16, repeats=2, warmup=0)
    assert cm.kernels == "one token torch, several lede"
    assert CostModel.from_dict(json.loads(json.dumps(asdict(cm)))).kernels == cm.kernels
    assert kernels_mismatch(cm, lm) is None
    other = SimpleNamespace(kernels=KernelChoice("lede", "lede"))
    assert "timed on kernels (one token torch, several lede) but this job runs (one token lede, several lede)" in \
        kernels_mismatch(cm, other)
    assert kernels_mismatch(CostModel.from_dict({**asdict(cm), "kernels": ""}), other) is None  # older files: no claim


def test_read_bandwidth_and_weight_bytes_are_measured() -> None:
    """The floor's two factors: a positive read bandwidth per probe, and the bytes of every decoder layer, the final
    norm and the LM head (the embedding is not read whole by a pass of an untied model)."""
    from lede.eval.cost_probe import read_bandwidth, weight_bytes

    runs = read_bandwidth(64, repeats=2)
    assert len(runs) == 2 and all(x > 0.1 for x in runs)
    lm = tiny("llama")
    inner = lm.model.model
    expected = sum(p.numel() * p.element_size() for p in [*inner.layers.parameters(), *inner.norm.parameters()])
    assert weight_bytes(lm) == expected + lm.model.lm_head.weight.numel() * lm.model.lm_head.weight.element_size()


def test_probe_puts_the_model_back_after_an_error(monkeypatch):
    """probe_floor re-routes every CpuLinear and the lean layer forward per variant: an error mid-probe leaves the
    model on the kernels it chose at load, not on the last variant's."""
    import torch

    import lede.eval.cost_probe as probe
    from lede.core.fastpath import FastLayers
    from lede.core.kernels import CpuLinear, KernelChoice, use_cpu_kernels
    from lede.testing import tiny_model

    lm = tiny_model("llama", num_layers=2, dtype=torch.float32, seed=3)
    use_cpu_kernels(lm.model)
    lm.kernels = KernelChoice("lede", "lede")
    fast = lm.fast_layers = FastLayers(lm.model)
    monkeypatch.setattr(probe, "read_bandwidth", lambda mb, repeats, device: [10.0])

    def fail_midway(items, *a, **k):
        items[-1][2]()  # route to the last variant (transformers' own layers, torch's kernel), then fail
        assert lm.fast_layers is None
        raise RuntimeError("interrupted")

    monkeypatch.setattr(probe, "round_robin", fail_midway)
    with pytest.raises(RuntimeError, match="interrupted"):
        probe.probe_floor(lm, contexts=(8,), tokens=(1, 2), kernels=("torch",))
    linears = [m for m in lm.model.modules() if isinstance(m, CpuLinear)]
    assert lm.fast_layers is fast and {(m.one_token, m.many_tokens) for m in linears} == {("lede", "lede")}


def test_price_check_flags_verification_prices_the_floor_probe_does_not_confirm() -> None:
    """The cost model and the floor probe time the same passes in one job; where their price of a T-token pass (relative
    to one token) differs by more than the tolerance at a context both measured, the check names it; within it, or at a
    context or width only one of them measured, nothing."""
    def cm(ctx: int, verify: dict) -> CostModel:
        return CostModel("m", "float32", "cpu", 2, ctx, {2: 3.0}, verify)

    costs = cm(256, {1: 25.0, 2: 27.0, 5: 37.0, 9: 55.0})  # 5 tokens at 1.48, 9 at 2.20 plain steps
    costs.by_context = {2048: cm(2048, {1: 32.0, 5: 47.0})}  # 1.47
    floor = FloorProbe("m", 2, "chosen", 35.0, [35.0], 538_000_000,
                       ms={"chosen": {256: {1: 24.5, 2: 26.1, 3: 25.7, 5: 30.2, 9: 42.2}, 1024: {1: 27.0, 5: 37.0},
                                      2048: {1: 31.9, 5: 46.7}}},
                       spread={})
    off = price_check(costs, floor)
    assert set(off) == {"256/5", "256/9"}  # 2 tokens within 15%; 3 not in the cost model; 1024 not in it; 2048 agrees
    probe = 30.2 / 24.5
    assert off["256/5"] == {"cost_model": 1.48, "floor_probe": round(probe, 3), "ratio": round(1.48 / probe, 3)}
    assert price_check(costs, floor, tolerance=0.5) == {}
    quiet = cm(256, {1: 25.4, 2: 27.5, 5: 29.3, 9: 41.7})  # the quiet study's cost model against its own probe
    assert price_check(quiet, floor) == {}
    assert price_check(quiet, FloorProbe("m", 2, "c", 35.0, [35.0], 1, ms={}, spread={})) == {}  # no probe: no check
