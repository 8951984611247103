"""LEDE's decision process, experience logging, d3rlpy training and the learned policy (tiny models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny
from lede import Autoregressive, Decoder, RandomSchedule, Static
from lede.core.costs import CostModel
from lede.rl.features import COPY_RUN_CAP, ActionSpace, FeatureTracker, decision_rewards, feature_names
from lede.rl.oracle import Oracle, oracle_runs
from lede.core.policy import RoundRecord
from lede.rl.offline import (EpochFQE, EpsilonPerturbed, Experience, PolicyError, Recorder, RLPolicy, TrainResult, collect_experience,
                     off_policy_value, train_policy, valid_action_impls)

LAYERS = (1, 3, 5)
SPACE = ActionSpace(LAYERS, 6)
PROMPTS = [("p0", "a", [5, 17, 33, 2, 9]), ("p1", "b", [40, 41, 42, 43]), ("p2", "a", [7, 7, 7, 90, 3])]


def costs(draft=0.2, name="tiny-llama-s0"):
    return CostModel(model=name, dtype="float64", device="cpu", threads=1, context_len=8,
                     draft_ms={l: draft * l for l in LAYERS}, verify_ms={t: 1.0 + 0.05 * (t - 1) for t in range(1, 8)},
                     draft_plain_ms={l: draft * l for l in LAYERS})


def test_action_space_round_trip_and_masks():
    assert SPACE.size == 6 and SPACE.stop == 4 and SPACE.more == 5
    assert [SPACE.layer_of(SPACE.start_action(l)) for l in (None, *LAYERS)] == [None, *LAYERS]
    assert SPACE.valid_mask(True).tolist() == [True, True, True, True, False, False]
    assert SPACE.valid_mask(False).tolist() == [False, False, False, False, True, True]
    assert SPACE.valid_masks(np.array([False, True, True])).tolist() == [
        SPACE.valid_mask(False).tolist(), SPACE.valid_mask(True).tolist(), SPACE.valid_mask(True).tolist()]
    with pytest.raises(ValueError, match="not a candidate"):
        SPACE.start_action(2)


def test_per_round_action_space():
    space = ActionSpace(LAYERS, 6, per_round=True)
    assert space.size == 1 + 3 * 6 and space.valid_mask(True).all() and not space.valid_mask(False).any()
    pairs = [(None, 0)] + [(l, k) for l in LAYERS for k in range(1, 7)]
    assert [space.round_of(space.round_action(l, k)) for l, k in pairs] == pairs
    assert sorted(space.round_action(l, k) for l, k in pairs) == list(range(space.size))
    assert space.round_action(3, 0) == 0 and space.layer_of(space.round_action(5, 2)) == 5
    with pytest.raises(ValueError, match="no stop"):
        space.stop
    with pytest.raises(ValueError, match="outside 1..6"):
        space.round_action(1, 7)
    with pytest.raises(ValueError, match="needs a per-round"):
        SPACE.round_action(1, 1)


def test_round_returns_are_tokens_minus_weighted_cost():
    c = costs()
    rounds = [RoundRecord(None, 0, 0, 0, 0, 0), RoundRecord(3, 4, 2, 0, 0, 0), RoundRecord(1, 1, 1, 0, 0, 0)]
    actions = [0, 2, 5, 5, 5, 4, 1, 5]  # plain; L3 + 3 more + stop; L1 + an ignored "more" at the cap
    v = {t: ms / c.plain_ms for t, ms in c.verify_ms.items()}
    for w in (1.0, 0.5):
        for credit in ("per_draft", "at_verify"):  # the same round returns, split differently
            r = decision_rewards(actions, rounds, SPACE, c, w, credit)
            assert len(r) == len(actions)
            assert r[0] == pytest.approx(1 - w)
            assert sum(r[1:6]) == pytest.approx(3 - w * (4 * c.draft_ms[3] + c.verify_ms[5]) / c.plain_ms)
            assert sum(r[6:]) == pytest.approx(2 - w * (c.draft_ms[1] + c.verify_ms[2]) / c.plain_ms)
        # per draft: drafts 1-2 of the L3 round were accepted, 3-4 not; each pays its draft and verification share
        r = decision_rewards(actions, rounds, SPACE, c, w, "per_draft")
        c3 = c.draft_ms[3] / c.plain_ms
        assert r[1:6] == pytest.approx([1 - w * (c3 + v[2] - v[1]), 1 - w * (c3 + v[3] - v[2]),
                                        -w * (c3 + v[4] - v[3]), -w * (c3 + v[5] - v[4]), 1 - w])
        r = decision_rewards(actions, rounds, SPACE, c, w, "at_verify")
        assert r[1:6] == pytest.approx([-w * c3] * 4 + [3 - w * v[5]])
    with pytest.raises(ValueError, match="logged decisions"):
        decision_rewards(actions[:-1], rounds, SPACE, c)
    with pytest.raises(ValueError, match="unknown reward credit 'later'"):
        decision_rewards(actions, rounds, SPACE, c, credit="later")


def test_recorder_is_transparent_and_logs_every_decision():
    lm = tiny("llama")
    dec = Decoder(lm)
    for uid, _, ids in PROMPTS:
        ref = dec.generate(ids, Autoregressive(), max_new_tokens=30).token_ids
        rec = Recorder(RandomSchedule(list(LAYERS), 6, seed=2), SPACE)
        out = dec.generate(ids, rec, max_new_tokens=30)
        assert out.token_ids == ref
        assert len(rec.actions) == len(out.rounds) + sum(r.drafted for r in out.rounds)
        assert all(o.shape == (len(feature_names(SPACE)),) and np.isfinite(o).all() for o in rec.obs)


def test_copy_feature_fires_on_repetition():
    from lede.core.policy import DecodeState

    tr = FeatureTracker(SPACE)
    names = feature_names(SPACE)
    st = DecodeState(6, 4, 20, tokens=[1, 2], prompt_ids=[1, 2, 3, 4])
    f = tr.features(st, True)
    assert f[names.index("copy_bigram")] == 1.0  # "1 2" occurred in the prompt
    assert f[names.index("lookup_len")] == pytest.approx(4 / SPACE.max_draft_len)  # a lookup would propose 3 4 1 2
    assert f[names.index("copy_run")] == pytest.approx(np.log1p(2) / np.log1p(COPY_RUN_CAP))  # copying for 2 tokens
    st.tokens.append(9)
    f = tr.features(st, True)
    assert f[names.index("copy_bigram")] == 0.0 and f[names.index("lookup_len")] == 0.0
    assert f[names.index("copy_run")] == 0.0


def test_copy_run_counts_the_whole_copied_span():
    from lede.core.lookup import NgramIndex

    text = [5, 6, 7, 8, 9, 1, 2, 3]
    idx = NgramIndex().sync(text, [5, 6, 7, 8, 9, 1])  # copying "5 6 7 8 9 1" for 6 tokens; the n-gram match is 3
    assert idx.match_size() == 3 and idx.match_run() == 6 and idx.candidates(4) == [2, 3, 5, 6]
    assert idx.match_run(cap=4) == 4
    assert NgramIndex().sync([1, 2, 3], [4]).match_run() == 0  # no match


@pytest.fixture(scope="module")
def experience():
    lm = tiny("llama")
    behaviours = [Static(l, k) for l in LAYERS for k in (1, 3)] + [RandomSchedule(list(LAYERS), 6, seed=s) for s in range(2)]
    behaviours.append(EpsilonPerturbed(Static(3, 2), SPACE, 0.3, seed=1))
    behaviours.append(Autoregressive())
    return collect_experience(Decoder(lm, max_draft_len=6), PROMPTS, behaviours, SPACE, costs(), 24, progress=False)


def test_experience_layout_and_round_trip(experience, tmp_path):
    exp = experience
    assert len(exp) > 100 and exp.terminals.sum() == len(exp.behaviour)
    assert set(np.unique(exp.actions)) == set(range(SPACE.size))  # the data covers the action space
    exp.save(tmp_path / "exp")
    back = Experience.load(tmp_path / "exp")
    assert np.array_equal(back.obs, exp.obs) and np.array_equal(back.actions, exp.actions)
    assert back.truncated == exp.truncated
    assert (tmp_path / "exp.h5").stat().st_size > 0
    # greedy output does not depend on the policy: every episode of a prompt ends as plain decoding does
    dec = Decoder(tiny("llama"), max_draft_len=6)
    finish = [dec.generate(ids, Autoregressive(), max_new_tokens=24).finish_reason for _, _, ids in PROMPTS]
    per_prompt = len(exp.behaviour) // len(PROMPTS)
    assert exp.truncated == [f == "length" for f in finish for _ in range(per_prompt)]


def test_budget_end_is_a_timeout_and_eos_a_terminal():
    """A generation cut by the token budget bootstraps (timeout); one that ended at EOS is absorbing."""
    f = len(feature_names(SPACE))
    episode = np.array([0, 0, 0, 1, 1])
    exp = Experience(SPACE, feature_names(SPACE), np.random.default_rng(0).normal(size=(5, f)).astype(np.float32),
                     np.array([0, 0, 0, 0, 0]), np.ones(5, np.float32), np.array([0, 0, 1, 0, 1], np.float32), episode,
                     ["a", "a"], ["p", "q"], ["c", "c"], {"model": "m"}, truncated=[True, False])
    terminals, timeouts = exp.ends()
    assert terminals.tolist() == [0, 0, 0, 0, 1] and timeouts.tolist() == [0, 0, 1, 0, 0]
    ds = exp.mdp_dataset()
    assert [e.terminated for e in ds.episodes] == [False, True]
    assert [e.transition_count for e in ds.episodes] == [2, 2]  # the cut episode's last decision has no next state
    fields = ("space", "names", "obs", "actions", "rewards", "terminals", "episode", "behaviour", "prompt", "category")
    legacy = Experience(*[getattr(exp, k) for k in fields])
    assert legacy.ends()[0].tolist() == [0, 0, 1, 0, 1]  # no flags: every end is terminal
    with pytest.raises(PolicyError, match="truncation flags"):
        Experience(*[getattr(exp, k) for k in (*fields, "meta")], truncated=[True]).check()


@pytest.mark.parametrize("algo", ["DiscreteCQL", "DiscreteBCQ", "DiscreteBC"])
def test_train_and_decode_exactly(experience, tmp_path, algo):
    res = train_policy(experience, algo=algo, seed=0, n_steps=200, n_steps_per_epoch=100, log_dir=tmp_path / "logs",
                       fqe_steps=0, eval_episodes=3, target_update_interval=50)
    assert len(res.history) == 2
    assert [e.terminated for e in res.dataset.episodes] == [not t for t in experience.truncated]  # budget ends bootstrap
    # per-epoch metrics on a strided sample of episodes, not all of them
    assert 2 <= res.policy.info["eval_episodes"] <= 3 < res.policy.info["episodes"]
    # FQE deferred (fqe_steps=0: the workflow runs it on the kept restart only), then run on the result
    assert res.fqe_value is None and res.policy.info["fqe_initial_state_value"] is None
    value = off_policy_value(res, 100, tmp_path / "logs", "fqe")
    if algo == "DiscreteBC":  # no Q-function
        assert value is None
    else:
        assert {"td_error", "initial_state_value"} <= set(res.history[-1])
        assert isinstance(value, float) and res.fqe_value == res.policy.info["fqe_initial_state_value"] == value
        assert (tmp_path / "logs/fqe").is_dir()
    with pytest.raises(PolicyError, match="needs the TrainResult"):
        off_policy_value(TrainResult(res.policy, res.history, None))
    res.policy.save(tmp_path / "p.pt")
    policy = RLPolicy.load(tmp_path / "p.pt", lm_name="tiny-llama-s0", exit_layers=LAYERS)
    lm = tiny("llama")
    dec = Decoder(lm, max_draft_len=6)
    for _, _, ids in PROMPTS:
        assert dec.generate(ids, policy, max_new_tokens=30).token_ids == dec.generate(ids, Autoregressive(), max_new_tokens=30).token_ids
    # train_policy checked that the exported networks act as d3rlpy's policy does; the numpy forward used per
    # decision equals the exported torch network, and BCQ keeps its imitator's filter
    x = experience.obs[:64]
    with torch.no_grad():
        q = res.policy.q_net(torch.from_numpy((x - policy.mean) * policy.inv_std)).numpy()
    np.testing.assert_allclose(policy.q_values(x), q, rtol=1e-5, atol=1e-5)
    assert (res.policy.imitator is not None) == (algo == "DiscreteBCQ")
    with pytest.raises(PolicyError, match="trained for model"):
        RLPolicy.load(tmp_path / "p.pt", lm_name="other")
    with pytest.raises(PolicyError, match="candidate layers"):
        RLPolicy.load(tmp_path / "p.pt", exit_layers=(1, 2))


def test_fqe_per_epoch_is_logged_and_leaves_the_training_unchanged(experience, tmp_path):
    kw = dict(algo="DiscreteCQL", seed=0, n_steps=150, n_steps_per_epoch=50, fqe_steps=0, eval_episodes=3,
              target_update_interval=50)
    plain = train_policy(experience, log_dir=tmp_path / "a", **kw)
    watched = train_policy(experience, log_dir=tmp_path / "b", fqe_epoch_steps=30, **kw)
    assert "fqe_initial_state_value" not in plain.history[0] and plain.policy.info["fqe_epoch_steps"] == 0
    values = [h["fqe_initial_state_value"] for h in watched.history]
    assert len(values) == 3 and all(np.isfinite(values)) and len(set(values)) == 3  # one continued FQE, read per epoch
    assert watched.policy.info["fqe_epoch_steps"] == 30
    # the FQE's random draws are taken from saved states: the same training, step for step
    for a, b in zip(plain.policy.q_net.state_dict().values(), watched.policy.q_net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [h["td_error"] for h in plain.history] == [h["td_error"] for h in watched.history]
    with pytest.raises(ValueError, match="fqe_epoch_steps"):
        EpochFQE(0, 0.9, [])


@pytest.mark.parametrize("algo", ["DiscreteCQL", "DoubleDQN", "DiscreteBCQ"])
def test_learner_bootstraps_from_valid_actions_only(experience, tmp_path, algo):
    """d3rlpy's target argmax (and CQL's logsumexp) range over the actions valid in the next state's phase."""
    kw = dict(algo=algo, seed=0, n_steps=100, n_steps_per_epoch=100, fqe_steps=0, eval_episodes=2,
              target_update_interval=50)
    res = train_policy(experience, log_dir=tmp_path / "a", **kw)
    impl, pf = res.fitted.impl, res.policy
    x = torch.from_numpy((experience.obs - np.array(pf.mean, np.float32)) / np.array(pf.std, np.float32))
    start = experience.obs[:, 0] > 0.5
    best = impl.inner_predict_best_action(x).numpy()
    assert start.any() and (~start).any()
    assert np.isin(best[~start], [SPACE.stop, SPACE.more]).all()
    assert (best[start] <= len(LAYERS)).all()  # plain or a drafter
    q = impl._q_func_forwarder.compute_expected_q(x).detach()
    if algo == "DiscreteCQL":  # the penalty's logsumexp over the valid actions of each state
        act = torch.from_numpy(experience.actions).long()
        mask = torch.from_numpy(SPACE.valid_masks(start))
        want = (torch.logsumexp(q.masked_fill(~mask, -torch.inf), 1) - q.gather(1, act[:, None]).squeeze(1)).mean()
        assert float(impl._compute_conservative_loss(x, act).detach()) == pytest.approx(float(want), rel=1e-5)
    # d3rlpy as shipped (valid_only=False) takes the argmax over every action: the restriction is what differs
    plain = train_policy(experience, log_dir=tmp_path / "b", valid_only=False, **kw)
    assert type(res.fitted.impl) is valid_action_impls()[algo] and res.policy.info["valid_only"] is True
    assert type(plain.fitted.impl) is valid_action_impls()[algo].__mro__[2]  # d3rlpy's own class
    assert plain.policy.info["valid_only"] is False


