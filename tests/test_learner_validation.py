"""The learner-validation helpers: which dev prompts train, which validate, and the experience restricted to them."""

import numpy as np
import pytest

from lede.drafters.distill import Sequence
from lede.rl.features import ActionSpace, feature_names
from lede.rl.learner_validation import Setting, dev_halves, experience_of
from lede.rl.offline import Experience

SPACE = ActionSpace((0, 2, 4), 4)


def test_dev_halves_first_n_per_category_train_the_rest_validate():
    seqs = [Sequence([1], [2, 3], c, f"{c}/{i}") for c in ("a", "b") for i in range(3)]
    seqs.append(Sequence([1], [], "b", "b/empty"))  # no continuation: nothing to replay along
    train, val = dev_halves(seqs, 2)
    assert train == {"a/0", "a/1", "b/0", "b/1"}
    assert [s.uid for s in val] == ["a/2", "b/2"]
    with pytest.raises(ValueError, match="no validation sequences"):
        dev_halves(seqs[:2], 2)


def test_experience_of_keeps_whole_episodes_of_the_prompts_renumbered():
    f = len(feature_names(SPACE))
    episode = np.array([0, 0, 1, 2, 2, 2])
    obs = np.arange(6 * f, dtype=np.float32).reshape(6, f)
    exp = Experience(SPACE, feature_names(SPACE), obs, np.arange(6), np.arange(6, dtype=np.float32),
                     np.array([0, 1, 1, 0, 0, 1], np.float32), episode, ["x", "y", "z"], ["p", "q", "p"],
                     ["c", "c", "c"], {"model": "m"}, truncated=[True, False, False])
    sub = experience_of(exp, {"p"})
    assert sub.episode.tolist() == [0, 0, 1, 1, 1] and sub.actions.tolist() == [0, 1, 3, 4, 5]
    assert sub.behaviour == ["x", "z"] and sub.truncated == [True, False] and np.array_equal(sub.obs, obs[[0, 1, 3, 4, 5]])
    sub.check()
    with pytest.raises(ValueError, match="no logged episode"):
        experience_of(exp, {"other"})


def test_setting_parse_names_the_bad_part():
    assert Setting.parse("DiscreteCQL,gamma=0.9,alpha=1") == Setting("DiscreteCQL", 0.9, 1.0)
    assert Setting.parse("DoubleDQN,n_steps=500").n_steps == 500
    assert Setting.parse("DiscreteCQL,decision=round").decision == "round"
    assert Setting.parse("DiscreteCQL,timeouts=0").timeouts is False and Setting().timeouts is True
    assert Setting.parse("DoubleDQN,valid=0").valid is False and "all actions" in Setting.parse("DoubleDQN,valid=0").name
    assert Setting.parse("FullInfo,epochs=5,iters=1") == Setting("FullInfo", epochs=5, iters=1)
    assert Setting.parse("DoubleDQN,scale=0.1").scale == 0.1 and "×0.1" in Setting.parse("DoubleDQN,scale=0.1").name
    full = Setting.parse("DoubleDQN,data=full,weight=1.5,every=0")
    assert (full.weight, full.every, full.decision) == (1.5, False, "round")
    assert "w1.5" in full.name and "one drawn action" in full.name and Setting().every is True
    with pytest.raises(ValueError, match="valid='2' must be 0 or 1"):
        Setting.parse("DoubleDQN,valid=2")
    with pytest.raises(ValueError, match="every='yes' must be 0 or 1"):
        Setting.parse("DoubleDQN,data=full,every=yes")
    with pytest.raises(ValueError, match="decision='rounds'"):
        Setting.parse("DiscreteCQL,decision=rounds")
    with pytest.raises(ValueError, match="unknown algorithm"):
        Setting.parse("PPO")
    with pytest.raises(ValueError, match="'lr=1'"):
        Setting.parse("DiscreteCQL,lr=1")
