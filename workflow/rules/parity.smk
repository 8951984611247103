# Stage 6 (quality): every method against plain decoding on the offline lm-eval suite (issue 5). One job:
# the model is loaded once and plain decoding runs first, then each method; the report lists every
# output that differs from plain decoding with the full model's top-2 margin where it first differs.
PARITY = config["parity"]


rule parity:
    input:
        model_files=MODEL_FILES,
        heads=HEADS,
        adapters=expand(f"{R}/exits/adapters/L{{layer}}_{{design}}.pt", layer=LAYERS, design=DESIGNS),
        policies=(expand(f"{R}/rl/policy_{{algo}}_s{{seed}}.pt", algo=POLICY["algos"], seed=POLICY["seeds"])
                  if "lede" in PARITY["methods"] else []),
        code=src("parity", "lm_eval_model", "sandbox", "rl", "features", "heuristics", "engine", "policy", "model"),
        tasks=sorted(str(p) for p in Path("src/lede/tasks").iterdir() if p.suffix in (".py", ".yaml")),
    output:
        md=report(f"{R}/parity/parity.md", caption="../report/parity.rst", category="Quality"),
        csv=f"{R}/parity/parity.csv",
        diffs=f"{R}/parity/differences.csv",
    params:
        **common_params(),
        data_dir=config["data_dir"],
        layers=LAYERS,
        max_draft_len=POLICY["max_draft_len"],
        parity=PARITY,
    threads: config["threads"]
    log:
        f"{R}/parity/parity.log",
    benchmark:
        f"{R}/parity/parity.benchmark.tsv"
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/parity.py"
