"""Side-by-side speed benchmark: plain decoding vs. policies, interleaved so that drift cancels.

    lede bench --model smollm2-135m --per-category 2 --configs 8:4,20:2 --max-new-tokens 64

For every prompt, every configuration runs once per repeat, in an order shuffled from prompt to prompt
(seeded: ``run_order``), so slow phases of a shared machine hit every configuration alike and no configuration
always runs right after the same other one: a run's speed can depend on what ran just before it (the allocator's
and the BLAS library's state; until 2026-12-01 the order was rotated, A B C, B C A, ..., which fixes every
configuration's predecessor, and the 20-prompt evaluation then showed a ~9% engine-vs-cost-model gap between the
static cell and the switching policies that a separate run of three methods did not reproduce). The summary
quotes medians over prompts: tokens/s, the per-prompt ratio to plain decoding (paired), mean tokens
per round, and whether the greedy output equals plain decoding's.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from lede.core.engine import Decoder, Generation
from lede.core.io import atomic_write_text
from lede.core.policy import Autoregressive, Policy

PLAIN = "plain"
HF_GENERATE = "hf_generate"
HF_PROMPT_LOOKUP = "hf_prompt_lookup"  # transformers' prompt-lookup decoding (Spec-Bench's PLD)


@dataclass(frozen=True)
class BenchPrompt:
    uid: str
    category: str
    ids: tuple[int, ...]


@dataclass
class BenchRecord:
    prompt: str
    category: str
    config: str
    repeat: int
    new_tokens: int
    wall_s: float
    tokens_per_s: float
    rounds: int
    mean_accepted: float
    identical: bool  # token ids equal plain decoding's (same prompt, same repeat)
    overhead_frac: float  # loop time outside forwards and policy / decode time
    policy_frac: float
    rounds_detail: list = None  # [(exit_layer or None, drafted, accepted), ...] per round
    pieces: list = None  # with keep_rounds: the output token by token (decoded pieces), for token-level figures
    decode_s: float = float("nan")  # wall time after the prefill (hf_generate: all of it)
    prompt_tokens: int = 0


@dataclass
class ConfigSummary:
    config: str
    prompts: int
    median_tokens_per_s: float
    median_ratio: float  # median over prompts of tokens/s ÷ plain's tokens/s
    ratio_q25: float
    ratio_q75: float
    mean_accepted: float
    identity_rate: float
    median_overhead_frac: float
    median_policy_frac: float


def _hf_generate(decoder: Decoder, ids: Sequence[int], max_new_tokens: int, reference: bool = True, **kwargs) -> Generation:
    """transformers' greedy generate, timed the same way. ``reference``: with transformers' own linear
    layers (the reference for the plain path); otherwise with the engine's kernels (so that prompt lookup
    is compared with lede on equal kernels)."""
    from contextlib import nullcontext

    from lede.core.kernels import reference_kernels

    model = decoder.lm.model
    x = torch.tensor([list(ids)], device=decoder.lm.device)
    t = time.perf_counter()
    with torch.inference_mode(), (reference_kernels(model) if reference else nullcontext()):
        out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=next(iter(decoder.lm.eos_token_ids), 0), **kwargs)
    wall = time.perf_counter() - t
    toks = out[0, len(ids):].tolist()
    return Generation(len(ids), toks, "", [], 0.0, wall, "length", HF_GENERATE)


class BenchJournal:
    """The records of every finished (repeat, prompt), appended as each finishes, so that an interrupted benchmark
    resumes where it stopped instead of starting over (the evaluation at issue 8's scale runs for hours on a 2-core
    CPU). A JSON-lines file: a header ``{"key": ..., "meta": {...}}``, then one line per (repeat, prompt).

    ``key`` is a digest of everything the records depend on (settings, input files, code; the caller's to compute);
    a journal with another key is discarded, as is a line cut short by the interruption. ``meta`` carries what a
    resumed run must reuse rather than recompute, e.g. a threshold tuned by timing: read ``meta`` after opening,
    then ``begin(**meta)``. Call ``finish()`` (removes the file) once the final outputs are written.

        journal = BenchJournal("results/eval/records.journal.jsonl", key)
        threshold = journal.meta.get("threshold") or tune()
        journal.begin(threshold=threshold)
        records = run_bench(dec, prompts, configs, journal=journal)
    """

    def __init__(self, path: str | Path, key: str):
        self.path, self.key = Path(path), key
        self.meta: dict = {}
        self.done: dict[tuple[int, str], list[BenchRecord]] = {}
        self._ours = False  # the file holds a journal of this key
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            head = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            head = None
        if not isinstance(head, dict) or head.get("key") != self.key:
            return  # another run's (or unreadable): started afresh by begin()
        self._ours, self.meta = True, dict(head.get("meta") or {})
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # the line being written when the run was killed
            recs = [BenchRecord(**r) for r in entry["records"]]
            for r in recs:  # JSON turned the per-round tuples into lists
                if r.rounds_detail is not None:
                    r.rounds_detail = [tuple(d) for d in r.rounds_detail]
            self.done[(entry["repeat"], entry["prompt"])] = recs

    def begin(self, **meta) -> None:
        """Keep the journal's records if its ``meta`` equals ``meta`` (or it has none yet); otherwise start afresh.
        Rewrites the file from the records kept, so that appending never follows a cut line."""
        if not self._ours or self.meta != meta:
            self.done, self.meta = {}, dict(meta)
        self._ours = True
        lines = [json.dumps({"key": self.key, "meta": self.meta})]
        lines += [self._line(rep, prompt, recs) for (rep, prompt), recs in self.done.items()]
        atomic_write_text(self.path, "\n".join(lines) + "\n")

    @staticmethod
    def _line(repeat: int, prompt: str, records: Sequence[BenchRecord]) -> str:
        return json.dumps({"repeat": repeat, "prompt": prompt, "records": [asdict(r) for r in records]})

    def kernels(self, lm) -> dict:
        """The ``meta`` entry for ``lm``'s CPU linear kernels, for :meth:`begin`: a journal being resumed re-applies
        the kernels it recorded to ``lm`` (``lede.core.kernels.set_linear_kernels``; ``auto`` times them at each
        load and may choose differently), so that the resumed records run on the same kernels as the first ones;
        a fresh journal records ``lm``'s choice.

            journal.begin(**journal.kernels(lm))
        """
        from lede.core.kernels import KernelChoice, set_linear_kernels

        choice = getattr(lm, "kernels", None)
        if not isinstance(choice, KernelChoice):
            return {"kernels": None}  # transformers' layers untouched (GPU, bf16, kernels=torch): nothing to choose
        saved = self.meta.get("kernels") if self._ours else None
        if isinstance(saved, dict) and self.done:
            set_linear_kernels(lm.model, saved["one_token"], saved["many_tokens"])
            lm.kernels = KernelChoice(saved["one_token"], saved["many_tokens"], dict(saved.get("ms") or {}))
            return {"kernels": saved}
        return {"kernels": {"one_token": choice.one_token, "many_tokens": choice.many_tokens, "ms": dict(choice.ms)}}

    def append(self, repeat: int, prompt: str, records: Sequence[BenchRecord]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(self._line(repeat, prompt, records) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done[(repeat, prompt)] = list(records)

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


def run_order(names: Sequence[str], prompt_index: int, repeat: int, seed: int = 0) -> list[str]:
    """The order in which the configurations run on one prompt in one repeat: a permutation of ``names`` drawn from a
    generator seeded by (seed, repeat, prompt index), so it is the same in every run of the benchmark."""
    order = list(names)
    random.Random(f"{seed}/{repeat}/{prompt_index}").shuffle(order)
    return order


def run_bench(
    decoder: Decoder,
    prompts: Sequence[BenchPrompt],
    configs: dict[str, Policy | str | Callable[[BenchPrompt], Policy]],
    max_new_tokens: int = 128,
    repeats: int = 1,
    warmup: int = 1,
    progress: bool = True,
    keep_rounds: bool = False,
    seed: int = 0,
    journal: BenchJournal | None = None,
) -> list[BenchRecord]:
    """Run every config on every prompt, interleaved (``keep_rounds``: also each round's exit layer, drafted
    and accepted counts, and the output's decoded pieces). ``configs`` maps a name to a policy, to a function
    of the prompt returning a policy (e.g. the oracle, built per prompt), or to ``"hf_generate"`` /
    ``"hf_prompt_lookup"``; a plain (Autoregressive) config named ``"plain"`` is added if absent. ``seed``: the
    run order's (``run_order``). ``journal`` (begun): finished prompts' records are taken from it, not rerun, and
    every prompt's are appended to it as it finishes."""
    if not prompts:
        raise ValueError("no prompts to benchmark: check the prompt file / categories / per_category")
    configs = {PLAIN: Autoregressive(), **configs}
    names = list(configs)

    def run(name: str, p: BenchPrompt) -> Generation:
        cfg = configs[name]
        if cfg == HF_GENERATE:
            return _hf_generate(decoder, p.ids, max_new_tokens)
        if cfg == HF_PROMPT_LOOKUP:
            return _hf_generate(decoder, p.ids, max_new_tokens, reference=False, prompt_lookup_num_tokens=10)
        policy = cfg if hasattr(cfg, "choose_exit") else cfg(p)
        return decoder.generate(list(p.ids), policy, max_new_tokens=max_new_tokens)

    # a journal's records count only for the same configurations, in the same order (else that prompt reruns)
    done = {k: v for k, v in (journal.done if journal is not None else {}).items() if [r.config for r in v] == names}
    todo = [(rep, i, p) for rep in range(repeats) for i, p in enumerate(prompts) if (rep, p.uid) not in done]
    for _ in range(warmup if todo else 0):
        for name in names:
            run(name, todo[0][2])

    def decode(ids: list[int]) -> str:
        return decoder.lm.tokenizer.decode(ids, skip_special_tokens=False)

    records: list[BenchRecord] = []
    bar = tqdm(total=len(prompts) * repeats * len(names), desc="bench", disable=not progress, mininterval=5)
    for rep in range(repeats):
        for i, p in enumerate(prompts):
            if (rep, p.uid) in done:
                records += done[(rep, p.uid)]
                bar.update(len(names))
                continue
            outs = {name: run(name, p) for name in run_order(names, i, rep, seed)}
            ref = outs[PLAIN].token_ids
            mine = []
            for name, g in ((n, outs[n]) for n in names):  # records in the configured order, whatever the run order
                dec = g.decode_s or 1e-12
                mine.append(BenchRecord(
                    prompt=p.uid, category=p.category, config=name, repeat=rep, new_tokens=g.new_tokens,
                    wall_s=g.wall_s, tokens_per_s=g.tokens_per_s, rounds=len(g.rounds),
                    mean_accepted=g.mean_accepted if g.rounds else float("nan"),
                    identical=g.token_ids == ref,
                    overhead_frac=g.overhead_s / dec if g.rounds else float("nan"),
                    policy_frac=sum(r.policy_s for r in g.rounds) / dec if g.rounds else float("nan"),
                    rounds_detail=[(r.exit_layer, r.drafted, r.accepted) for r in g.rounds] if keep_rounds else None,
                    pieces=[decode([t]) for t in g.token_ids] if keep_rounds and g.rounds else None,
                    decode_s=g.decode_s, prompt_tokens=len(p.ids),
                ))
                bar.update()
            if journal is not None:
                journal.append(rep, p.uid, mine)
            records += mine
    bar.close()
    return records


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(records: Sequence[BenchRecord], group: Callable[[BenchRecord], str] = lambda r: "all") -> dict[str, list[ConfigSummary]]:
    """Per group (e.g. task category), per config: medians over (prompt, repeat) pairs."""
    plain = {(r.prompt, r.repeat): r.tokens_per_s for r in records if r.config == PLAIN}
    out: dict[str, list[ConfigSummary]] = {}
    for g in sorted({group(r) for r in records}):
        rows = []
        for cfg in dict.fromkeys(r.config for r in records):
            rs = [r for r in records if r.config == cfg and group(r) == g]
            if not rs:
                continue
            ratios = [r.tokens_per_s / plain[(r.prompt, r.repeat)] for r in rs]
            finite = lambda xs: [x for x in xs if x == x]  # drop NaN (hf_generate has no rounds)
            rows.append(ConfigSummary(
                config=cfg, prompts=len(rs),
                median_tokens_per_s=statistics.median(r.tokens_per_s for r in rs),
                median_ratio=statistics.median(ratios), ratio_q25=_quantile(ratios, 0.25),
                ratio_q75=_quantile(ratios, 0.75),
                mean_accepted=statistics.fmean(finite([r.mean_accepted for r in rs]) or [float("nan")]),
                identity_rate=sum(r.identical for r in rs) / len(rs),
                median_overhead_frac=statistics.median(finite([r.overhead_frac for r in rs]) or [float("nan")]),
                median_policy_frac=statistics.median(finite([r.policy_frac for r in rs]) or [float("nan")]),
            ))
        out[g] = rows
    return out


def format_summary(summary: dict[str, list[ConfigSummary]]) -> str:
    lines = []
    head = f"{'config':<22} {'n':>4} {'tok/s':>8} {'ratio':>7} {'[q25, q75]':>15} {'acc/rnd':>8} {'ident':>6} {'ovh%':>6}"
    for g, rows in summary.items():
        lines += [f"== {g}", head]
        for s in rows:
            lines.append(
                f"{s.config:<22} {s.prompts:>4} {s.median_tokens_per_s:>8.2f} {s.median_ratio:>6.3f}x "
                f"[{s.ratio_q25:>5.3f}, {s.ratio_q75:>5.3f}] {s.mean_accepted:>8.2f} {s.identity_rate:>6.1%} "
                f"{100 * s.median_overhead_frac:>5.2f}"
            )
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict) -> None:
    """Atomic write: the file is complete or absent, never half-written."""
    atomic_write_text(path, json.dumps(payload, indent=1,
                                       default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))