def test_round_discount_intervals(experience):
    """discount="round": γ^interval with interval 1 only for the decision that ends its round."""
    exp = experience
    ds = exp.mdp_dataset("round")
    picker = ds.transition_picker
    start = exp.obs[:, 0] == 1.0
    got, want = [], []
    row = 0
    for ep in ds.episodes:
        for i in range(ep.transition_count):
            got.append(picker(ep, i).interval)
            ends = i + 1 >= ep.size() or start[row + i + 1]  # a budget-cut episode's last transition: its next row
            want.append(int(ends))
        row += ep.size()
    assert got == want and 0 < sum(got) < len(got)
    assert any(not ep.terminated for ep in ds.episodes)  # the budget-cut case is exercised
    assert all(exp.mdp_dataset().transition_picker(ep, 0).interval == 1 for ep in ds.episodes[:3])
    with pytest.raises(ValueError, match="discount="):
        exp.mdp_dataset("time")


def test_train_with_round_discount(experience, tmp_path):
    res = train_policy(experience, algo="DoubleDQN", seed=0, n_steps=50, n_steps_per_epoch=50, log_dir=tmp_path,
                       fqe_steps=0, eval_episodes=2, target_update_interval=25, discount="round")
    assert res.policy.info["discount"] == "round" and res.dataset.transition_picker.__class__.__name__ == "RoundDiscount"


