"""Command line: ``lede generate``, ``lede bench`` and ``lede costs``.

Every mistake in the input (a bad value, a missing or malformed file, an unknown model) ends with one line on
stderr, ``lede: error: <what is wrong and the fix>``, and exit status 2 (argparse's own), and the values and
files are checked before the model loads.

Policies are named in the project's one grammar (``lede.rl.spec``): plain, static:L:K (or L:K), lookup:K,
adaptive:L[:K0], confidence:L:T, dynamic, file:PATH, floor:SPEC, correct:file:PATH.

    lede generate --model smollm2-135m --prompt "Why is the sky blue?" --policy static:8:4
    lede generate --model smollm2-135m --prompt "Why is the sky blue?" --autoregressive
    lede bench --model smollm2-135m --per-category 2 --configs static:8:4,lookup:3,hf
    lede bench --prompt-file my_prompts.jsonl --configs 12:3 --out results/bench.json
    lede bench --exit-heads results/exits/selected.json --configs 2:1,lede=file:results/rl/policy_DiscreteCQL_s0.pt
    lede costs --json results/floor.json     # read bandwidth, the floor of a pass, T = 1..9 tokens per kernel
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lede.core.kernels import KERNEL_OPTIONS


EXIT_USAGE = 2  # every input error: argparse's code


class CLIError(ValueError):
    """A bad command-line value; the message names it and the fix."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one line every other input error gets (no usage block)."""

    def error(self, message: str):
        print(f"lede: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename and not isinstance(err, (json.JSONDecodeError,)):
        text = f"{err.strerror or err.__class__.__name__}: {err.filename}"
    else:
        text = str(err) or err.__class__.__name__
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return " ".join(lines)[:600] if lines else err.__class__.__name__


def _existing_file(value: str | None, option: str, fix: str) -> None:
    if value and not Path(value).is_file():
        raise CLIError(f"{option} {value}: no such file: {fix}")


def _check_args(args) -> None:
    """Every check that needs no model: values, files, the model spec, the device. Runs before the model loads."""
    from lede.core.model import resolve_device, resolve_dtype

    for name, low in (("threads", 1), ("max_new_tokens", 1), ("max_draft_len", 1)):
        if getattr(args, name) < low:
            raise CLIError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= {low}")
    dev = str(args.device)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {dev}: CUDA is not available on this machine: use --device cpu or auto")
    try:
        resolve_dtype(args.dtype, resolve_device(args.device))
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"--device {dev} / --dtype {args.dtype}: {_one_line(err)}") from None
    _existing_file(args.early_exit_weights, "--early-exit-weights", "train it with `snakemake early_exit` or fix the path")
    if args.early_exit_weights:
        from lede.drafters.early_exit import read_early_exit

        read_early_exit(args.early_exit_weights)
    from lede.core.model import check_model_spec

    check_model_spec(args.model[: -len("-ee")] if args.model.endswith("-ee") and not Path(args.model).exists()
                     else args.model, args.model_cache or None)
    if args.command == "generate":
        if not args.prompt or not args.prompt.strip():
            raise CLIError("empty prompt: pass --prompt 'some text'")
        if not math.isfinite(args.temperature) or args.temperature < 0:
            raise CLIError(f"--temperature={args.temperature} must be a finite number >= 0 (0 = greedy)")
        if not math.isfinite(args.top_p) or not 0 < args.top_p <= 1:
            raise CLIError(f"--top-p={args.top_p} must be in (0, 1]")
        args.policy_spec = _generate_spec(args)
        if args.policy_spec.draft_len is not None and args.policy_spec.draft_len > args.max_draft_len:
            raise CLIError(f"policy {args.policy_spec.text!r}: draft length {args.policy_spec.draft_len} exceeds "
                           f"--max-draft-len={args.max_draft_len}: lower it or raise --max-draft-len")
    elif args.command == "costs":
        args.context_list = _int_list(args.contexts, "--contexts", 1)
        args.token_list = _int_list(args.tokens, "--tokens", 1)
        for name, low in (("repeats", 1), ("bandwidth_mb", 64), ("decode_prompts", 0), ("flip_positions", 0)):
            if getattr(args, name) < low:
                raise CLIError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= {low}")
        if (args.decode_prompts or args.flip_positions) and args.data_dir and not Path(args.data_dir).is_dir():
            raise CLIError(f"--data-dir {args.data_dir}: no such folder: pass the folder with spec_bench/ or leave it out")
    else:
        for name, low in (("per_category", 1), ("repeats", 1), ("warmup", 0)):
            if getattr(args, name) < low:
                raise CLIError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= {low}")
        _existing_file(args.prompt_file, "--prompt-file", "pass a JSONL file with 'prompt' or 'turns' per line")
        if args.data_dir and not Path(args.data_dir).is_dir():
            raise CLIError(f"--data-dir {args.data_dir}: no such folder: pass the folder with spec_bench/, gsm8k/, "
                           "nq_open/ or leave it out (the repository's data/)")
        if args.exit_heads:
            from lede.core.exits import read_selection

            read_selection(args.exit_heads, check_adapters=True)
        _existing_file(args.costs, "--costs", "pass the workflow's cost model (results/costs.json)")
        if args.costs and not args.exit_heads:
            raise CLIError("--costs prices the exit heads of a selection: pass --exit-heads (results/exits/selected.json)")
        args.parsed_configs = _parse_configs(args.configs)
        for name, spec in args.parsed_configs:
            if not isinstance(spec, str) and spec.kind in ("floor", "correct", "dynamic") and not args.costs:
                raise CLIError(f"--configs {name or spec.text} prices rounds with the cost model: pass --costs "
                               "results/costs.json and --exit-heads results/exits/selected.json")
            if not isinstance(spec, str):
                spec = spec.base
            if not isinstance(spec, str) and spec.kind == "file":
                from lede.rl.offline import RLPolicy

                _existing_file(str(spec.path), f"--configs {spec.text}", "train one with the workflow's train_policy rule")
                RLPolicy.load(spec.path)  # a file that is not a policy fails here, before the model loads
                if not args.exit_heads:
                    raise CLIError(f"--configs {name or spec.text} is a learned policy: pass --exit-heads with the "
                                   "selection file its exit heads came from (results/exits/selected.json)")


