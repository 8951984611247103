"""Quality parity of self-speculative decoding against plain decoding, on the lm-eval task suite.

    from lede.eval.parity import run_parity
    report = run_parity("results/parity", methods=["static:8:4", "static:12:2"],
                        tasks=["lede_gsm8k", "lede_spec_bench_summarization"], limit=20,
                        data_dir="data")
    print(report.to_markdown())

:func:`run_parity` loads the model once, runs ``lm_eval.simple_evaluate`` with the ``lede`` model for
plain decoding (``autoregressive``) and each method, saves lm-eval's results and sample logs plus the
per-request speed records, and writes the report made by :func:`parity_report`:

* ``parity.csv`` / ``parity.md`` -- one row per task x method x metric: the metric over the documents
  both runs scored, plain decoding's value, the difference with a paired bootstrap confidence interval,
  the output identity rate (share of documents whose generated text equals plain decoding's), speed
  (tokens/s over the task's requests, speed-up vs plain, mean tokens per round) and the counts of
  requests whose prompt was cut to fit the context window (``context_truncated``) or that stopped at
  ``max_gen_toks`` (``length_capped``);
* ``differences.csv`` (and a section of ``parity.md``) -- every document whose output differs from
  plain decoding: the first differing token position, both tokens, and the full model's top-2 logit
  margin at that position (given the prompt and plain decoding's tokens before it). Greedy
  self-speculation is exact in exact arithmetic; a difference with a small margin is a numerical
  near-tie (batched verification vs one-token steps), a large margin points at a bug.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lede.core.io import atomic_path, atomic_write_csv, atomic_write_text

__all__ = ["MethodRun", "ParityReport", "SuiteSettings", "compare_models", "evaluate_method", "full_model_margin", "paired_bootstrap",
           "parity_report", "run_parity", "write_parity"]

BASELINE = "plain"


@dataclass(frozen=True)
class SuiteSettings:
    """How the lm-eval suite is run: the same for every method compared, so that all see the same requests."""

    data_dir: str | Path | None = None  # the benchmark files (None: lede.eval.tasks' default)
    limit: int | float | None = None  # documents per task
    gen_kwargs: dict | None = None  # e.g. {"max_gen_toks": 128}, over each task's own
    num_fewshot: int | None = None
    apply_chat_template: bool | None = None  # None: when the tokenizer has a chat template
    confirm_run_unsafe_code: bool = False  # needed for lede_humaneval (its code runs in lede.eval.sandbox)

ROW_FIELDS = [
    "task", "method", "policy", "metric", "n", "value", "plain_value", "diff", "ci_low", "ci_high",
    "n_outputs", "identical", "identity_rate", "tokens_per_s", "speedup", "mean_accepted",
    "context_truncated", "length_capped",
]
#: the speed record fields copied into each logged sample (key "lede") of samples_<method>.jsonl
SAMPLE_SPEED_FIELDS = ("policy", "new_tokens", "finish_reason", "tokens_per_s", "wall_s", "rounds", "mean_accepted",
                       "accepted", "context_truncated")
DIFF_FIELDS = [
    "task", "method", "doc_id", "position", "plain_token", "method_token", "plain_piece", "method_piece",
    "margin", "full_top1", "full_top2", "plain_len", "method_len",
]


@dataclass
class MethodRun:
    """One evaluated method: lm-eval's logged samples per task, and the lede speed records."""

    name: str
    policy: str
    samples: dict[str, list[dict]]
    records: list[dict] = field(default_factory=list)
    results: dict = field(default_factory=dict)

    @classmethod
    def from_evaluation(cls, name: str, out: dict, lm=None) -> "MethodRun":
        """From ``simple_evaluate(..., log_samples=True)``'s return value and the ``LedeLM`` used."""
        if not out or "samples" not in out:
            raise ValueError(f"{name}: run simple_evaluate with log_samples=True (no samples in its output)")
        policy = getattr(lm, "policy_spec", name)
        return cls(name, policy, out["samples"], list(getattr(lm, "records", [])), out.get("results", {}))

    @classmethod
    def load(cls, out_dir: str | Path, name: str) -> "MethodRun":
        """A run saved by :func:`evaluate_method` (``results_/samples_/speed_<name>`` in ``out_dir``)."""
        out = Path(out_dir)
        paths = [out / f"results_{name}.json", out / f"samples_{name}.jsonl", out / f"speed_{name}.jsonl"]
        if missing := [str(p) for p in paths if not p.is_file()]:
            raise FileNotFoundError(f"method {name!r} has no saved run in {out}: missing {', '.join(missing)}")
        summary = json.loads(paths[0].read_text(encoding="utf-8"))
        samples: dict[str, list[dict]] = {}
        for line in paths[1].read_text(encoding="utf-8").splitlines():
            smp = json.loads(line)
            samples.setdefault(smp["task"], []).append(smp)
        records = [json.loads(line) for line in paths[2].read_text(encoding="utf-8").splitlines() if line]
        return cls(name, str(summary.get("policy", name)), samples, records, summary.get("results") or {})


