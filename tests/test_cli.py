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


def test_bench_prices_the_floor_and_dynamic_exit_with_the_cost_model(files, policy_file, capsys):
    """--costs gives the policies that price rounds their cost model: a learned policy under the online floor and
    dynamic exit run, exactly; a prompt file's multi-turn chat is sent whole."""
    tmp, prompts, selection = files
    costs = CostModel(model="tiny", dtype="float64", device="cpu", threads=1, context_len=8,
                      draft_ms={l: 0.2 * l for l in LAYERS}, verify_ms={t: 1.0 + 0.05 * t for t in range(1, 18)},
                      draft_plain_ms={l: 0.2 * l for l in LAYERS})
    costs.save(tmp / "costs.json")
    chat = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "abc abc"},
            {"role": "user", "content": "abc abc abc"}]
    with prompts.open("a") as f:
        f.write(json.dumps({"id": "chat", "messages": chat}) + "\n")
    rc = main(["bench", "--prompt-file", str(prompts), "--exit-heads", str(selection), "--costs", str(tmp / "costs.json"),
               "--max-new-tokens", "12", "--max-draft-len", "6", "--warmup", "0", "--threads", "1",
               "--configs", f"floored=floor:file:{policy_file},dynamic", "--out", str(tmp / "bench.json")])
    assert rc == 0, capsys.readouterr().err
    records = json.loads((tmp / "bench.json").read_text())["records"]
    assert {r["config"] for r in records} == {"plain", "floored", "dynamic_exit"}
    assert all(r["identical"] for r in records) and len({r["prompt"] for r in records}) == 3