def _int_list(text: str, option: str, low: int) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{option} {text!r}: expected comma-separated integers, e.g. 256,2048") from None
    if not values or min(values) < low or len(set(values)) != len(values):
        raise CLIError(f"{option} {text!r}: expected distinct integers >= {low}")
    return values


def _generate_spec(args):
    """The policy of ``lede generate``: --policy SPEC, else --autoregressive (plain), else --exit-layer/--draft-len
    (static:L:K), parsed by the one grammar before the model loads."""
    from lede.rl.spec import PolicySpec

    if args.policy:
        text = args.policy
    elif args.autoregressive:
        text = "plain"
    elif args.exit_layer is not None and args.draft_len is not None:
        text = f"static:{args.exit_layer}:{args.draft_len}"
    else:
        raise CLIError("pass --policy SPEC (e.g. static:8:4, lookup:3), --exit-layer and --draft-len, "
                       "or --autoregressive for plain decoding")
    return PolicySpec.parse(text)


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
                   help="CPU float32 linear kernels: auto (default) times each at load and keeps oneDNN's unless another is "
                        "faster by over 10%% per pass width; onednn, lede or torch fix them (src/lede/core/kernels.py)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decoder layers with TorchInductor at load (src/lede/core/compiled.py; minutes on "
                        "a small CPU, needs a C++ compiler); drafts from exit layers stay eager")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-draft-len", type=int, default=16, help="the loop's hard cap on drafted tokens per round")


def _parse_configs(spec: str) -> list:
    """'8:4,lookup:3,hf,cql=file:results/rl/policy_DiscreteCQL_s0.pt' -> [(None, PolicySpec static:8:4), ...,
    ('hf_generate', 'hf_generate'), ('cql', PolicySpec file:...)]: policies in the one grammar (``lede.rl.spec``),
    each optionally named NAME=SPEC (NAME=PATH of a policy file is file:PATH; an unnamed policy is called by its own
    name), and transformers' two baselines ('hf': generate, 'pld': its prompt lookup)."""
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
            _existing_file(text, f"--configs {item}", "NAME=PATH needs an existing policy file (train one with the "
                           "workflow's train_policy rule)")
            text = f"file:{text}"
        try:
            out.append((name.strip() or None, PolicySpec.parse(text)))
        except PolicySpecError as err:
            raise CLIError(f"bad --configs item {item!r}: {err} (or 'hf', 'pld')") from None
    return out