def test_per_round_experience_keeps_each_rounds_return(experience):
    rounds = experience.per_round()
    start = experience.obs[:, experience.names.index("phase_start")] == 1
    assert rounds.space == ActionSpace(LAYERS, 6, per_round=True) and len(rounds) == start.sum()
    assert np.array_equal(rounds.obs, experience.obs[start]) and rounds.truncated == experience.truncated
    for e in range(len(experience.behaviour)):  # the same return per episode, the same ends
        assert rounds.rewards[rounds.episode == e].sum() == pytest.approx(experience.rewards[experience.episode == e].sum(), abs=1e-4)
        assert rounds.terminals[rounds.episode == e].tolist()[-1] == 1 == rounds.terminals[rounds.episode == e].sum()
    for e, b in enumerate(experience.behaviour):  # a static behaviour's rounds are (its layer, <= its K) or plain
        if b.startswith("static_L"):
            layer, k = (int(x) for x in b.removeprefix("static_L").split("_K"))
            chosen = {rounds.space.round_of(int(a)) for a in rounds.actions[rounds.episode == e]}
            assert chosen - {(None, 0)} and all(l in (None, layer) and kk <= k for l, kk in chosen)
    assert rounds.per_round() is rounds


def test_per_round_policy_trains_and_decodes_exactly(experience, tmp_path):
    res = train_policy(experience, seed=0, n_steps=200, n_steps_per_epoch=100, log_dir=tmp_path / "logs", fqe_steps=0,
                       eval_episodes=3, target_update_interval=50, decision="round")
    # a generation cut by the budget is a timeout in the fitted dataset, not a terminal
    assert [e.terminated for e in res.dataset.episodes] == [not t for t in experience.truncated]
    assert res.policy.decision == res.policy.info["decision"] == "round"
    res.policy.save(tmp_path / "p.pt")
    policy = RLPolicy.load(tmp_path / "p.pt", lm_name="tiny-llama-s0", exit_layers=LAYERS)
    assert policy.space.per_round and policy.q_values(experience.obs[:2]).shape == (2, 1 + 3 * 6)
    dec = Decoder(tiny("llama"), max_draft_len=6)
    for _, _, ids in PROMPTS:
        out = dec.generate(ids, policy, max_new_tokens=30)
        assert out.token_ids == dec.generate(ids, Autoregressive(), max_new_tokens=30).token_ids
    with pytest.raises(ValueError, match="decision='later'"):
        train_policy(experience, decision="later")