@dataclass
class ParityReport:
    rows: list[dict]
    differences: list[dict]
    baseline: str = BASELINE

    def to_markdown(self) -> str:
        def fmt(x, nd=3):
            if x is None or (isinstance(x, float) and math.isnan(x)):
                return "–"
            return f"{x:.{nd}f}" if isinstance(x, float) else str(x)

        lines = [
            f"# Quality parity vs plain decoding ({self.baseline})",
            "",
            "diff = method − plain over the documents both scored; CI: paired bootstrap. identity: share of "
            "documents whose generated text equals plain decoding's. truncated: prompts cut to fit the "
            "context window; capped: generations that hit max_gen_toks.",
            "",
            "| task | method | metric | n | value | plain | diff [CI] | identity | tok/s | speed-up | "
            "mean acc. | truncated | capped |",
            "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            ci = f"{fmt(r['diff'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]"
            ident = f"{r['identical']}/{r['n_outputs']} ({fmt(r['identity_rate'], 2)})" if r["n_outputs"] else "–"
            lines.append(
                f"| {r['task']} | {r['method']} | {r['metric']} | {r['n']} | {fmt(r['value'])} | "
                f"{fmt(r['plain_value'])} | {ci} | {ident} | {fmt(r['tokens_per_s'], 1)} | {fmt(r['speedup'], 2)} | "
                f"{fmt(r['mean_accepted'], 2)} | {r['context_truncated']} | {r['length_capped']} |"
            )
        lines += ["", f"## Outputs that differ from plain decoding ({len(self.differences)})", ""]
        if self.differences:
            lines += [
                "| task | method | doc | first diff. token | plain token | method token | top-2 margin |",
                "|---|---|---:|---:|---|---|---:|",
            ]
            for d in self.differences:
                lines.append(
                    f"| {d['task']} | {d['method']} | {d['doc_id']} | {fmt(d['position'])} | "
                    f"{_md(d['plain_piece'], d['plain_token'])} | {_md(d['method_piece'], d['method_token'])} | "
                    f"{fmt(d['margin'], 4)} |"
                )
        else:
            lines.append("None: every generated output equals plain decoding's.")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": out / "parity.csv", "markdown": out / "parity.md", "differences": out / "differences.csv"}
        atomic_write_csv(paths["csv"], self.rows, ROW_FIELDS)
        atomic_write_csv(paths["differences"], self.differences, DIFF_FIELDS)
        atomic_write_text(paths["markdown"], self.to_markdown())  # last: the rule's main output
        return paths


def _md(piece, token) -> str:
    if token is None:
        return "–"
    shown = json.dumps(piece)[1:-1].replace("|", "\\|") if piece is not None else ""
    return f"`{shown}` ({token})"


# --------------------------------------------------------------------------- statistics


def paired_bootstrap(diffs: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0):
    """(mean, low, high): the mean of paired differences and its percentile bootstrap CI (resampling
    documents). NaNs for no data; a zero-width interval when every difference is equal."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(d.mean())
    if n_boot <= 0 or d.size == 1:
        return mean, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    return mean, float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def _numeric(x) -> float | None:
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x)):
        return float(x)
    return None


# --------------------------------------------------------------------------- margins


def full_model_margin(lm) -> Callable[[list[int], list[int]], dict]:
    """A ``margin_fn`` for :func:`parity_report`: the full model's top-2 logits for the token after
    ``prompt_ids + prefix_ids`` (one plain forward pass of the whole model)."""

    @torch.inference_mode()
    def margin(prompt_ids: list[int], prefix_ids: list[int]) -> dict:
        ids = torch.tensor([list(prompt_ids) + list(prefix_ids)], device=lm.device)
        logits = lm.model(input_ids=ids).logits[0, -1].double()
        top = torch.topk(logits, 2)
        return {"margin": float(top.values[0] - top.values[1]), "full_top1": int(top.indices[0]),
                "full_top2": int(top.indices[1])}

    return margin


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# --------------------------------------------------------------------------- the report


def _key(sample: dict) -> tuple:
    return sample["doc_id"], sample.get("filter", "none")


def _metric_names(samples: list[dict]) -> list[str]:
    names: list[str] = []
    for s in samples:
        for m in s.get("metrics", []):
            if m not in names:
                names.append(m)
    return names


def _output(sample: dict):
    resps = sample.get("resps")
    return json.dumps(resps, sort_keys=True, default=str)


def _is_generation(sample: dict) -> bool:
    try:
        return isinstance(sample["resps"][0][0], str)
    except (KeyError, IndexError, TypeError):
        return False


def _speed(records: list[dict]) -> dict:
    tokens = sum(r["new_tokens"] for r in records)
    wall = sum(r["wall_s"] for r in records)
    rounds = sum(r["rounds"] for r in records)
    emitted = sum(sum(a + 1 for a in r["accepted"]) for r in records)
    return {
        "tokens_per_s": tokens / wall if wall > 0 else float("nan"),
        "mean_accepted": emitted / rounds if rounds else float("nan"),
        "context_truncated": sum(1 for r in records if r.get("context_truncated")),
        "length_capped": sum(1 for r in records if r.get("finish_reason") == "length"),
    }


def parity_report(
    runs: Sequence[MethodRun],
    baseline: str | None = None,
    margin_fn: Callable[[list[int], list[int]], dict] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> ParityReport:
    """Compare every run with the baseline run (by name; default: the first run) task by task.

    ``margin_fn(prompt_ids, prefix_ids)`` (e.g. :func:`full_model_margin`) gives the full model's top-2
    margin at the first differing token; ``decode(ids)`` renders tokens for the listing. Samples are
    paired by lm-eval ``doc_id`` (and filter); a metric value of None (nothing to score against) leaves
    the document out of that metric.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("parity_report needs at least one run (the baseline)")
    by_name = {r.name: r for r in runs}
    if len(by_name) != len(runs):
        raise ValueError(f"run names must be unique, got {[r.name for r in runs]}")
    base = by_name[baseline] if baseline is not None else runs[0]
    rows: list[dict] = []
    diffs: list[dict] = []

    def recs(run: MethodRun, task: str) -> dict:
        out = {}
        for r in run.records:
            if r.get("task") == task:
                out.setdefault(r["doc_id"], r)  # first repeat
        return out

    for task in sorted(base.samples):
        base_samples = {_key(s): s for s in base.samples[task]}
        base_recs = recs(base, task)
        base_speed = _speed(list(base_recs.values())) if base_recs else None
        metrics = _metric_names(list(base_samples.values()))
        for run in runs:
            if task not in run.samples:
                raise ValueError(f"run {run.name!r} has no samples for task {task!r} (the baseline has)")
            samples = {_key(s): s for s in run.samples[task]}
            common = [k for k in base_samples if k in samples]
            missing = len(base_samples) - len(common)
            if missing:
                raise ValueError(f"{task}: run {run.name!r} lacks {missing} of the baseline's documents")
            gen_keys = [k for k in common if _is_generation(base_samples[k])]
            identical_keys = [k for k in gen_keys if _output(samples[k]) == _output(base_samples[k])]
            run_recs = recs(run, task)
            speed = _speed([r for r in run.records if r.get("task") == task]) if run_recs else {}
            base_tps = base_speed["tokens_per_s"] if base_speed else float("nan")
            tps = speed.get("tokens_per_s", float("nan"))
            for metric in metrics:
                pairs = [
                    (m, p) for k in common
                    if (m := _numeric(samples[k].get(metric))) is not None
                    and (p := _numeric(base_samples[k].get(metric))) is not None
                ]
                diff, lo, hi = paired_bootstrap([m - p for m, p in pairs], n_boot, alpha, seed)
                rows.append({
                    "task": task, "method": run.name, "policy": run.policy, "metric": metric, "n": len(pairs),
                    "value": float(np.mean([m for m, _ in pairs])) if pairs else float("nan"),
                    "plain_value": float(np.mean([p for _, p in pairs])) if pairs else float("nan"),
                    "diff": diff, "ci_low": lo, "ci_high": hi,
                    "n_outputs": len(gen_keys), "identical": len(identical_keys),
                    "identity_rate": len(identical_keys) / len(gen_keys) if gen_keys else float("nan"),
                    "tokens_per_s": tps, "speedup": tps / base_tps if base_tps and base_tps > 0 else float("nan"),
                    "mean_accepted": speed.get("mean_accepted", float("nan")),
                    "context_truncated": speed.get("context_truncated", 0),
                    "length_capped": speed.get("length_capped", 0),
                })
            if run is base:
                continue
            same = set(identical_keys)
            for k in gen_keys:
                if k in same:
                    continue
                doc_id = k[0]
                d = {"task": task, "method": run.name, "doc_id": doc_id, "position": None, "plain_token": None,
                     "method_token": None, "plain_piece": None, "method_piece": None, "margin": None,
                     "full_top1": None, "full_top2": None, "plain_len": None, "method_len": None}
                a, b = base_recs.get(doc_id), run_recs.get(doc_id)
                if a is not None and b is not None:
                    ta, tb = a["token_ids"], b["token_ids"]
                    pos = _first_difference(ta, tb)
                    d.update(plain_len=len(ta), method_len=len(tb), position=pos)
                    if pos is not None:
                        d["plain_token"] = ta[pos] if pos < len(ta) else None
                        d["method_token"] = tb[pos] if pos < len(tb) else None
                        if decode is not None:
                            d["plain_piece"] = decode([d["plain_token"]]) if d["plain_token"] is not None else None
                            d["method_piece"] = decode([d["method_token"]]) if d["method_token"] is not None else None
                        if margin_fn is not None:
                            d.update(margin_fn(a["prompt_ids"], ta[:pos]))
                diffs.append(d)
    return ParityReport(rows, diffs, base.name)


# --------------------------------------------------------------------------- the driver


def _method_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)


def run_parity(
    out_dir: str | Path,
    methods: Sequence[str] | Mapping[str, str] = ("static:8:4",),
    tasks: Sequence[str] = ("lede_gsm8k", "lede_spec_bench"),
    model: str = "smollm2-135m",
    data_dir: str | Path | None = None,
    limit: int | float | None = None,
    gen_kwargs: dict | None = None,
    num_fewshot: int | None = None,
    apply_chat_template: bool | None = None,
    exit_heads: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    loaded=None,
    model_args: dict | None = None,
    confirm_run_unsafe_code: bool = False,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> ParityReport:
    """Run plain decoding and each method through ``simple_evaluate`` and write the parity report.

    ``methods``: policy strings (``static:8:4``, ...) or ``{name: policy}``; plain decoding
    (``autoregressive``) runs first as ``plain``. ``apply_chat_template``: None = when the tokenizer
    has one. ``confirm_run_unsafe_code`` is needed for ``lede_humaneval`` (its code runs in
    :mod:`lede.eval.sandbox`). Writes into ``out_dir``: per method ``results_<name>.json`` (lm-eval's results,
    the speed summary, truncation counts), ``samples_<name>.jsonl`` (lm-eval's sample logs, each with the
    request's speed under ``"lede"``) and ``speed_<name>.jsonl`` (the full per-request records, with
    token ids); then ``parity.csv``, ``parity.md``, ``differences.csv``.
    """
    from lede.drafters.loading import load_model

    specs = dict(methods) if isinstance(methods, Mapping) else {_method_name(m): m for m in methods}
    if BASELINE in specs and specs[BASELINE] != "autoregressive":
        raise ValueError(f"method name {BASELINE!r} is reserved for plain (autoregressive) decoding")
    specs = {BASELINE: "autoregressive", **{k: v for k, v in specs.items() if k != BASELINE}}
    lm = loaded if loaded is not None else load_model(model, dtype=dtype, device=device)
    suite = SuiteSettings(data_dir, limit, gen_kwargs, num_fewshot, apply_chat_template, confirm_run_unsafe_code)
    runs = [evaluate_method(out_dir, name, lm, spec, tasks, suite, exit_heads=exit_heads, model_args=model_args)
            for name, spec in specs.items()]
    return write_parity(out_dir, runs, lm, baseline=BASELINE, n_boot=n_boot, alpha=alpha, seed=seed)


def write_parity(out_dir: str | Path, runs: Sequence[MethodRun], lm, baseline: str = BASELINE, n_boot: int = 2000,
                 alpha: float = 0.05, seed: int = 0) -> ParityReport:
    """The parity report of ``runs`` against the ``baseline`` run (the full model ``lm`` gives the margins
    where outputs differ), written into ``out_dir``."""
    report = parity_report(
        runs, baseline=baseline, margin_fn=full_model_margin(lm),
        decode=lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=False), n_boot=n_boot, alpha=alpha,
        seed=seed,
    )
    report.write(out_dir)
    return report


def evaluate_method(
    out_dir: str | Path,
    name: str,
    lm,
    policy,
    tasks: Sequence[str],
    suite: SuiteSettings = SuiteSettings(),
    exit_heads: str | None = None,
    model_args: dict | None = None,
) -> MethodRun:
    """One method (a policy string or object; ``autoregressive`` for plain decoding) on ``tasks`` through
    ``simple_evaluate``, saved as ``results_/samples_/speed_<name>`` in ``out_dir`` (so that methods can run
    as separate jobs and :meth:`MethodRun.load` + :func:`write_parity` compare them later). ``exit_heads``
    and ``model_args`` go to :class:`lede.eval.lm_eval_model.LedeLM`."""
    return _evaluate(Path(out_dir), name, lm, policy, tasks, suite, dict(exit_heads=exit_heads, **(model_args or {})))


def _evaluate(out: Path, name: str, lm, spec, tasks: Sequence[str], suite: SuiteSettings, lm_args: dict) -> MethodRun:
    """One method through ``simple_evaluate``; writes results_/samples_/speed_<name> into ``out``."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    from lede.eval.lm_eval_model import LedeLM
    from lede.eval.tasks import task_manager

    out.mkdir(parents=True, exist_ok=True)
    chat = suite.apply_chat_template
    if chat is None:
        chat = bool(getattr(lm.tokenizer, "chat_template", None))
    speed_log = out / f"speed_{name}.jsonl.partial"  # appended per request; renamed when the run is complete
    speed_log.unlink(missing_ok=True)
    lede_lm = LedeLM(loaded=lm, policy=spec, speed_log=str(speed_log), **lm_args)
    res = lm_eval.simple_evaluate(
        model=lede_lm, tasks=list(tasks), task_manager=task_manager(suite.data_dir), limit=suite.limit,
        log_samples=True, apply_chat_template=chat, gen_kwargs=suite.gen_kwargs, num_fewshot=suite.num_fewshot,
        bootstrap_iters=0, confirm_run_unsafe_code=suite.confirm_run_unsafe_code,
    )
    summary = {"method": name, "model": lm.name, "policy": lede_lm.policy_spec, "results": res.get("results"),
               "speed": lede_lm.speed_summary(), "truncations": lede_lm.truncations, "config": res.get("config")}
    atomic_write_text(out / f"results_{name}.json", json.dumps(summary, indent=2, default=handle_non_serializable))
    speed = {}
    for r in lede_lm.records:
        speed.setdefault((r["task"], r["doc_id"]), {k: r[k] for k in SAMPLE_SPEED_FIELDS})
    with atomic_path(out / f"samples_{name}.jsonl") as tmp, tmp.open("w", encoding="utf-8") as fh:
        for task, samples in res["samples"].items():
            for smp in samples:
                line = {"task": task, **smp, "lede": speed.get((task, smp["doc_id"]))}
                fh.write(json.dumps(line, default=handle_non_serializable) + "\n")
    speed_log.touch()  # no generation requests (loglikelihood-only tasks): an empty log
    speed_log.replace(out / f"speed_{name}.jsonl")
    return MethodRun.from_evaluation(name, res, lede_lm)


def compare_models(
    out_dir: str | Path,
    base,
    variant,
    tasks: Sequence[str] = ("lede_gsm8k",),
    data_dir: str | Path | None = None,
    limit: int | float | None = None,
    gen_kwargs: dict | None = None,
    apply_chat_template: bool | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> ParityReport:
    """Plain decoding of two models (e.g. a base model and its early-exit variant) on the same tasks: the
    parity report with ``base.name`` as the baseline (metric differences with paired bootstrap intervals,
    output identity, and every differing output with the base model's top-2 margin there)."""
    if base.name == variant.name:
        raise ValueError(f"compare_models needs two different models, got {base.name!r} twice")
    if apply_chat_template is None:  # both models are prompted the same way: as the base model wants
        apply_chat_template = bool(getattr(base.tokenizer, "chat_template", None))
    suite = SuiteSettings(data_dir, limit, gen_kwargs, apply_chat_template=apply_chat_template)
    runs = [_evaluate(Path(out_dir), lm.name, lm, "autoregressive", tasks, suite, {}) for lm in (base, variant)]
    report = parity_report(runs, baseline=base.name, margin_fn=full_model_margin(base),
                           decode=lambda ids: base.tokenizer.decode(ids, skip_special_tokens=False),
                           n_boot=n_boot, seed=seed)
    report.write(out_dir)
    return report