def cmd_generate(args) -> int:
    from lede.core.engine import Decoder, Sampling
    from lede.drafters.loading import load_model
    from lede.rl.spec import PolicyContext

    spec = getattr(args, "policy_spec", None) or _generate_spec(args)
    lm = load_model(args.model, dtype=args.dtype, device=args.device, early_exit_weights=args.early_exit_weights,
                    cache_dir=args.model_cache or None, kernels=args.kernels,
                    compiled=args.compile)
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

    configs = getattr(args, "parsed_configs", None) or _parse_configs(args.configs)
    if args.prompt_file:
        prompts = load_prompt_file(args.prompt_file)
    else:
        cats = args.categories.split(",") if args.categories else None
        prompts = prompt_pool(args.data_dir or DEFAULT_DATA_DIR, args.split, categories=cats, per_category=args.per_category,
                              include_extra=False)
    lm = load_model(args.model, dtype=args.dtype, device=args.device, early_exit_weights=args.early_exit_weights,
                    cache_dir=args.model_cache or None, kernels=args.kernels,
                    compiled=args.compile)
    heads = {}
    if args.exit_heads:  # the selection file of the workflow's exit_report (adapters + draft vocabulary)
        from lede.core.exits import load_exit_heads

        heads = load_exit_heads(lm, args.exit_heads)
    dec = Decoder(lm, exit_heads=heads, max_draft_len=args.max_draft_len)
    costs = None
    if args.costs:  # the cost model, each layer priced as its selected head: dynamic exit and the online floor
        from lede.core.exits import selected_costs

        costs = selected_costs(args.costs, args.exit_heads)
    from lede.core.policy import LOOKUP
    from lede.rl.spec import PolicyContext

    policies: dict = {}
    for name, spec in configs:  # fail before any timing, not in the middle of it
        if isinstance(spec, str):  # transformers' generate / prompt lookup
            policies[name] = spec
            continue
        layers = sorted(heads) if spec.base.kind == "dynamic" else None
        if spec.base.kind == "file":
            from lede.rl.offline import RLPolicy

            if not heads:
                raise CLIError(f"--configs {name or spec.text} is a learned policy: pass --exit-heads with the "
                               "selection file its exit heads came from (results/exits/selected.json)")
            path = spec.base.path
            blob_layers = RLPolicy.load(path, lm_name=lm.name).space.exit_layers  # prompt lookup (0) may be one
            layers = [LOOKUP] * (LOOKUP in blob_layers) + sorted(heads)
        policy = spec.build(PolicyContext(lm.num_layers, args.max_draft_len, lm.name, layers, costs))
        if name:
            policy.name = name
        policies[name or policy.name] = policy
    bench_prompts = [BenchPrompt(p.uid, p.category, tuple(lm.encode_chat(p.messages))) for p in prompts]
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


