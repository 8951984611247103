# Stage 0 (issue 7, optional; on by config early_exit.enabled): an early-exit-trained variant of the base
# model by self-distillation. Every later stage then runs on the variant ("<model>-ee").


rule early_exit_data:
    """The BASE model's greedy continuations of the {split} prompts (the same prompts as distill_data):
    the teacher data of the variant (train) and the reference for its quality cost (eval)."""
    input:
        code=src("data", "core.model", "drafters.distill"),
    output:
        data=f"{R}/early_exit/teacher_{{split}}.pt",
    params:
        **common_params(base=True),
        data_dir=config["data_dir"],
        prompts=lambda wc: EXITS[wc.split],
        batch_size=EXITS["train"]["batch_size"],
    wildcard_constraints:
        split="train|eval",
    threads: config["threads"]
    log:
        f"{R}/early_exit/teacher_{{split}}.log",
    benchmark:
        f"{R}/early_exit/teacher_{{split}}.benchmark.tsv"
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/early_exit_data.py"


rule early_exit:
    """Train the variant's low-rank deltas (or full weights) toward the base model at the exits and the
    final layer; checkpointed and resumable (rerun the rule after an interruption)."""
    input:
        data=expand(rules.early_exit_data.output.data, split="train")[0],
        code=src("drafters.early_exit", "core.model", "drafters.distill"),
    output:
        weights=EE_WEIGHTS,
    params:
        **common_params(base=True),
        recipe={k: v for k, v in EE.items() if k not in ("enabled", "budget_minutes", "checkpoint_every", "bench_draft_lens", "quality")},
        budget_minutes=EE["budget_minutes"],
        checkpoint_every=EE["checkpoint_every"],
        checkpoint=f"{R}/early_exit/train.ckpt",
    threads: config["threads"]
    log:
        f"{R}/early_exit/train.log",
    benchmark:
        f"{R}/early_exit/train.benchmark.tsv"
    resources:
        gpu=1 if config["device"].startswith("cuda") else 0,
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/train_early_exit.py"


rule early_exit_report:
    """Base vs variant on the evaluation prompts: per-layer exit agreement with each model's own greedy
    tokens, and the variant's agreement with the base model's greedy tokens (its quality cost)."""
    input:
        weights=EE_WEIGHTS,
        teacher=expand(rules.early_exit_data.output.data, split="eval")[0],
        train=expand(rules.early_exit_data.output.data, split="train")[0],  # the generalisation gap: the same measure on training sequences
        code=src("drafters.early_exit", "core.model", "drafters.distill"),
    output:
        json=f"{R}/early_exit/report.json",
        md=report(f"{R}/early_exit/report.md", caption="../report/early_exit.rst", category="Early-exit variant"),
    params:
        **common_params(base=True),
        layers=LAYERS,
        vocab_size=EXITS["vocab_size"],
        max_new_tokens=EXITS["eval"]["max_new_tokens"],
        batch_size=EXITS["train"]["batch_size"],
    threads: config["threads"]
    log:
        f"{R}/early_exit/report.log",
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/early_exit_report.py"


rule early_exit_bench:
    """The variant's static (exit layer, draft length) grid against plain decoding of the same variant and
    prompt lookup, interleaved, on held-out prompts (median per-prompt ratios, overall and per category)."""
    input:
        weights=EE_WEIGHTS,
        code=src("eval.bench", "core.engine", "core.exits", "core.policy", "data", "core.model", "drafters.early_exit", "core.compiled"),
    output:
        json=f"{R}/early_exit/bench.json",
        md=report(f"{R}/early_exit/bench.md", caption="../report/early_exit_bench.rst", category="Early-exit variant"),
    params:
        **common_params(),
        **timed_params(EE["exit_layers"]),
        data_dir=config["data_dir"],
        exit_layers=EE["exit_layers"],
        draft_lens=EE["bench_draft_lens"],
        per_category=config["bench"]["per_category"],
        max_new_tokens=config["bench"]["max_new_tokens"],
    threads: config["threads"]
    log:
        f"{R}/early_exit/bench.log",
    benchmark:
        f"{R}/early_exit/bench.benchmark.tsv"
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/early_exit_bench.py"


rule early_exit_quality:
    """What the fine-tuning costs: plain decoding of the base model and of the variant on lm-eval tasks of
    the offline suite (metric differences with paired bootstrap intervals, output identity)."""
    input:
        weights=EE_WEIGHTS,
        code=src("eval.parity", "eval.lm_eval_model", "core.model", "drafters.early_exit", "core.engine"),
    output:
        md=report(f"{R}/early_exit/quality/parity.md", caption="../report/early_exit_quality.rst",
                  category="Early-exit variant"),
        csv=f"{R}/early_exit/quality/parity.csv",
    params:
        **common_params(base=True),
        data_dir=config["data_dir"],
        tasks=EE["quality"]["tasks"],
        limit=EE["quality"]["limit"],
        max_gen_toks=EE["quality"]["max_gen_toks"],
    threads: config["threads"]
    log:
        f"{R}/early_exit/quality.log",
    benchmark:
        f"{R}/early_exit/quality.benchmark.tsv"
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/early_exit_quality.py"
