"""The paper's notebooks (notebooks/*.ipynb): generated from notebooks/build_notebooks.py, parameterised, and
each one runs with papermill on a small checked-in results directory (tests/fixtures/results/, copied from a
.test run) holding only the files its Snakemake rule declares, writing every declared output."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest

from conftest import REPO

papermill = pytest.importorskip("papermill")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS_DIR = REPO / "notebooks"
FIXTURE = REPO / "tests" / "fixtures" / "results"
RULES = REPO / "workflow" / "rules" / "notebooks.smk"
POLICY = {"algos": ["DiscreteCQL"], "seeds": [0]}  # what the fixture (a .test run) holds


def build_module():
    sys.path.insert(0, str(NOTEBOOKS_DIR))
    try:
        import build_notebooks
    finally:
        sys.path.remove(str(NOTEBOOKS_DIR))
    return build_notebooks


def declared_inputs(results_dir: str) -> dict[str, list[str]]:
    """NOTEBOOK_INPUTS of workflow/rules/notebooks.smk, evaluated for a results directory."""
    from snakemake.io import expand

    from types import SimpleNamespace as NS

    text = RULES.read_text()
    head = text[: text.index("NOTEBOOKS = list(NOTEBOOK_INPUTS)")]
    r = results_dir
    # the producing rules' outputs the notebooks are wired to (rules.x.output.y; the .test DAG checks the real wiring)
    rules = NS(evaluate=NS(output=NS(json=f"{r}/eval/records.json")),
               exit_report=NS(output=NS(csv=f"{r}/exits/report.csv", selected=f"{r}/exits/selected.json",
                                        best=f"{r}/sweep/best_static.json")),
               train_policy=NS(output=NS(history=f"{r}/rl/history_{{algo}}_s{{seed}}.csv")),
               parity=NS(output=NS(csv=f"{r}/parity/parity.csv", diffs=f"{r}/parity/differences.csv")))
    ns = {"R": results_dir, "POLICY": POLICY, "expand": expand, "rules": rules}
    exec(compile(head, str(RULES), "exec"), ns)
    return ns["NOTEBOOK_INPUTS"]


NAMES = sorted(build_module().NOTEBOOKS)


def test_checked_in_notebooks_are_the_generated_ones(tmp_path):
    build_module().build(tmp_path)
    on_disk = sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.ipynb"))
    assert on_disk == NAMES, "notebooks/ holds notebooks that build_notebooks.py does not write (or misses some)"
    for name in NAMES:
        assert (tmp_path / f"{name}.ipynb").read_text() == (NOTEBOOKS_DIR / f"{name}.ipynb").read_text(), (
            f"notebooks/{name}.ipynb differs from build_notebooks.py: run `python notebooks/build_notebooks.py`")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_parameterised(name):
    nb = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters'"
    assert re.search(r'^results_dir = "results"', tagged[0].source, re.M)
    assert re.search(r"^out_dir = ", tagged[0].source, re.M)
    assert nb.metadata.kernelspec.name == "python3"
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name}: checked in with outputs"


def test_rule_declares_every_notebook():
    assert sorted(declared_inputs("R")) == NAMES
    text = RULES.read_text()
    assert "papermill" in text and "-k python3" in text and 'category="Figures"' in text


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_on_its_declared_inputs(name, tmp_path):
    """Only the files the rule declares are present: the notebook must not read anything else."""
    results = tmp_path / "results"
    for rel in declared_inputs("RESULTS")[name]:
        rel = rel.removeprefix("RESULTS/")
        (results / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURE / rel, results / rel)
    out = tmp_path / "out"
    executed = out / "notebooks" / f"{name}.ipynb"
    executed.parent.mkdir(parents=True)
    papermill.execute_notebook(str(NOTEBOOKS_DIR / f"{name}.ipynb"), str(executed), kernel_name="python3",
                               parameters={"results_dir": str(results), "out_dir": str(out)}, progress_bar=False,
                               cwd=str(tmp_path))
    outputs = {f"figures/{name}.png": b"\x89PNG", f"figures/{name}.pdf": b"%PDF", f"tables/{name}.md": b"| ",
               f"tables/{name}.tex": rb"\begin{tabular}", f"notebooks/{name}.ipynb": b"{"}
    for rel, magic in outputs.items():
        data = (out / rel).read_bytes()
        assert data and magic in data[:4096], f"{rel}: empty or not the expected format"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(outputs)
    nb = json.loads(executed.read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def test_fixture_is_small():
    size = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert size < 1_000_000, f"tests/fixtures/results/ is {size} bytes: keep it under 1 MB"


def test_quality_parity_lists_a_differing_output(tmp_path):
    """A run where one output differs: the table's note counts it, with its margin, and the pairs below
    the identity target."""
    import pandas as pd

    results = tmp_path / "results" / "parity"
    results.mkdir(parents=True)
    rows = pd.read_csv(FIXTURE / "parity" / "parity.csv")
    hit = (rows.method == "best_static") & (rows.task == "lede_spec_bench_qa")
    rows.loc[hit, ["identical", "identity_rate"]] = [0, 0.0]
    rows.to_csv(results / "parity.csv", index=False)
    diffs = pd.read_csv(FIXTURE / "parity" / "differences.csv")
    diffs.loc[0] = dict(task="lede_spec_bench_qa", method="best_static", doc_id=0, position=7, plain_token=11,
                        method_token=12, plain_piece="a", method_piece="b", margin=0.0004, full_top1=11,
                        full_top2=12, plain_len=12, method_len=12)
    diffs.to_csv(results / "differences.csv", index=False)
    out = tmp_path / "out"
    papermill.execute_notebook(str(NOTEBOOKS_DIR / "quality_parity.ipynb"), str(tmp_path / "x.ipynb"),
                               kernel_name="python3", progress_bar=False, cwd=str(tmp_path),
                               parameters={"results_dir": str(tmp_path / "results"), "out_dir": str(out)})
    note = (out / "tables" / "quality_parity.md").read_text()
    assert "1 outputs differ from plain decoding" in note and "median 0.0004" in note
    assert "1 task-method pairs below 99% identity" in note
    assert "| lede_spec_bench_qa · f1 | 1 | 0.000 | 0.000 | +0.000 [–, –] | 0/1 |" in note


def test_policy_behaviour_draws_a_generation_token_by_token(tmp_path):
    """With token pieces in the records (bench.BenchRecord.pieces), the example generation is drawn token by
    token; the fixture's records (written before pieces existed) take the other branch in the test above."""
    payload = json.loads((FIXTURE / "eval" / "records.json").read_text())
    for r in payload["records"]:
        if r.get("rounds_detail"):
            r["pieces"] = [f"tok{i}" + ("\n" if i % 7 == 6 else " ") for i in range(r["new_tokens"])]
    results = tmp_path / "results"
    (results / "eval").mkdir(parents=True)
    (results / "eval" / "records.json").write_text(json.dumps(payload))
    out = tmp_path / "out"
    executed = tmp_path / "x.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS_DIR / "policy_behaviour.ipynb"), str(executed), kernel_name="python3",
                               progress_bar=False, cwd=str(tmp_path),
                               parameters={"results_dir": str(results), "out_dir": str(out)})
    nb = json.loads(executed.read_text())
    outputs = json.dumps([o for c in nb["cells"] for o in c.get("outputs", [])])
    assert "Error" not in outputs and "token by token (first" in outputs  # the panel's title, printed below
    assert (out / "figures" / "policy_behaviour.png").stat().st_size > 0


