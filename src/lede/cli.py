"""Command line: ``lede generate`` and ``lede bench``.

    lede generate --model smollm2-135m --prompt "Why is the sky blue?" --exit-layer 8 --draft-len 4
    lede generate --model smollm2-135m --prompt "Why is the sky blue?" --autoregressive
    lede bench --model smollm2-135m --data-dir ../shared/data --per-category 2 --configs 8:4,20:2,hf
    lede bench --prompt-file my_prompts.jsonl --configs 12:3 --out results/bench.json
    lede bench --exit-heads results/exits/selected.json --configs 2:1,lede=results/rl/policy_DiscreteCQL_s0.pt
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from lede.core.kernels import KERNEL_OPTIONS


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias smollm2-135m, a local path or a Hugging Face id")
    p.add_argument("--early-exit-weights", metavar="FILE",
                   help="an early-exit artefact (snakemake early_exit) merged into the model: the -ee variant")
    p.add_argument("--model-cache", metavar="DIR", default="resources/models",
                   help="where the GGUF alias is converted once (then loads in ~1 s); '' for none")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed, and recorded, for benchmarks)")
    p.add_argument("--kernels", choices=KERNEL_OPTIONS, default="auto",
                   help="CPU float32 linear kernels: auto (default) times lede's and torch's at load and keeps the faster per pass width; lede or torch fix them (src/lede/kernels.py)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-draft-len", type=int, default=16, help="the loop's hard cap on drafted tokens per round")


def _parse_configs(spec: str):
    """'8:4,lookup:3,hf,cql=file:results/rl/policy_DiscreteCQL_s0.pt' -> {None-or-name: ...}: [(None, PolicySpec
    static:8:4), ..., ('hf_generate', 'hf_generate'), ('cql', PolicySpec file:...)]: policies in the one grammar
    (``lede.rl.spec``), each optionally named NAME=SPEC (NAME=PATH of an existing file is file:PATH; unnamed ones
    are called by the policy's own name), and transformers' two baselines."""
    from lede.eval.bench import HF_GENERATE, HF_PROMPT_LOOKUP
    from lede.rl.spec import PolicySpec, PolicySpecError

    out: list = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item in ("hf", HF_GENERATE):
            out.append((HF_GENERATE, HF_GENERATE))
            continue
        if item in ("pld", HF_PROMPT_LOOKUP):
            out.append((HF_PROMPT_LOOKUP, HF_PROMPT_LOOKUP))
            continue
        name, _, text = item.rpartition("=")
        if name and ":" not in text and (Path(text).suffix == ".pt" or Path(text).is_file()):
            if not Path(text).is_file():
                raise SystemExit(f"error: bad --configs item {item!r}: {text} is not an existing policy file (NAME=PATH; "
                                 "train one with the workflow's train_policy rule)")
            text = f"file:{text}"
        try:
            out.append((name.strip() or None, PolicySpec.parse(text)))
        except PolicySpecError as err:
            raise SystemExit(f"error: bad --configs item {item!r}: {err} (or 'hf', 'pld')")
    return out


def cmd_generate(args) -> int:
    from lede.core.engine import Decoder, Sampling
    from lede.drafters.loading import load_model

    if not args.prompt or not args.prompt.strip():
        raise SystemExit("error: empty prompt: pass --prompt 'some text'")
    from lede.rl.spec import PolicyContext, PolicySpec, PolicySpecError

    if args.policy:
        text = args.policy
    elif args.autoregressive:
        text = "plain"
    elif args.exit_layer is not None and args.draft_len is not None:
        text = f"static:{args.exit_layer}:{args.draft_len}"
    else:
        raise SystemExit("error: pass --policy SPEC, --exit-layer and --draft-len, or --autoregressive for plain decoding")
    try:
        spec = PolicySpec.parse(text)  # before the model loads
    except PolicySpecError as err:
        raise SystemExit(f"error: {err}")
    lm = load_model(args.model, dtype=args.dtype, device=args.device, early_exit_weights=args.early_exit_weights,
                    cache_dir=args.model_cache or None, kernels=args.kernels)
    policy = spec.build(PolicyContext(lm.num_layers, args.max_draft_len, lm.name))
    dec = Decoder(lm, max_draft_len=args.max_draft_len)
    ids = lm.encode_chat(args.prompt) if not args.raw else lm.tokenizer(args.prompt)["input_ids"]
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    out = dec.generate(ids, policy, max_new_tokens=args.max_new_tokens, sampling=sampling)
    print(out.text)
    print(
        f"[{policy.name}] {out.new_tokens} tokens in {out.wall_s:.2f} s = {out.tokens_per_s:.2f} tok/s, "
        f"{len(out.rounds)} rounds, mean accepted length {out.mean_accepted:.2f}, finish={out.finish_reason}",
        file=sys.stderr,
    )
    return 0


def cmd_bench(args) -> int:
    from lede.eval.bench import BenchPrompt, format_summary, run_bench, summarize, write_json
    from lede.data import DEFAULT_DATA_DIR, load_prompt_file, prompt_pool
    from lede.core.engine import Decoder
    from lede.drafters.loading import load_model

    configs = _parse_configs(args.configs)
    if args.prompt_file:
        prompts = load_prompt_file(args.prompt_file)
    else:
        cats = args.categories.split(",") if args.categories else None
        prompts = prompt_pool(args.data_dir or DEFAULT_DATA_DIR, args.split, categories=cats, per_category=args.per_category,
                              include_extra=False)
    lm = load_model(args.model, dtype=args.dtype, device=args.device, early_exit_weights=args.early_exit_weights,
                    cache_dir=args.model_cache or None, kernels=args.kernels)
    heads = {}
    if args.exit_heads:  # the selection file of the workflow's exit_report (adapters + draft vocabulary)
        from lede.core.exits import load_exit_heads

        heads = load_exit_heads(lm, args.exit_heads)
    dec = Decoder(lm, exit_heads=heads, max_draft_len=args.max_draft_len)
    from lede.core.policy import LOOKUP
    from lede.rl.spec import PolicyContext

    policies: dict = {}
    for name, spec in configs:  # fail before any timing, not in the middle of it
        if isinstance(spec, str):  # transformers' generate / prompt lookup
            policies[name] = spec
            continue
        layers = None
        if spec.kind == "file":
            from lede.rl.offline import RLPolicy

            if not heads:
                raise SystemExit(f"error: --configs {name}={spec.text} is a learned policy: pass --exit-heads with "
                                 "the selection file its exit heads came from (results/exits/selected.json)")
            blob_layers = RLPolicy.load(spec.path, lm_name=lm.name).space.exit_layers  # prompt lookup (0) may be one
            layers = [LOOKUP] * (LOOKUP in blob_layers) + sorted(heads)
        policy = spec.build(PolicyContext(lm.num_layers, args.max_draft_len, lm.name, layers))
        if name:
            policy.name = name
        policies[name or policy.name] = policy
    bench_prompts = [BenchPrompt(p.uid, p.category, tuple(lm.encode_chat(p.text))) for p in prompts]
    records = run_bench(dec, bench_prompts, policies, max_new_tokens=args.max_new_tokens,
                        repeats=args.repeats, warmup=args.warmup)
    overall = summarize(records)
    per_cat = summarize(records, group=lambda r: r.category)
    print(f"model={lm.name} dtype={lm.dtype} device={lm.device} threads={torch.get_num_threads()} "
          f"kernels=({lm.kernels}) prompts={len(prompts)} max_new_tokens={args.max_new_tokens} repeats={args.repeats}")
    print(format_summary(overall))
    if len(per_cat) > 1:
        print(format_summary(per_cat))
    if args.out:
        write_json(args.out, {
            "settings": {k: v for k, v in vars(args).items() if k != "func"}
            | {"torch_threads": torch.get_num_threads(), "dtype_resolved": str(lm.dtype), "kernels": lm.kernels},
            "summary": {g: [asdict(s) for s in rows] for g, rows in (overall | per_cat).items()},
            "records": [asdict(r) for r in records],
        })
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lede", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with plain or self-speculative decoding")
    _common(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--policy", help="a policy in the one grammar: plain, static:L:K, lookup:K, adaptive:L[:K0], "
                                    "confidence:L:T (see lede.rl.spec); --exit-layer/--draft-len/--autoregressive "
                                    "are the same as static:L:K / plain")
    g.add_argument("--exit-layer", type=int)
    g.add_argument("--draft-len", type=int)
    g.add_argument("--autoregressive", action="store_true", help="plain decoding (no drafts)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="interleaved speed benchmark of plain decoding vs static configurations")
    _common(b)
    b.add_argument("--configs", default="8:4", help="comma-separated EXIT_LAYER:DRAFT_LEN (0:K: the engine's "
                   "prompt lookup, K tokens at most), 'hf' (transformers' generate), 'pld' (transformers' prompt "
                   "lookup), NAME=POLICY_FILE (a learned LEDE policy; needs --exit-heads)")
    b.add_argument("--exit-heads", help="selection file (results/exits/selected.json): exit adapters + draft vocabulary")
    b.add_argument("--prompt-file", help="JSONL with 'prompt' or 'turns' per line (instead of the data dir)")
    b.add_argument("--data-dir", default=None, help="folder with spec_bench/, gsm8k/, nq_open/ (default: the repository's data/)")
    b.add_argument("--split", default="eval", choices=["train", "eval"])
    b.add_argument("--categories", default="", help="comma-separated categories (default: all Spec-Bench)")
    b.add_argument("--per-category", type=int, default=2)
    b.add_argument("--repeats", type=int, default=1)
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--out", help="write records and summary as JSON here")
    b.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads={args.threads} must be >= 1")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except ValueError as err:  # our input errors (ModelError, DataError, ...) carry the fix in the message
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
