"""The benchmark's run order (every configuration once per prompt, in a seeded order whose predecessors vary) and
its resume journal (an interrupted benchmark resumes where it stopped)."""

from collections import Counter

import pytest
from conftest import tiny

from lede.eval.bench import BenchJournal, BenchPrompt, run_bench, run_order
from lede.core.engine import Decoder
from lede.core.policy import Static

NAMES = ["plain", "hf_generate", "static", "adaptive", "lede", "oracle"]


def test_run_order_is_a_seeded_permutation_with_varying_predecessors() -> None:
    orders = [run_order(NAMES, i, 0) for i in range(60)]
    assert all(sorted(o) == sorted(NAMES) for o in orders)
    assert orders == [run_order(NAMES, i, 0) for i in range(60)]  # the same in every run
    assert run_order(NAMES, 0, 1) != run_order(NAMES, 0, 0) or run_order(NAMES, 1, 1) != run_order(NAMES, 1, 0)
    # a rotated order gave each config one predecessor; here each one follows most of the others, and every
    # config runs first on some prompts
    for name in NAMES:
        before = Counter(o[o.index(name) - 1] for o in orders if o.index(name) > 0)
        assert len(before) >= len(NAMES) - 2, (name, before)
    assert set(o[0] for o in orders) == set(NAMES)


class _Interrupt(Exception):
    pass


def test_an_interrupted_benchmark_resumes_from_its_journal(tmp_path) -> None:
    dec = Decoder(tiny("llama"), max_draft_len=2)
    prompts = [BenchPrompt(f"p{i}", "cat", tuple(range(3 + i, 9 + i))) for i in range(3)]
    ran = []

    def static(p):  # a per-prompt config that can be made to fail on the last prompt, as a kill would
        ran.append(p.uid)
        if p.uid == "p2" and fail:
            raise _Interrupt
        return Static(2, 2)

    path = tmp_path / "records.json.journal.jsonl"
    fail = True
    journal = BenchJournal(path, key="k1")
    assert journal.meta == {} and journal.done == {}
    journal.begin(threshold=0.5)
    with pytest.raises(_Interrupt):
        run_bench(dec, prompts, {"static": static}, max_new_tokens=6, warmup=0, progress=False, journal=journal)
    with path.open("a") as fh:
        fh.write('{"repeat": 0, "prompt": "p2", "rec')  # the line being written when the process was killed

    fail, ran[:] = False, []
    journal = BenchJournal(path, key="k1")
    assert journal.meta == {"threshold": 0.5} and sorted(journal.done) == [(0, "p0"), (0, "p1")]
    first = {r.prompt: r for recs in journal.done.values() for r in recs if r.config == "static"}
    journal.begin(**journal.meta)
    records = run_bench(dec, prompts, {"static": static}, max_new_tokens=6, warmup=0, progress=False, journal=journal)
    assert ran == ["p2"]  # only the unfinished prompt ran again
    assert [(r.prompt, r.config) for r in records] == [(p.uid, c) for p in prompts for c in ("plain", "static")]
    assert all(r.identical for r in records)
    assert {r.prompt: r.wall_s for r in records if r.config == "static" and r.prompt in first} == \
        {u: r.wall_s for u, r in first.items()}  # the journal's records, not new runs
    assert len(BenchJournal(path, key="k1").done) == 3  # the cut line was dropped, p2 appended after it
    journal.begin(**journal.meta)  # beginning again keeps what was appended since the first begin
    assert len(BenchJournal(path, key="k1").done) == 3

    # another key (other settings or inputs), or other meta, starts afresh; finish() removes the file
    other = BenchJournal(path, key="k2")
    assert other.done == {} and other.meta == {}
    again = BenchJournal(path, key="k1")
    again.begin(threshold=0.7)
    assert again.done == {} and BenchJournal(path, key="k1").meta == {"threshold": 0.7}
    again.finish()
    assert not path.exists()


def test_journal_records_of_other_configurations_are_rerun(tmp_path) -> None:
    dec = Decoder(tiny("llama"), max_draft_len=2)
    prompts = [BenchPrompt("p0", "cat", (3, 4, 5, 6))]
    journal = BenchJournal(tmp_path / "j.jsonl", key="k")
    journal.begin()
    run_bench(dec, prompts, {"a": Static(2, 1)}, max_new_tokens=4, warmup=0, progress=False, journal=journal)
    records = run_bench(dec, prompts, {"b": Static(2, 2)}, max_new_tokens=4, warmup=0, progress=False,
                        journal=_begun(BenchJournal(journal.path, key="k")))
    assert [r.config for r in records] == ["plain", "b"]


def _begun(journal: BenchJournal) -> BenchJournal:
    journal.begin()
    return journal


def test_a_workflow_journal_is_keyed_by_params_inputs_and_scripts(tmp_path) -> None:
    """The workflow's journal key: the same job on the same inputs resumes; other params or an edited input do not."""
    import sys
    import types
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
    from lede.study import bench_journal

    data = tmp_path / "costs.json"
    data.write_text("{}")

    def key(params, input_=(data,)):
        job = types.SimpleNamespace(params=params, input=[str(x) for x in input_], scriptdir=str(scripts))
        return bench_journal(job, tmp_path / "eval.json")

    j = key({"per_category": 3})
    assert j.path == tmp_path / "eval.json.journal.jsonl"
    assert j.key == key({"per_category": 3}).key
    assert j.key != key({"per_category": 10}).key
    data.write_text('{"plain": 1}')
    assert j.key != key({"per_category": 3}).key


def test_a_resumed_journal_reapplies_the_kernels_auto_chose(tmp_path) -> None:
    """`auto` times the kernels at each load and may choose differently after a restart: the journal records the
    first choice and a resumed job runs on it (issue 39)."""
    from types import SimpleNamespace

    from torch import nn

    from lede.core.kernels import CpuLinear, KernelChoice

    def loaded(one, many):
        model = nn.Sequential(CpuLinear(nn.Linear(4, 4)), CpuLinear(nn.Linear(4, 4)))
        return SimpleNamespace(model=model, kernels=KernelChoice(one, many, {"lede/1": 0.1}))

    path = tmp_path / "j.jsonl"
    first = loaded("lede", "torch")
    journal = BenchJournal(path, key="k")
    journal.begin(**journal.kernels(first))
    journal.append(0, "p0", [])
    assert BenchJournal(path, key="k").meta["kernels"] == {"one_token": "lede", "many_tokens": "torch",
                                                           "ms": {"lede/1": 0.1}}
    second = loaded("torch", "lede")  # the restarted job's `auto` chose the other way round
    resumed = BenchJournal(path, key="k")
    resumed.begin(**resumed.kernels(second))
    assert (second.kernels.one_token, second.kernels.many_tokens) == ("lede", "torch")
    assert all((m.one_token, m.many_tokens) == ("lede", "torch") for m in second.model)  # re-applied to every CpuLinear
    assert resumed.done  # same meta: the records were kept
    fresh = BenchJournal(tmp_path / "other.jsonl", key="k")  # nothing to resume: the load's own choice
    third = loaded("torch", "lede")
    fresh.begin(**fresh.kernels(third))
    assert third.kernels.one_token == "torch" and fresh.meta["kernels"]["one_token"] == "torch"
    assert BenchJournal(tmp_path / "x.jsonl", key="k").kernels(SimpleNamespace(kernels=None)) == {"kernels": None}
