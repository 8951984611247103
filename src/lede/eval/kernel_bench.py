"""lede's CPU linear kernels against torch's on this machine: single passes of T tokens over a cache of ctx
tokens, or end-to-end greedy generation (``python -m lede.eval.kernel_bench [--end-to-end]``)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from lede.core.engine import Decoder
from lede.core.kernels import reference_kernels, set_linear_kernels
from lede.core.policy import LOOKUP, Autoregressive, Static
from lede.core.tuning import _time_passes
from lede.data import DEFAULT_DATA_DIR, prompt_pool
from lede.drafters.loading import load_model
from lede.eval.bench import HF_GENERATE, BenchPrompt, format_summary, run_bench, summarize


def _benchmark(contexts=(256, 2048), tokens=(1, 2, 3, 5), repeats: int = 15, threads: int = 2) -> None:
    """One forward of T tokens over a cache of ctx tokens, this module's kernels vs transformers' (interleaved),
    on the embedded default; prints medians and their ratio."""
    torch.set_num_threads(threads)
    lm = load_model("smollm2-135m", dtype="float32", device="cpu", kernels="lede", cache_dir="resources/models")
    dec = Decoder(lm)
    ids = torch.randint(100, 40000, (max(contexts) + max(tokens),), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"model={lm.name} threads={torch.get_num_threads()} repeats={repeats} (ms, median; ratio = reference / lede)")
    setups = {"lede": nullcontext, "reference": lambda: reference_kernels(lm.model)}
    for ctx in contexts:
        ms = _time_passes(dec, ids, ctx, tokens, setups, repeats=repeats, timed_per_block=3)
        for t in tokens:
            fast, ref = ms[f"lede/{t}"], ms[f"reference/{t}"]
            print(f"ctx={ctx:5d} T={t}  lede {fast:6.1f}  reference {ref:6.1f}  ratio {ref / fast:.2f}x", flush=True)


def _end_to_end(data_dir: str, per_category: int = 1, max_new_tokens: int = 128, threads: int = 2,
                model_cache: str | None = "resources/models") -> None:
    """Greedy generation on Spec-Bench's evaluation half, interleaved in one run: plain decoding and static prompt
    lookup (K = 8) with lede's kernels everywhere, with torch's everywhere, and with the choice of
    ``tune_cpu_kernels``; transformers' ``generate`` beside them. Ratios over plain decoding with lede's kernels."""
    torch.set_num_threads(threads)
    lm = load_model("smollm2-135m", dtype="float32", device="cpu", kernels="auto", cache_dir=model_cache)
    auto = lm.kernels
    print(f"model={lm.name} threads={torch.get_num_threads()} auto choice: {auto} "
          f"({', '.join(f'{k} {v:.1f} ms' for k, v in auto.ms.items())})")
    sets = {"lede": ("lede", "lede"), "torch": ("torch", "torch"), "auto": (auto.one_token, auto.many_tokens)}

    def under(kernels: tuple[str, str], policy):
        def make(_prompt):
            set_linear_kernels(lm.model, *kernels)  # before this method's run; every method sets its own
            return policy
        return make

    configs = {"plain": under(sets["lede"], Autoregressive())}  # "plain": the reference the ratios divide by
    for name, ks in sets.items():
        if name != "lede":
            configs[f"plain_{name}"] = under(ks, Autoregressive())
    for name, ks in sets.items():
        configs[f"lookup_K8_{name}"] = under(ks, Static(LOOKUP, 8))
    configs[HF_GENERATE] = HF_GENERATE
    prompts = [BenchPrompt(p.uid, p.category, tuple(lm.encode_chat(p.text)))
               for p in prompt_pool(data_dir, "eval", per_category=per_category, include_extra=False)]
    records = run_bench(Decoder(lm, max_draft_len=8), prompts, configs, max_new_tokens=max_new_tokens)
    print(format_summary(summarize(records)))


if __name__ == "__main__":  # python -m lede.eval.kernel_bench [--end-to-end]
    import argparse

    ap = argparse.ArgumentParser(description="lede's CPU kernels against torch's, on this machine")
    ap.add_argument("--end-to-end", action="store_true", help="greedy generation on Spec-Bench prompts, not passes")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.end_to_end:
        _end_to_end(a.data_dir, a.per_category, a.max_new_tokens, a.threads)
    else:
        _benchmark(threads=a.threads)