def cmd_costs(args) -> int:
    from lede.data import DEFAULT_DATA_DIR, prompt_pool
    from lede.drafters.loading import load_model
    from lede.eval.bench import BenchPrompt, write_json
    from lede.eval.cost_probe import plain_decoding_by_kernel, probe_floor, width_agreement

    start = time.perf_counter()
    lm = load_model(args.model, dtype=args.dtype, device=args.device, early_exit_weights=args.early_exit_weights,
                    cache_dir=args.model_cache or None, kernels=args.kernels,
                    compiled=args.compile)
    load_s = time.perf_counter() - start  # with the kernels' timing (auto), the fused weights and oneDNN's packing
    limit = lm.model.config.max_position_embeddings
    if max(args.context_list) + max(args.token_list) > limit:
        raise CLIError(f"--contexts {args.contexts}: {max(args.context_list)} + {max(args.token_list)} tokens exceed "
                       f"the model's {limit} positions: lower --contexts")
    decode_prompts = []
    if args.decode_prompts:  # chosen, and checked against the model's positions, before any timing
        pool = prompt_pool(args.data_dir or DEFAULT_DATA_DIR, "eval", per_category=1, include_extra=False)
        encoded = [BenchPrompt(p.uid, p.category, tuple(lm.encode_chat(p.text))) for p in pool]
        decode_prompts = [p for p in encoded if len(p.ids) + args.max_new_tokens <= limit][: args.decode_prompts]
        if not decode_prompts:
            raise CLIError(f"no evaluation prompt fits the model's {limit} positions with --max-new-tokens="
                           f"{args.max_new_tokens}: lower it or pass --decode-prompts 0")
    probe = probe_floor(lm, args.context_list, args.token_list, repeats=args.repeats, bandwidth_mb=args.bandwidth_mb)
    if decode_prompts:
        probe.decode = plain_decoding_by_kernel(lm, decode_prompts, max_new_tokens=args.max_new_tokens)
    if args.flip_positions:  # the evaluation prompts' tokens, one after another, teacher-forced
        pool = prompt_pool(args.data_dir or DEFAULT_DATA_DIR, "eval", per_category=2, include_extra=False)
        stream = [t for p in pool for t in lm.encode_chat(p.text)][: min(limit - 16, 32 + args.flip_positions)]
        probe.widths = width_agreement(lm, stream, prefix=32, widths=(5, 9))
    print(probe.format())
    layers = lm.fast_layers
    compiled = {}
    if layers is not None and layers.eager is not layers:  # lede.core.compiled.CompiledLayers
        compiled = {"compile_s": round(layers.compile_s, 1), "graphs": layers.graphs,
                    "recompilations": layers.recompilations}
    print(f"model load with kernel choice, fused weights and packing: {load_s:.1f} s "
          + (f"(of which TorchInductor compilation {layers.compile_s:.0f} s, {layers.graphs} graphs; "
             f"{layers.recompilations} recompilations since)" if compiled else "(no compilation)"))
    if args.json:
        write_json(args.json, probe.to_json() | {"load_s": round(load_s, 2)} | compiled)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="lede", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with plain or self-speculative decoding")
    _common(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--policy", help="a policy in the one grammar: plain, static:L:K, lookup:K, adaptive:L[:K0], "
                                    "confidence:L:T (lede.rl.spec); --exit-layer/--draft-len and --autoregressive "
                                    "are static:L:K and plain")
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
    b.add_argument("--configs", default="static:8:4", help="comma-separated policies in the one grammar "
                   "(static:L:K or L:K, lookup:K, adaptive:L[:K0], confidence:L:T, file:PATH), each optionally "
                   "NAME=SPEC; 'hf' (transformers' generate), 'pld' (transformers' prompt lookup); a learned policy "
                   "(file:PATH or NAME=PATH) needs --exit-heads")
    b.add_argument("--exit-heads", help="selection file (results/exits/selected.json): exit adapters + draft vocabulary")
    b.add_argument("--prompt-file", help="JSONL with 'prompt', 'turns' or a 'messages' chat per line (instead of the "
                   "data dir)")
    b.add_argument("--costs", help="the cost model (results/costs.json) for the policies that price rounds: dynamic, "
                   "floor:SPEC, correct:file:PATH; with --exit-heads")
    b.add_argument("--data-dir", default=None, help="folder with spec_bench/, gsm8k/, nq_open/ (default: the repository's data/)")
    b.add_argument("--split", default="eval", choices=["train", "eval"])
    b.add_argument("--categories", default="", help="comma-separated categories (default: all Spec-Bench)")
    b.add_argument("--per-category", type=int, default=2)
    b.add_argument("--repeats", type=int, default=1)
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--out", help="write records and summary as JSON here")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("costs", help="the memory floor of a decoding pass, and passes of T tokens per linear kernel")
    _common(c)
    c.add_argument("--contexts", default="256,2048", help="cached tokens before the timed pass, comma-separated")
    c.add_argument("--tokens", default="1,2,3,5,9", help="tokens per timed pass, comma-separated")
    c.add_argument("--repeats", type=int, default=7, help="timed passes per item (interleaved; median)")
    c.add_argument("--bandwidth-mb", type=int, default=2048, help="buffer of the read-bandwidth probe (> the caches)")
    c.add_argument("--decode-prompts", type=int, default=3,
                   help="also plain decoding per kernel and transformers' generate on this many prompts (0: skip)")
    c.add_argument("--flip-positions", type=int, default=256,
                   help="teacher-forced positions at which 1-token and 5-/9-token passes are compared (0: skip)")
    c.add_argument("--data-dir", default=None, help="folder with spec_bench/ (default: the repository's data/)")
    c.add_argument("--json", metavar="FILE", help="write the probe as JSON here")
    c.set_defaults(func=cmd_costs, max_new_tokens=64)

    args = parser.parse_args(argv)
    from lede.eval.sandbox import SandboxError

    try:
        _check_args(args)
        torch.set_num_threads(args.threads)
        return args.func(args)
    except (ValueError, OSError, SandboxError) as err:
        # the project's errors (ModelError, DataError, PolicyError, AdapterError, ArtefactError, ... are
        # ValueErrors), our value checks, missing or unreadable files: one line, one exit status
        print(f"lede: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