def test_empty_and_mismatched_datasets_fail_clearly(experience):
    empty = Experience(SPACE, feature_names(SPACE), np.zeros((0, len(feature_names(SPACE))), np.float32),
                       np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                       [], [], [])
    with pytest.raises(PolicyError, match="empty"):
        train_policy(empty)
    bad = Experience(ActionSpace((1, 3), 6), experience.names, experience.obs, experience.actions, experience.rewards,
                     experience.terminals, experience.episode, experience.behaviour, experience.prompt, experience.category)
    with pytest.raises(PolicyError, match="feature"):
        bad.check()
    with pytest.raises(PolicyError, match="unknown RL algorithm"):
        train_policy(experience, algo="PPO")
    with pytest.raises(ValueError, match="eval_episodes=0"):
        train_policy(experience, eval_episodes=0)
    with pytest.raises(ValueError, match="target network would never be updated"):
        train_policy(experience, n_steps=200, target_update_interval=500)
    anonymous = Experience(*[getattr(experience, f) for f in ("space", "names", "obs", "actions", "rewards", "terminals",
                                                              "episode", "behaviour", "prompt", "category")])
    with pytest.raises(PolicyError, match="which model"):  # a policy must name the model it was trained for
        train_policy(anonymous)


def test_oracle_is_exact_and_beats_static_rounds():
    lm = tiny("llama")
    dec = Decoder(lm, max_draft_len=6)
    c = costs(draft=0.05)
    for _, _, ids in PROMPTS:
        ref = dec.generate(ids, Autoregressive(), max_new_tokens=30).token_ids
        runs = oracle_runs(lm, {l: dec.head(l) for l in LAYERS}, ids, ref, list(LAYERS))
        out = dec.generate(ids, Oracle(runs, c, 6), max_new_tokens=30)
        assert out.token_ids == ref
        oracle_ms = sum(c.round_ms(r.exit_layer, r.drafted) for r in out.rounds)
        for l in LAYERS:
            st = dec.generate(ids, Static(l, 2), max_new_tokens=30)
            assert oracle_ms <= sum(c.round_ms(r.exit_layer, r.drafted) for r in st.rounds) + 1e-9
        # in hindsight no drafted token is ever rejected
        assert all(r.accepted == r.drafted for r in out.rounds[:-1])


