# lede: the reproducible study. Run `snakemake --cores all` (see README); `--configfile .test/config.yaml`
# for the tiny CI run. Every generated file goes under config["results_dir"] (default results/).
configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/early_exit.smk"
include: "workflow/rules/exits.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/policy.smk"
include: "workflow/rules/parity.smk"
include: "workflow/rules/notebooks.smk"


rule all:
    default_target: True
    input:
        rules.exit_report.output.md,
        rules.exit_report.output.best,
        rules.bench_eval.output.md,
        rules.evaluate.output.md,
        rules.replay_eval.output.md,
        rules.parity.output.md,
        NOTEBOOK_OUTPUTS,
        [rules.early_exit_report.output.md, rules.early_exit_bench.output.md, rules.early_exit_quality.output.md]
        if EE["enabled"] else [],