@pytest.mark.parametrize("name", ["speedup_table", "ablations", "policy_behaviour"])
def test_generalisation_prompts_get_their_own_rows(name, tmp_path):
    """Evaluation records of the generalisation set (categories new_*): pooled as "new sources", never in "all"."""
    payload = json.loads((FIXTURE / "eval" / "records.json").read_text())
    for r in payload["records"]:
        if r["category"] == "qa":  # the fixture's QA prompt, relabelled as one of the generalisation set's kinds
            r["category"] = "new_code"
    results = tmp_path / "results"
    (results / "eval").mkdir(parents=True)
    (results / "eval" / "records.json").write_text(json.dumps(payload))
    out = tmp_path / "out"
    papermill.execute_notebook(str(NOTEBOOKS_DIR / f"{name}.ipynb"), str(tmp_path / "x.ipynb"), kernel_name="python3",
                               progress_bar=False, cwd=str(tmp_path),
                               parameters={"results_dir": str(results), "out_dir": str(out)})
    table = (out / "tables" / f"{name}.md").read_text()
    if name != "ablations":  # its table is the pooled "all" per learner; its per-category panel draws every group
        assert "New sources" in table and "New: code" in table
    if name == "speedup_table":  # 3 prompts: "all" holds the two held-out ones, "new sources" the third
        assert "All (n=2)" in table and "New sources (n=1)" in table and "QA" not in table