def test_reward_scale_makes_the_fit_mean_seeking(tmp_path):
    """d3rlpy's Huber loss (width 1) fits a median-like value to rewards that spread over several units: an
    all-or-nothing round (−1 or +4, mean 1.25) then looks worse than a sure 0.8. Scaled rewards (×0.1) keep the
    residuals in the quadratic range, so the Q-values are expected returns and the better action wins."""
    rng = np.random.default_rng(0)
    n, f = 2000, len(feature_names(SPACE))
    obs = np.zeros((n, f), np.float32)  # one state: nothing to memorise a sample's outcome by
    obs[:, 0] = 1.0  # every decision is a round start; each episode is one terminal decision (a bandit)
    actions = np.where(np.arange(n) % 2 == 0, 1, 2)
    risky = np.where(rng.random(n) < 0.45, 4.0, -1.0)
    rewards = np.where(actions == 1, risky, 0.8).astype(np.float32)
    exp = Experience(SPACE, feature_names(SPACE), obs, actions, rewards, np.ones(n, np.float32), np.arange(n),
                     ["b"] * n, [f"p{i}" for i in range(n)], ["c"] * n, {"model": "tiny-llama-s0"}, [False] * n)
    chosen = {}
    for scale in (1.0, 0.1):
        res = train_policy(exp, algo="DoubleDQN", seed=0, n_steps=600, n_steps_per_epoch=600, log_dir=tmp_path,
                           run_name=f"s{scale}", fqe_steps=0, eval_episodes=2, target_update_interval=100,
                           gamma=0.0, lr=1e-3, reward_scale=scale)
        pol = RLPolicy(res.policy)
        q = pol.q_values(obs[:1])[0] / scale  # back in reward units
        chosen[scale] = q
        assert res.policy.info["reward_scale"] == scale
    assert chosen[1.0][1] < chosen[1.0][2]  # Huber: the risky action's value near its median side (~ −0.2)
    assert chosen[0.1][1] > chosen[0.1][2]  # mean-seeking: 1.25 > 0.8
    assert chosen[0.1][1] == pytest.approx(1.25, abs=0.2) and chosen[0.1][2] == pytest.approx(0.8, abs=0.1)
    with pytest.raises(PolicyError, match="reward_scale"):
        train_policy(exp, algo="DoubleDQN", n_steps=10, n_steps_per_epoch=10, log_dir=tmp_path, fqe_steps=0,
                     target_update_interval=5, reward_scale=0.0)
