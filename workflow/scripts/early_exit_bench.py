"""Rule early_exit_bench: the early-exit variant's static (L, K) grid against plain decoding of the same
variant, interleaved, on held-out Spec-Bench prompts (plain exit heads over the variant's draft vocabulary)."""


from lede.study import bench_journal, eval_bench_prompts, load_lm, setup, write_bench

p = setup(snakemake)  # noqa: F821
from lede.eval.bench import HF_PROMPT_LOOKUP, run_bench  # noqa: E402
from lede.core.engine import Decoder  # noqa: E402
from lede.core.policy import Static  # noqa: E402

lm = load_lm(p)
dec = Decoder(lm, max_draft_len=max(p.draft_lens))
prompts = eval_bench_prompts(p, lm)
configs = {HF_PROMPT_LOOKUP: HF_PROMPT_LOOKUP}
for layer in p.exit_layers:
    for k in p.draft_lens:
        policy = Static(layer, k)
        configs[policy.name] = policy
journal = bench_journal(snakemake, snakemake.output.json)  # noqa: F821  (an interrupted run resumes)
journal.begin(**journal.kernels(lm))  # a resumed run re-applies the kernels `auto` chose first
records = run_bench(dec, prompts, configs, max_new_tokens=p.max_new_tokens, journal=journal)
write_bench(p, lm, records, len(prompts), snakemake.output,  # noqa: F821
            f"Static grid on the early-exit variant {lm.name}", {"grid": {"exit_layers": p.exit_layers,
                                                                          "draft_lens": p.draft_lens}})
journal.finish()