@pytest.mark.parametrize("configs,extra,message", [
    ("mine={policy}", [], "pass --exit-heads"),
    ("floor:lookup:3", [], "pass --costs results/costs.json"),
    ("dynamic", [], "pass --costs results/costs.json"),
    ("mine=/no/such/policy.pt", [], "existing policy file"),
    ("8-4", [], "the grammar is plain | static:L:K"),
    ("static:8", [], "takes 2"),
    ("confidence:4:1.5", [], "strictly between 0 and 1"),
])
def test_bench_input_errors_name_the_fix(files, policy_file, configs, extra, message, capsys):
    tmp, prompts, _ = files
    rc = main(["bench", "--prompt-file", str(prompts), "--configs", configs.format(policy=policy_file), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and err.startswith("lede: error: ")


def _no_model(*a, **k):
    raise AssertionError("the model was loaded before the input was checked")


@pytest.fixture
def bad_inputs(tmp_path, monkeypatch):
    """Files a careless user passes: truncated JSON, a garbage .pt, a LLaMA config folder without weights."""
    monkeypatch.setattr("lede.drafters.loading.load_model", _no_model)
    (tmp_path / "trunc.json").write_text('{"vocab": null, "layers": {"1": ')
    (tmp_path / "garbage.pt").write_bytes(b"PK\x03\x04 garbage, not a torch file")
    (tmp_path / "adapter_sel.json").write_text(json.dumps({"vocab": None, "layers": {"1": "garbage.pt"}}))
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return tmp_path


CASES = [
    (["bench", "--exit-heads", "/nonexistent.json"], "selection file /nonexistent.json does not exist"),
    (["bench", "--exit-heads", "{t}/trunc.json"], "trunc.json is not valid JSON"),
    (["bench", "--exit-heads", "{t}/adapter_sel.json"], "garbage.pt is not a readable exit adapter"),
    (["bench", "--exit-heads", "{t}/adapter_sel.json", "--configs", "x={t}/garbage.pt"], "garbage.pt"),
    (["bench", "--configs", "x={t}/garbage.pt"], "garbage.pt is not a readable lede policy file"),
    (["bench", "--prompt-file", "{t}/missing.jsonl"], "--prompt-file {t}/missing.jsonl: no such file"),
    (["bench", "--per-category", "0"], "--per-category=0 must be >= 1"),
    (["generate", "--prompt", "hi", "--autoregressive", "--temperature", "nan"], "--temperature=nan must be a finite"),
    (["generate", "--prompt", "hi", "--autoregressive", "--temperature", "inf"], "--temperature=inf must be a finite"),
    (["generate", "--prompt", "hi", "--autoregressive", "--temperature", "-1"], "--temperature=-1.0 must be"),
    (["generate", "--prompt", "hi", "--autoregressive", "--top-p", "1.5"], "--top-p=1.5 must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--autoregressive", "--max-draft-len", "-5"], "--max-draft-len=-5 must be >= 1"),
    (["generate", "--prompt", "hi", "--autoregressive", "--max-new-tokens", "0"], "--max-new-tokens=0 must be >= 1"),
    (["generate", "--prompt", "hi", "--exit-layer", "2", "--draft-len", "40"], "draft length 40 exceeds --max-draft-len=16"),
    (["generate", "--prompt", "hi", "--policy", "static:0"], "'static' takes 2"),
    (["generate", "--prompt", "hi", "--policy", "confidence:2:nan"], "strictly between 0 and 1"),
    (["generate", "--prompt", "hi"], "pass --policy SPEC"),
    (["generate", "--prompt", " ", "--autoregressive"], "empty prompt"),
    (["generate", "--prompt", "hi", "--autoregressive", "--temperature", "warm"], "invalid float value: 'warm'"),
    (["generate", "--prompt", "hi", "--autoregressive", "--model", "{t}/llama"], "has a config.json but no weights"),
    (["generate", "--prompt", "hi", "--autoregressive", "--model", "smollm3-999m"], "did you mean the alias"),
    (["generate", "--prompt", "hi", "--autoregressive", "--early-exit-weights", "{t}/garbage.pt"],
     "{t}/garbage.pt is not a readable early-exit weights"),
    (["generate", "--prompt", "hi", "--autoregressive", "--device", "cuda:0"], "CUDA is not available"),
    (["generate", "--prompt", "hi", "--autoregressive", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["generate", "--prompt", "hi", "--autoregressive", "--kernels", "fast"], "invalid choice: 'fast'"),
    (["costs", "--contexts", "256,x"], "--contexts '256,x': expected comma-separated integers"),
    (["costs", "--tokens", "0,1"], "--tokens '0,1': expected distinct integers >= 1"),
    (["costs", "--repeats", "0"], "--repeats=0 must be >= 1"),
    (["costs", "--bandwidth-mb", "1"], "--bandwidth-mb=1 must be >= 64"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_every_input_error_is_one_line_exit_2_and_loads_no_model(bad_inputs, argv, message, capsys, monkeypatch):
    import torch

    if "cuda:0" in argv:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if "smollm3-999m" in argv:
        monkeypatch.setattr("lede.core.model.hub_reachable", lambda *a, **k: False)  # as on this machine
    t = str(bad_inputs)
    argv = [a.replace("{t}", t) for a in argv]
    if argv[0] == "bench" and "--prompt-file" not in argv:
        argv += ["--prompt-file", f"{t}/prompts.jsonl"]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("lede: error: ") and err.count("\n") == 1, err
    assert message.replace("{t}", t) in err, err
    assert "Traceback" not in err


def test_a_policy_for_other_exit_layers_is_refused(files, policy_file, capsys):
    tmp, prompts, _ = files
    other = tmp / "other.json"
    other.write_text(json.dumps({"vocab": None, "layers": {"1": None, "3": None}}))
    rc = main(["bench", "--prompt-file", str(prompts), "--exit-heads", str(other), "--configs", f"mine={policy_file}"])
    assert rc == 2 and "candidate layers" in capsys.readouterr().err


def test_costs_probes_the_floor_and_writes_the_issue_shape(files, capsys, monkeypatch):
    """`lede costs` on the tiny model: bandwidth, weight bytes, floor, T-token passes per kernel, plain decoding per
    kernel beside transformers' generate, the JSON in the shape the issue asks for; a context past the model's positions
    is one line before any timing."""
    import torch

    import lede.eval.cost_probe as probe
    from lede.core.fastpath import FastLayers
    from lede.core.kernels import KernelChoice, use_cpu_kernels
    from lede.testing import tiny_model

    def float32_on_our_kernels(*a, **k):
        lm = tiny_model("llama", num_layers=4, dtype=torch.float32, seed=3)
        use_cpu_kernels(lm.model)
        lm.kernels = KernelChoice("lede", "lede")
        lm.fast_layers = FastLayers(lm.model)
        return lm

    monkeypatch.setattr("lede.drafters.loading.load_model", float32_on_our_kernels)
    tmp, _, _ = files
    monkeypatch.setattr(probe, "read_bandwidth", lambda mb, repeats, device: [10.0, 12.0])  # no 2 GiB buffer in a unit test
    out = tmp / "floor.json"
    argv = ["costs", "--contexts", "16,40", "--tokens", "1,2,3", "--repeats", "2", "--decode-prompts", "2",
            "--max-new-tokens", "6", "--flip-positions", "20", "--threads", "1", "--json", str(out)]
    assert main(argv) == 0
    got = json.loads(out.read_text())
    assert got["bandwidth_gb_s"] == 11.0 and got["weight_bytes"] > 0
    assert got["floor_ms"] == pytest.approx(got["weight_bytes"] / 11e9 * 1e3, rel=1e-3)
    assert set(got["contexts"]) == {"16", "40"}
    for ctx in got["contexts"].values():
        assert set(ctx["ms"]) == {"1", "2", "3"} and set(ctx["ratio_to_one_token"]) == {"2", "3"}
        assert ctx["ratio_to_one_token"]["3"] == pytest.approx(ctx["ms"]["3"] / ctx["ms"]["1"], rel=1e-2)
    assert got["one_token_over_floor"] == pytest.approx(got["contexts"]["16"]["ms"]["1"] / got["floor_ms"], rel=1e-2)
    assert {"torch", "torch_own_layers"} <= set(got["by_kernel"]) and len(got["targets"]) == 3
    assert set(got["decode"]["tokens_per_s"]) >= {"hf_generate", "torch", "torch_own_layers", "lede_own_layers"}
    assert got["decode"]["identity_rate"]["torch"] == 1.0  # a random tiny model has no near-ties: the same tokens
    flips = got["width_agreement"]
    assert {"chosen/5", "chosen/9", "torch/9"} <= set(flips) and flips["chosen/5"]["positions"] == 20
    assert all(f["argmax_differs"] == len(f["top2_margin_at_differences"]) for f in flips.values())
    assert "floor" in capsys.readouterr().out
    assert main(["costs", "--contexts", "505"]) == 2  # + 9 tokens > the tiny model's 512 positions
    assert "exceed the model's 512 positions" in capsys.readouterr().err
