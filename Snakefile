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
        f"{R}/exits/report.md",
        f"{R}/sweep/best_static.json",
        f"{R}/bench/eval.md",
        f"{R}/eval/summary.md",
        f"{R}/rl/replay_eval.md",
        f"{R}/parity/parity.md",
        NOTEBOOK_OUTPUTS,
        [f"{R}/early_exit/{f}.md" for f in ("report", "bench", "quality/parity")] if EE["enabled"] else [],
