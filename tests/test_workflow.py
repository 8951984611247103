"""The Snakemake workflow: lint, dry runs, config validation errors, and the whole DAG on .test/config.yaml."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA_DIR, REPO

pytestmark = pytest.mark.workflow
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def smk(*args, cwd=REPO, timeout=900):
    """snakemake with ``args`` (the config's default data_dir: the repository's data/)."""
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def job_counts(dry_run_output: str) -> dict[str, int]:
    """{rule: jobs} from the first "Job stats" table of a dry run (the target rule `all` and the total left out)."""
    counts = {}
    for line in dry_run_output.split("Job stats:", 1)[1].splitlines()[3:]:
        if len(line.split()) != 2:
            break
        rule, n = line.split()
        counts[rule] = int(n)
    return {r: n for r, n in counts.items() if r not in ("all", "total")}


def dry_run_after_editing(path: Path) -> str:
    """Stdout of a .test dry run with ``path``'s content changed (a newline appended); the file, content and
    times, is put back afterwards."""
    st, text = path.stat(), path.read_text()
    try:
        path.write_text(text + "\n")
        return smk("-n", "--configfile", ".test/config.yaml").stdout
    finally:
        path.write_text(text)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_lint_and_dry_runs():
    lint = smk("--lint")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # the paper config names a LayerSkip checkpoint that cannot be resolved offline: its dry run swaps in the
    # embedded model, so everything else in it (keys, ranges, layers within the depth, the DAG) is checked
    for extra in ([], ["--configfile", ".test/config.yaml"], ["--configfile", "config/cpu_full.yaml"],
                  ["--configfile", "config/early_exit.yaml"],
                  # device: cuda stops a machine without CUDA before any job (issue 39): there, plan it on the CPU
                  ["--configfile", "config/early_exit.yaml", "config/early_exit_gpu.yaml"]
                  + ([] if _has_cuda() else ["--config", "device=cpu"]),
                  ["--configfile", "config/paper.yaml", "--config", "model=smollm2-135m"]
                  + ([] if _has_cuda() else ["device=cpu"])):
        dry = smk("-n", "--quiet", *extra)
        assert dry.returncode == 0, " ".join(extra) + "\n" + dry.stdout + dry.stderr


@pytest.mark.parametrize("override,needle", [
    ("exits={'layers': [4, 40]}", "exits.layers has [40] outside 1..29"),
    ("data_dir=/no/such/dir", "data_dir='/no/such/dir'"),
    ("model=no-such/model!", "model='no-such/model!'"),
    ("bench={'per_category': -1}", "per_category"),
    ("early_exit={'exit_layers': [4, 30]}", "early_exit.exit_layers has [30] outside 1..29"),
    ("early_exit={'exit_weights': [1.0, 2.0]}", "give one weight per exit layer"),
    ("early_exit={'autocast': 'int8'}", "autocast"),
    ("parity={'methods': ['oracle']}", "parity"),
    ("parity={'tasks': ['gsm8k']}", "parity"),
    ("policy={'collect': {'per_category': 2}}", "policy.collect.per_category=2 exceeds policy.dev_per_category=1"),
    ("policy={'target_update_interval': 500}", "policy.target_update_interval=500 exceeds policy.n_steps=200"),
    ("costs={'long_contexts': [100000]}", "costs.long_contexts/context_len has [100000]"),
    ("costs={'context_len': 9000}", "costs.long_contexts/context_len has [9000]"),
    ("device=cuda:0", "config key device='cuda:0': CUDA is not available"),
    ("policy={'full_information': {'reward_weight': 'fast'}}", "On instance['policy']['full_information']['reward_weight']"),
])
def test_config_errors_stop_before_any_job(tmp_path, override, needle):
    if override.startswith("device=cuda"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
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


@pytest.mark.parametrize("override", ["policy={n_steps: 100}", "policy={n_steps: 100, gamma: 0.9}",
                                      "costs={long_contexts: [64, 96]}"])
def test_nested_config_overrides_keep_their_types(override):
    """snakemake hands values inside a nested --config mapping over as strings: they are typed before the schema."""
    res = smk("-n", "--quiet", "--configfile", ".test/config.yaml", "--config", override)
    assert res.returncode == 0, res.stdout + res.stderr


def test_test_config_runs_the_whole_dag():
    out = REPO / "results-test"
    # ~30 jobs, each loading the model (~20 s on a fast 2-core host, ~60 s on a slow one): 15-35 minutes
    res = smk("--cores", "2", "--configfile", ".test/config.yaml", timeout=3000)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for rel in ("exits/report.md", "exits/selected.json", "costs.json", "floor.json", "sweep/best_static.json", "bench/eval.md",
                "rl/experience.parquet", "rl/experience.h5", "rl/policy_DiscreteCQL_s0.pt", "eval/summary.md",
                "rl/replay_eval.md",
                "early_exit/weights.pt", "early_exit/report.md", "early_exit/bench.md",
                "early_exit/quality/parity.md", "parity/parity.md", "parity/parity.csv",
                "notebooks/quality_parity.ipynb", "figures/quality_parity.png", "tables/quality_parity.md"):
        assert (out / rel).stat().st_size > 0, rel
    assert not list(out.rglob("*.journal.jsonl"))  # the benchmarks' resume journals go once their outputs are written
    floor = json.loads((out / "floor.json").read_text())  # the cost model's job also probes the memory floor
    assert floor["floor_ms"] > 0 and set(floor["contexts"]) == {"32", "128"}
    assert set(floor["contexts"]["32"]["ms"]) == {"1", "2", "3"}  # T <= max draft length + 1 = 4
    # the .test config enables the early-exit variant: every later stage ran on it
    assert "smollm2-135m-ee" in (out / "early_exit/bench.md").read_text()
    assert "## Fit: agreement with the base model's greedy tokens" in (out / "early_exit/report.md").read_text()
    assert json.loads((out / "exits/selected.json").read_text())["model"] == "smollm2-135m-ee"
    summary = (out / "eval/summary.md").read_text()
    assert "lede_DiscreteCQL_s0" in summary and "fraction of oracle" in summary
    assert "## floor(lede_FullInfo_s0)" in summary and "## lede_DoubleDQN-FI_s0" in summary
    assert "## correct(lede_FullInfo_s0)" in summary
    # policy.evaluate.generalisation: 1 -> one prompt of each kind of data/generalisation/, pooled in its own rows
    assert "| new sources |" in summary and "| new_multi_turn |" in summary and "== new sources" in summary
    assert "| oracle_lookup |" in (out / "rl/replay_eval.md").read_text()  # lookup alone, next to the full oracle
    from lede.drafters.distill import load_distill

    seqs, _, meta = load_distill(out / "exits/distill_train.pt")  # exits.train.samples: 1 -> greedy + 1 sampled each
    greedy = [s for s in seqs if not s.sampled]
    assert meta["samples"] == 1 and sorted(s.uid for s in seqs) == sorted([s.uid for s in greedy] +
                                                                          [f"{s.uid}#s1" for s in greedy])
    assert load_distill(out / "exits/distill_dev.pt")[2]["samples"] == 0  # the replayed splits stay greedy
    # policy.restarts: 2 -> two training runs, the one that replays fastest on the dev sequences kept
    from lede.rl.offline import RLPolicy

    full = RLPolicy.load(out / "rl/policy_DoubleDQN-FI_s0.pt").pf  # d3rlpy on every action's replayed transition
    assert full.algo == "DoubleDQN-FI" and full.decision == "round" and full.info["full_information"]
    assert full.info["transitions"] == full.info["round_starts"] * (1 + len(full.exit_layers) * full.max_draft_len)
    # policy.full_information's defaults: every action fitted, γ 0.5, w the best static cell's replayed rate
    assert full.info["all_actions"] and full.info["gamma"] == 0.5
    rate = re.search(r"reward weight: ([0-9.]+), the replayed rate of static", (out / "rl/train_DoubleDQN-FI_s0.log")
                     .read_text())
    assert rate and full.info["reward_weight"] == pytest.approx(float(rate.group(1)), abs=1e-4)
    info = RLPolicy.load(out / "rl/policy_DiscreteCQL_s0.pt").pf.info
    restarts = info["restarts"]
    assert isinstance(info["fqe_initial_state_value"], float)  # FQE on the kept restart only
    assert (out / "rl/logs/DiscreteCQL_s0_fqe").is_dir()
    history = (out / "rl/history_DiscreteCQL_s0.csv").read_text().splitlines()
    assert "fqe_initial_state_value" in history[0].split(",") and len(history) > 2  # the off-policy estimate per epoch
    assert restarts["seeds"] == [0, 1000] and len(restarts["dev_replay_median"]) == 2
    assert restarts["chosen_seed"] == restarts["seeds"][max(range(2), key=lambda i: (restarts["dev_replay_median"][i], -i))]
    again = smk("-n", "--configfile", ".test/config.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr
    # editing one notebook reruns its rule alone (dry run; the file is put back afterwards). Snakemake 9 compares
    # checksums: a bare `touch` (newer, same content) reruns nothing.
    touched = dry_run_after_editing(REPO / "notebooks/quality_parity.ipynb")
    assert job_counts(touched) == {"notebook": 1}, touched
    # a change to the CPU kernels reruns every job that loads the model, from the distillation data on
    touched = dry_run_after_editing(REPO / "src/lede/core/kernels.py")
    assert {"early_exit_data", "distill_data", "train_adapter", "evaluate"} <= set(job_counts(touched)), touched
    # an ablation value reruns what reads it: more gradient steps retrain and re-evaluate, never recollect
    more_steps = REPO / "results-test" / "more_steps.yaml"
    more_steps.write_text("policy:\n  n_steps: 201\n")
    ablation = job_counts(smk("-n", "--configfile", ".test/config.yaml", str(more_steps)).stdout)
    more_steps.unlink()
    assert {"train_policy", "evaluate", "parity"} <= set(ablation), ablation
    assert not {"collect_experience", "replay_experience", "distill_data", "train_adapter", "cost_model"} & \
        set(ablation)
    records = json.loads((out / "eval/records.json").read_text())["records"]
    plain = {r["prompt"] for r in records if r["config"] == "plain"}
    assert plain and all(r["identical"] for r in records if r["config"].startswith(("lede", "floor(", "correct(")))
    assert {"floor(lede_FullInfo_s0)", "correct(lede_FullInfo_s0)", "lede_DoubleDQN-FI_s0"} <= {r["config"] for r in records}
    # quality parity: plain decoding and every configured method on each task of the suite
    import csv

    rows = list(csv.DictReader((out / "parity/parity.csv").open()))
    assert {r["task"] for r in rows} == {"lede_spec_bench_qa", "lede_humaneval"}
    assert {r["method"] for r in rows} == {"plain", "best_static", "dynamic_exit", "lede_DiscreteCQL_s0", "lede_FullInfo_s0",
                                           "lede_DoubleDQN-FI_s0"}
    assert all(int(r["n_outputs"]) == 1 for r in rows)


def test_same_config_and_seeds_give_the_same_artefacts(tmp_path):
    """A second run of the study's trained stages (the base model's greedy continuations, the early-exit variant,
    its distillation data and an exit adapter) into another results directory reproduces them bit for bit, run
    metadata aside (training seconds). Uses the results of test_test_config_runs_the_whole_dag (defined above, so
    pytest runs it first). Every later table is a deterministic function of these and held-out data, apart from
    the timing columns (the cost model, the benchmarks), which are measured and vary between runs."""
    import torch
    import yaml

    first = REPO / "results-test"
    targets = ("early_exit/weights.pt", "exits/distill_train.pt", "exits/adapters/L4_linear.pt")
    if not all((first / t).exists() for t in targets):
        pytest.fail("results-test/ is incomplete: run test_test_config_runs_the_whole_dag first")
    cfg = yaml.safe_load((REPO / ".test/config.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "again")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    # targets before --configfile (which takes several values)
    res = smk(*[str(tmp_path / "again" / t) for t in targets], "--cores", "2", "--configfile", str(tmp_path / "c.yaml"),
              timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    def same(a, b, where):
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
        elif isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for k in a:
                if k not in ("seconds", "train_seconds"):  # timing
                    same(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{where}[{i}]")
        else:
            assert a == b, where

    for t in targets:
        same(torch.load(first / t, weights_only=False), torch.load(tmp_path / "again" / t, weights_only=False), t)
