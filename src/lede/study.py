"""The workflow scripts' shared layer (``workflow/scripts/*.py`` import it; it sits above every other module):
log to the rule's log file, fix the thread count, load the studied model, select prompts per split, build the
baselines and behaviour policies, key benchmark journals. Config reaches it only through the rule's ``params``."""

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# config key model_cache: where the GGUF alias is converted once (lede.core.model.convert_gguf). Read from the config,
# not from params: it changes no output, and a params change would rerun every job.
MODEL_CACHE = None


def setup(snakemake):
    global MODEL_CACHE
    MODEL_CACHE = snakemake.config.get("model_cache")
    log = open(snakemake.log[0], "w", buffering=1)
    sys.stdout = sys.stderr = log  # tqdm progress and warnings go to the rule's log
    logging.basicConfig(stream=log, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import torch

    torch.set_num_threads(int(snakemake.params.threads))
    logging.info("rule %s: threads=%d params=%s", snakemake.rule, torch.get_num_threads(), dict(snakemake.params))
    return snakemake.params


def load_lm(params, device=None, kernels=None, early_exit_weights=None, costs_path=None):
    """The studied model: the base model, or its early-exit variant when the config enables it (or when
    ``early_exit_weights`` is given: the variant of the params' base model). ``kernels``: overrides the config's
    (training needs "torch"). ``costs_path``: with ``kernels: auto``, a job downstream of the cost model runs on the
    kernels the cost model was timed on instead of timing them again at load: ``auto``'s choice between kernels
    within ~10% of each other flipped from job to job on a noisy host (measured 2026-12-07: oneDNN's one-token pass
    kept in one job, lede's in the next, 50 vs 30 ms), and then the prices every reward and replay used were not
    those of the engine that was timed. A job that times decoding has the params ``compile`` and ``compile_cuts``
    (``timed_params`` in workflow/rules/common.smk): its decoder layers are compiled by TorchInductor at load
    (``lede.core.compiled``; the seconds it took are logged)."""
    from lede.drafters.loading import load_model

    if kernels is None and params.kernels == "auto" and costs_path is not None:
        kernels = cost_model_kernels(costs_path)
    return load_model(params.model, dtype=params.dtype, device=device or params.device,
                      kernels=kernels or params.kernels,
                      early_exit_weights=early_exit_weights or params.get("early_exit_weights"), cache_dir=MODEL_CACHE,
                      compiled=bool(params.get("compile", False)), compile_cuts=params.get("compile_cuts", ()))


def first_per_category(pool, take, exclude=frozenset()):
    """The first ``take[category]`` prompts of each category of ``pool`` (in the pool's deterministic order),
    skipping uids in ``exclude``; returns (prompts, count taken per category)."""
    prompts, seen = [], {}
    for pr in pool:
        if pr.uid not in exclude and seen.get(pr.category, 0) < take.get(pr.category, 0):
            prompts.append(pr)
            seen[pr.category] = seen.get(pr.category, 0) + 1
    return prompts, seen


def split_prompts(params, split):
    """The prompts of a distillation split, in the split's order: train and eval as set in exits.train /
    exits.eval (``params.prompts``); dev = ``policy_train_prompts`` with ``params.dev_per_category`` (the
    policy's prompts, never distilled on), generated to exits.train.max_new_tokens."""
    import logging

    from lede.data import prompt_pool

    cfg = params.prompts
    if split == "dev":
        n = params.dev_per_category
        return policy_train_prompts(params, n, extra_gsm8k=n), cfg["max_new_tokens"]
    if split == "train":
        pool = prompt_pool(params.data_dir, "train", include_extra=True)
        take = {c: cfg["spec_bench_per_category"] for c in params.categories}
        take.update(gsm8k=cfg["gsm8k"], qa_nq=cfg["nq_open"])
    else:
        pool = prompt_pool(params.data_dir, "eval", categories=list(params.categories), include_extra=False)
        take = {c: cfg["per_category"] for c in params.categories}
    prompts, seen = first_per_category(pool, take)
    logging.info("%s prompts per category: %s", split, seen)
    if not prompts:
        raise SystemExit(f"no {split} prompts selected: check exits.{split} in the config")
    return prompts, cfg["max_new_tokens"]


def distillation_sequences(params, split, samples: int = 0, temperature: float | None = None,
                           top_p: float | None = None):
    """The loaded model and its greedy continuations (``lede.drafters.distill.Sequence``) of the split's prompts,
    then ``samples`` sampled continuations of each prompt at ``temperature`` / ``top_p`` (the config's
    ``exits.train``; uid ``<prompt uid>#s<j>``, j = 1..samples; more distillation text for the adapters,
    ``lede.drafters.distill.sampled_continuations``)."""
    from lede.drafters.distill import Sequence, greedy_continuations, sampled_continuations

    if samples and (temperature is None or top_p is None):
        raise ValueError(f"samples={samples}: sampled continuations need a temperature and a top_p")

    prompts, max_new = split_prompts(params, split)
    lm = load_lm(params)
    ids = [lm.encode_chat(pr.text) for pr in prompts]
    conts = greedy_continuations(lm, ids, max_new, batch_size=params.batch_size)
    seqs = [Sequence(i, c, pr.category, pr.uid) for i, c, pr in zip(ids, conts, prompts)]
    for j in range(1, samples + 1):  # one pass over the prompts per sample: each seeded apart, reproducible
        conts = sampled_continuations(lm, ids, max_new, temperature, top_p, seed=params.seed + 1000 * j,
                                      batch_size=params.batch_size)
        seqs += [Sequence(i, c, pr.category, f"{pr.uid}#s{j}", sampled=True) for i, c, pr in zip(ids, conts, prompts)]
    return lm, seqs, max_new


def cost_model_kernels(costs_path):
    """The CPU kernels the cost model at ``costs_path`` was timed on (a ``KernelChoice``), or None where it recorded
    none (transformers' own layers, a GPU)."""
    from lede.core.costs import CostModel
    from lede.core.kernels import KernelChoice

    recorded = CostModel.load(costs_path).kernels
    return KernelChoice.parse(recorded) if recorded else None


def decoder_from_selection(params, selected_path, max_draft_len, costs_path=None):
    """The model (on the cost model's kernels with ``costs_path``: ``load_lm``) and a Decoder with the selected exit
    heads (adapters + draft vocabulary)."""
    from lede.core.engine import Decoder
    from lede.core.exits import load_exit_heads

    lm = load_lm(params, costs_path=costs_path)
    heads = load_exit_heads(lm, selected_path)
    return lm, Decoder(lm, exit_heads=heads, max_draft_len=max_draft_len)


@dataclass
class ReplayedSplit:
    """One distillation split's stored sequences with their teacher-forced replay tables (src/lede/replay.py)."""

    lm: Any            # the studied model (lede.core.model.LM)
    sequences: list    # the split's DistillSequence records
    tables: dict       # replay tables: every exit layer's predictions along each sequence
    decoder: Any       # a ReplayDecoder over ``tables``: runs any Policy along the stored sequences

    def replayable(self):
        """The sequences that have a continuation: those a policy can be replayed along."""
        return [s for s in self.sequences if s.continuation]


def replayed_split(params, selected_path, distill_path, split, max_draft_len, why) -> ReplayedSplit:
    """Teacher-forced replay of one distillation split's stored sequences with the selected exit heads. A file of
    another split is refused with ``why`` (each caller's reason for reading only ``split``)."""
    from lede.drafters.distill import load_distill
    from lede.rl.replay import ReplayDecoder, replay_tables

    seqs, data, meta = load_distill(distill_path)
    if meta.get("split") != split:
        raise ValueError(f"{distill_path} holds the {meta.get('split')!r} split: {why}")
    lm, dec = decoder_from_selection(params, selected_path, max_draft_len)
    tables = replay_tables(lm, {l: dec.head(l) for l in exit_layers(params)}, seqs, data)
    return ReplayedSplit(lm, seqs, tables, ReplayDecoder(lm, tables, max_draft_len))


def adapter_files(paths):
    """{(layer, design): path} of the train_adapter rule's outputs (``.../L{layer}_{design}.pt``)."""
    out = {}
    for path in paths:
        layer, design = Path(path).stem[1:].split("_")
        out[int(layer), design] = path
    return out


def load_costs(costs_path, selected_path, lm=None):
    """The measured cost model, each layer's draft priced as its selected exit head (exit report); with ``lm`` (a job
    that decodes), a warning in the log when it runs other CPU kernels than the cost model was timed on."""
    import logging

    from lede.core.costs import kernels_mismatch
    from lede.core.exits import selected_costs

    costs = selected_costs(costs_path, selected_path)
    if lm is not None and (why := kernels_mismatch(costs, lm)):
        logging.warning(why)
    return costs


def exit_layers(params):
    """The exit layers among the candidate drafters ``params.layers`` (which may hold LOOKUP, 0)."""
    return [l for l in params.layers if l != 0]


def best_static_cell(best_path, max_draft_len, exits_only=False):
    """(exit layer, draft length) of the sweep's best static cell among those within the draft-length cap; with
    ``exits_only``, the best cell that drafts from an exit layer (not prompt lookup: the heuristics' layer)."""
    import json

    blob = json.loads(Path(best_path).read_text())
    cells = [c for c in blob["exit_cells" if exits_only else "cells"] if c["draft_len"] <= max_draft_len]
    if not cells:
        raise ValueError(f"{best_path}: no static cell with draft length <= policy.max_draft_len={max_draft_len}; "
                         "raise policy.max_draft_len or include shorter draft lengths in sweep.draft_lens")
    return cells[0]["exit_layer"], cells[0]["draft_len"]


def baseline_spec(name, best_path, max_draft_len):
    """A baseline the study compares LEDE against, as a policy spec in the one grammar (``lede.rl.spec``), from the
    sweep's best cells (``best_path``): ``best_static`` (the best cell, prompt lookup included: static:L:K or
    lookup:K), ``adaptive_k`` (transformers' assisted-generation heuristic at the best exit cell's L) or
    ``dynamic_exit`` (over the exit layers, priced by the cost model)."""
    if name == "best_static":
        layer, k = best_static_cell(best_path, max_draft_len)
        return f"static:{layer}:{k}"
    if name == "adaptive_k":
        layer, k = best_static_cell(best_path, max_draft_len, exits_only=True)
        return f"adaptive:{layer}:{k}"
    if name == "dynamic_exit":
        return "dynamic"
    raise ValueError(f"unknown baseline {name!r}; expected best_static, adaptive_k or dynamic_exit")


def policy_context(params, lm, costs=None):
    """What building a policy from its spec needs in a workflow job (``lede.rl.spec.PolicyContext``)."""
    from lede.rl.spec import PolicyContext

    policy = getattr(params, "policy", None)
    kmax = policy["max_draft_len"] if policy else params.max_draft_len
    return PolicyContext(lm.num_layers, kmax, lm.name, list(params.layers), costs)


def baseline_policy(name, params, best_path, costs, max_draft_len, lm):
    """The baseline ``name`` (see ``baseline_spec``) built through the one policy grammar."""
    from lede.rl.spec import parse_policy

    return parse_policy(baseline_spec(name, best_path, max_draft_len), policy_context(params, lm, costs))


def behaviour_policies(params, sweep_csv, costs, static_cells, random, random_seed=0, confidence=True):
    """The behaviour policies that experience is collected with: the ``static_cells`` best static cells of
    the replayed dev sweep, ``random`` random schedules (seeds ``random_seed``..), ε-perturbed adaptive K,
    confidence threshold (only with ``confidence``: it reads the draft confidence, which replay knows only
    approximately) and dynamic exit, and plain decoding."""
    import csv

    from lede.rl.features import ActionSpace
    from lede.rl.heuristics import AdaptiveDraftLength, ConfidenceThreshold, DynamicExit
    from lede.core.policy import Autoregressive, RandomSchedule, Static
    from lede.rl.offline import EpsilonPerturbed

    pol, kmax = params.policy, params.policy["max_draft_len"]
    space = ActionSpace(tuple(params.layers), kmax)
    rows = [r for r in csv.DictReader(open(sweep_csv)) if r["category"] == "all" and int(r["draft_len"]) <= kmax]
    rows.sort(key=lambda r: -float(r["replay_speedup"]))
    cells = [(int(r["layer"]), int(r["draft_len"])) for r in rows[: max(static_cells, 1)]]
    best_l, best_k = next((int(r["layer"]), int(r["draft_len"])) for r in rows if int(r["layer"]) != 0)  # heuristics: exits
    eps = pol["collect"]["epsilon"]
    out = [Static(l, k) for l, k in cells[:static_cells]]
    out += [RandomSchedule(list(params.layers), kmax, seed=s, p_plain=0.2) for s in range(random_seed, random_seed + random)]
    out.append(EpsilonPerturbed(AdaptiveDraftLength(best_l, initial=min(best_k, kmax), max_len=kmax), space, eps, seed=1))
    if confidence:
        out.append(EpsilonPerturbed(ConfidenceThreshold(best_l, 0.5, kmax), space, eps, seed=2))
    out += [EpsilonPerturbed(DynamicExit(exit_layers(params), costs, kmax), space, eps, seed=3), Autoregressive()]
    return space, out


def policy_train_prompts(params, per_category, extra_gsm8k=0):
    """Training prompts for the stages after the exit adapters (experience, threshold tuning): per Spec-Bench
    category (math_reasoning has none in the train split) and ``extra_gsm8k`` GSM8K train prompts, never one
    the adapters were distilled on. On their own distillation prompts the adapters agree with the model about
    twice as often as on unseen ones (L2: 0.47 vs 0.24 in the full CPU run), so experience collected there
    teaches a policy that drafting pays more than it does. ``params.prompts`` is ``exits.train``."""
    from lede.data import prompt_pool

    distilled = {pr.uid for pr in split_prompts(params, "train")[0]}
    cats = [c for c in params.categories if c != "math_reasoning"]
    take = {c: per_category for c in cats}
    if extra_gsm8k:
        take["gsm8k"] = extra_gsm8k
    pool = prompt_pool(params.data_dir, "train", categories=list(take), include_extra=bool(extra_gsm8k))
    out, seen = first_per_category(pool, take, exclude=distilled)
    short = {c: seen.get(c, 0) for c in take if seen.get(c, 0) < take[c]}
    if short:
        raise SystemExit(
            "not enough training prompts that the exit adapters were not distilled on: "
            + ", ".join(f"{c} has {n} of the {take[c]} needed" for c, n in short.items())
            + ": lower exits.train.spec_bench_per_category (exits.train.gsm8k for gsm8k) or policy.dev_per_category")
    return out


def prompts_for(params, split, per_category, extra_gsm8k=0, humaneval=0, generalisation=0):
    """Spec-Bench prompts of the split, per category, plus ``extra_gsm8k`` GSM8K train prompts and (evaluation
    only) the first ``humaneval`` HumanEval problems and the first ``generalisation`` prompts of each kind of the
    generalisation set (``lede.data.generalisation_prompts``: sources no training split holds)."""
    from lede.data import generalisation_prompts, prompt_pool

    cats = list(params.categories)
    if split == "train":
        cats = [c for c in cats if c != "math_reasoning"]  # all its questions are GSM8K test questions
    prompts = prompt_pool(params.data_dir, split, categories=cats, per_category=per_category, include_extra=False)
    if extra_gsm8k:
        prompts += prompt_pool(params.data_dir, "train", categories=["gsm8k"], per_category=extra_gsm8k)
    if humaneval:
        if split != "eval":
            raise ValueError("HumanEval is evaluation-only data")
        prompts += prompt_pool(params.data_dir, "eval", categories=["coding_humaneval"], per_category=humaneval)
    if generalisation:
        if split != "eval":
            raise ValueError("the generalisation prompts are evaluation-only data")
        prompts += generalisation_prompts(params.data_dir, generalisation)
    return prompts


def bench_journal(snakemake, out_path):
    """The resume journal (lede.eval.bench.BenchJournal) of a benchmarking job, beside its output ``out_path``. Its key
    digests the job's params, its input files (content up to 64 MiB, else size and mtime, as Snakemake's own rerun
    test) and the workflow scripts, so that a journal is resumed only by the same job on the same inputs; the model
    weights and the library source are inputs of every such job."""
    import hashlib
    import json

    from lede.eval.bench import BenchJournal

    h = hashlib.sha256(json.dumps(dict(snakemake.params), sort_keys=True, default=str).encode())
    files = sorted({Path(x) for x in snakemake.input} | set(Path(snakemake.scriptdir).glob("*.py")))
    for path in (q for x in files for q in ([x] if x.is_file() else sorted(x.rglob("*")) if x.is_dir() else [x])):
        h.update(str(path).encode())
        if path.is_file() and path.stat().st_size <= 64 << 20:
            h.update(hashlib.sha256(path.read_bytes()).digest())
        elif path.exists():
            h.update(f"{path.stat().st_size}/{path.stat().st_mtime_ns}".encode())
    return BenchJournal(f"{out_path}.journal.jsonl", h.hexdigest())


def eval_bench_prompts(params, lm):
    """The evaluation half of Spec-Bench (bench.per_category per category), encoded for ``run_bench``."""
    from lede.eval.bench import BenchPrompt
    from lede.data import prompt_pool

    prompts = prompt_pool(params.data_dir, "eval", categories=list(params.categories),
                          per_category=params.per_category, include_extra=False)
    return [BenchPrompt(pr.uid, pr.category, tuple(lm.encode_chat(pr.text))) for pr in prompts]


def write_bench(params, lm, records, n_prompts, out, title, extra=None):
    """Summaries (overall and per category) of interleaved records, as JSON and Markdown (atomically)."""
    import logging
    from dataclasses import asdict

    import torch

    from lede.eval.bench import format_summary, summarize, write_json
    from lede.core.io import atomic_write_text

    overall, per_cat = summarize(records), summarize(records, group=lambda r: r.category)
    header = (f"model={lm.name} dtype={lm.dtype} device={lm.device} threads={torch.get_num_threads()} "
              f"kernels=({lm.kernels}) prompts={n_prompts} max_new_tokens={params.max_new_tokens} (evaluation half, interleaved)")
    logging.info("%s\n%s\n%s", header, format_summary(overall), format_summary(per_cat))
    write_json(out.json, {"settings": dict(params) | {"torch_threads": torch.get_num_threads(), "kernels": lm.kernels}, **(extra or {}),
                          "summary": {g: [asdict(s) for s in rows] for g, rows in (overall | per_cat).items()},
                          "records": [asdict(r) for r in records]})
    md = [f"# {title}", "", header, "", "```", format_summary(overall), "", format_summary(per_cat), "```", ""]
    atomic_write_text(out.md, "\n".join(md))
