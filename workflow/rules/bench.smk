# Stage 5 (speed part): plain decoding, transformers' generate and the best static cells, measured
# interleaved with the real engine on held-out prompts.


rule bench_eval:
    input:
        model_files=MODEL_FILES,
        selected=rules.exit_report.output.selected,
        best=rules.exit_report.output.best,
        costs=rules.cost_model.output.costs,
        adapters=ADAPTERS,
        vocab=DISTILL["train"],
        code=src("eval.bench", "core.engine", "core.exits", "core.policy", "data", "core.model", "core.compiled"),
    output:
        json=f"{R}/bench/eval.json",
        md=report(f"{R}/bench/eval.md", caption="../report/bench.rst", category="Speed"),
    params:
        **common_params(),
        **timed_params(LAYERS),
        data_dir=config["data_dir"],
        per_category=config["bench"]["per_category"],
        max_new_tokens=config["bench"]["max_new_tokens"],
    threads: config["threads"]
    log:
        f"{R}/bench/eval.log",
    benchmark:
        f"{R}/bench/eval.benchmark.tsv"
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/bench_eval.py"
