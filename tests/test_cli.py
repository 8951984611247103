"""The command line: ``lede bench`` with static cells and a learned policy, and its input errors (tiny model)."""

from __future__ import annotations

import json

import pytest

from conftest import tiny
from lede import Autoregressive, Decoder, RandomSchedule, Static
from lede.cli import main
from lede.core.costs import CostModel
from lede.rl.features import ActionSpace
from lede.rl.offline import collect_experience, train_policy

LAYERS = (1, 3, 5)


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory):
    """A (barely trained) LEDE policy for the tiny model's candidate layers 1, 3, 5."""
    lm, tmp = tiny("llama"), tmp_path_factory.mktemp("policy")
    costs = CostModel(model=lm.name, dtype="float64", device="cpu", threads=1, context_len=8,
                      draft_ms={l: 0.2 * l for l in LAYERS}, verify_ms={t: 1.0 + 0.05 * t for t in range(1, 8)},
                      draft_plain_ms={l: 0.2 * l for l in LAYERS})
    prompts = [("p0", "a", [5, 17, 33, 2, 9]), ("p1", "b", [40, 41, 42, 43])]
    behaviours = [Static(1, 2), Static(3, 1), RandomSchedule(list(LAYERS), 6, seed=0), Autoregressive()]
    exp = collect_experience(Decoder(lm, max_draft_len=6), prompts, behaviours, ActionSpace(LAYERS, 6), costs, 16,
                             progress=False)
    res = train_policy(exp, n_steps=40, n_steps_per_epoch=40, log_dir=tmp / "logs", fqe_steps=20,
                       target_update_interval=10)
    res.policy.save(tmp / "policy.pt")
    return tmp / "policy.pt"


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setattr("lede.drafters.loading.load_model", lambda *a, **k: tiny("llama"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ("abc abc abc", "hello world")))
    selection = tmp_path / "selected.json"
    selection.write_text(json.dumps({"vocab": None, "layers": {str(l): None for l in LAYERS}}))
    return tmp_path, prompts, selection


def test_bench_runs_static_cells_and_a_learned_policy(files, policy_file, capsys):
    tmp, prompts, selection = files
    rc = main(["bench", "--prompt-file", str(prompts), "--exit-heads", str(selection), "--max-new-tokens", "12",
               "--max-draft-len", "6", "--warmup", "0", "--threads", "1",
               "--configs", f"1:2,mine={policy_file}", "--out", str(tmp / "bench.json")])
    assert rc == 0
    records = json.loads((tmp / "bench.json").read_text())["records"]
    assert {r["config"] for r in records} == {"plain", "static_L1_K2", "mine"}
    assert all(r["identical"] and r["new_tokens"] == 12 for r in records)
    assert "mine" in capsys.readouterr().out


@pytest.mark.parametrize("configs,extra,message", [
    ("mine={policy}", [], "pass --exit-heads"),
    ("mine=/no/such/policy.pt", [], "existing policy file"),
    ("8-4", [], "the grammar is plain | static:L:K"),
    ("static:8", [], "takes 2"),
    ("confidence:4:1.5", [], "strictly between 0 and 1"),
])
def test_bench_input_errors_name_the_fix(files, policy_file, configs, extra, message):
    tmp, prompts, _ = files
    with pytest.raises(SystemExit, match=message):
        main(["bench", "--prompt-file", str(prompts), "--configs", configs.format(policy=policy_file), *extra])


def test_a_policy_for_other_exit_layers_is_refused(files, policy_file, capsys):
    tmp, prompts, _ = files
    other = tmp / "other.json"
    other.write_text(json.dumps({"vocab": None, "layers": {"1": None, "3": None}}))
    rc = main(["bench", "--prompt-file", str(prompts), "--exit-heads", str(other), "--configs", f"mine={policy_file}"])
    assert rc == 2 and "candidate layers" in capsys.readouterr().err
