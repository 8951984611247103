"""The Snakemake workflow: lint, dry runs, config validation errors, and the whole DAG on .test/config.yaml."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.workflow
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def smk(*args, cwd=REPO, timeout=900):
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_lint_and_dry_runs():
    lint = smk("--lint")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    for extra in ([], ["--configfile", ".test/config.yaml"]):
        dry = smk("-n", "--quiet", *extra)
        assert dry.returncode == 0, dry.stdout + dry.stderr


@pytest.mark.parametrize("override,needle", [
    ("exits={'layers': [4, 40]}", "exits.layers has [40] outside 1..29"),
    ("data_dir=/no/such/dir", "data_dir='/no/such/dir'"),
    ("model=no-such/model!", "model='no-such/model!'"),
    ("bench={'per_category': -1}", "per_category"),
    ("early_exit={'exit_layers': [4, 30]}", "early_exit.exit_layers has [30] outside 1..29"),
    ("early_exit={'exit_weights': [1.0, 2.0]}", "give one weight per exit layer"),
    ("early_exit={'autocast': 'int8'}", "autocast"),
])
def test_config_errors_stop_before_any_job(tmp_path, override, needle):
    cfg = tmp_path / "c.yaml"
    shutil.copy(REPO / ".test/config.yaml", cfg)
    key, value = override.split("=", 1)
    import yaml

    data = yaml.safe_load(cfg.read_text())
    parsed = yaml.safe_load(value)
    if isinstance(parsed, dict):
        data[key] = {**data[key], **parsed}
    else:
        data[key] = parsed
    cfg.write_text(yaml.safe_dump(data))
    res = smk("-n", "--configfile", str(cfg))
    assert res.returncode != 0
    assert needle in res.stdout + res.stderr, res.stdout + res.stderr


def test_test_config_runs_the_whole_dag():
    out = REPO / "results-test"
    res = smk("--cores", "2", "--configfile", ".test/config.yaml", timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for rel in ("exits/report.md", "exits/selected.json", "costs.json", "sweep/best_static.json", "bench/eval.md",
                "rl/experience.parquet", "rl/experience.h5", "rl/policy_DiscreteCQL_s0.pt", "eval/summary.md",
                "early_exit/weights.pt", "early_exit/report.md", "early_exit/bench.md",
                "early_exit/quality/parity.md"):
        assert (out / rel).stat().st_size > 0, rel
    # the .test config enables the early-exit variant: every later stage ran on it
    assert "smollm2-135m-ee" in (out / "early_exit/bench.md").read_text()
    assert json.loads((out / "exits/selected.json").read_text())["model"] == "smollm2-135m-ee"
    summary = (out / "eval/summary.md").read_text()
    assert "lede_DiscreteCQL_s0" in summary and "fraction of oracle" in summary
    again = smk("-n", "--configfile", ".test/config.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr
    records = json.loads((out / "eval/records.json").read_text())["records"]
    plain = {r["prompt"] for r in records if r["config"] == "plain"}
    assert plain and all(r["identical"] for r in records if r["config"].startswith("lede"))
