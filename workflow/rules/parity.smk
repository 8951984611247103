# Stage 6 (quality): every method against plain decoding on the offline lm-eval suite (issue 5). One job per
# method (plain decoding needs no exit heads or policy, so it runs as soon as the model is there; adding a
# method reruns only that method), then one job that compares them: metric differences with paired
# bootstrap intervals, output identity, and every differing output with the full model's top-2 margin.
rule parity_method:
    input:
        unpack(parity_method_inputs),
        model_files=MODEL_FILES,
        code=PARITY_CODE,
    output:
        **{f.split("_")[0]: f"{R}/parity/{f}" for f in PARITY_FILES},  # results, samples, speed
    params:
        **common_params(),
        data_dir=config["data_dir"],
        layers=DRAFTERS,
        max_draft_len=POLICY["max_draft_len"],
        parity=PARITY,
    wildcard_constraints:
        method="|".join(PARITY_METHODS),
    threads: config["threads"]
    resources:
        gpu=0,
    log:
        f"{R}/parity/{{method}}.log",
    benchmark:
        f"{R}/parity/{{method}}.benchmark.tsv"
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/parity_method.py"


rule parity:
    input:
        model_files=MODEL_FILES,
        runs=[expand(out, method=PARITY_METHODS) for out in rules.parity_method.output],
        code=src("eval.parity", "core.model"),
    output:
        md=report(f"{R}/parity/parity.md", caption="../report/parity.rst", category="Quality"),
        csv=f"{R}/parity/parity.csv",
        diffs=f"{R}/parity/differences.csv",
    params:
        **common_params(),
        methods=PARITY_METHODS,
    threads: config["threads"]
    log:
        f"{R}/parity/parity.log",
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/parity.py"
