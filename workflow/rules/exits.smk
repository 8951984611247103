# Stage 1: make the model draftable (exit adapters by self-distillation) and measure the cost model.


rule distill_data:
    """The model's own greedy continuations of the {split} prompts, teacher-forced, with the hidden
    state after every candidate exit layer (split=train: and exits.train.samples sampled continuations of each
    prompt, more text for the adapters). split=train: the adapters' distillation prompts (training
    half + GSM8K train + NQ-open); split=dev: the policy's prompts, training prompts never distilled on
    (the same as collect_experience's; head selection, static sweep, replayed experience); split=eval:
    the evaluation half of Spec-Bench."""
    input:
        code=src("data", "core.model", "drafters.distill"),
        model_files=MODEL_FILES,
    output:
        data=f"{R}/exits/distill_{{split}}.pt",
    params:
        **common_params(),
        data_dir=config["data_dir"],
        layers=LAYERS,
        prompts=lambda wc: EXITS["eval" if wc.split == "eval" else "train"],  # only the settings this split reads
        dev_per_category=lambda wc: POLICY["dev_per_category"] if wc.split == "dev" else 0,
        # sampled continuations besides the greedy ones (train only: dev and eval replay greedy decoding)
        sampling=lambda wc: {k: EXITS["train"][k] for k in ("samples", "temperature", "top_p")}
        if wc.split == "train" else {"samples": 0},
        batch_size=EXITS["train"]["batch_size"],
    wildcard_constraints:
        split="train|dev|eval",
    threads: config["threads"]
    log:
        f"{R}/exits/distill_{{split}}.log",
    benchmark:
        f"{R}/exits/distill_{{split}}.benchmark.tsv"
    resources:
        gpu=0,
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/distill_data.py"


# the three splits' distillation files, by split (wired from the rule's output pattern)
DISTILL = {split: expand(rules.distill_data.output.data, split=split)[0] for split in ("train", "dev", "eval")}


rule train_adapter:
    """One exit adapter (layer, design), trained on the training distillation data only."""
    input:
        model_files=MODEL_FILES,
        data=DISTILL["train"],
        code=src("drafters.adapters", "drafters.distill", "core.exits", "core.model"),
    output:
        adapter=f"{R}/exits/adapters/L{{layer}}_{{design}}.pt",
    params:
        **common_params(),
        loss=EXITS["loss"],
        epochs=EXITS["epochs"],
        lr=EXITS["lr"],
        rank=EXITS["lowrank_rank"],
        decoder=EXITS["decoder"],
        vocab_size=EXITS["vocab_size"],
    wildcard_constraints:
        layer=r"\d+",
        design="linear|lowrank|decoder",
    threads: config["threads"]
    log:
        f"{R}/exits/adapters/L{{layer}}_{{design}}.log",
    benchmark:
        f"{R}/exits/adapters/L{{layer}}_{{design}}.benchmark.tsv"
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/train_adapter.py"


# every configured exit adapter: an input of every job that drafts with the selected heads
ADAPTERS = expand(rules.train_adapter.output.adapter, layer=LAYERS, design=DESIGNS)


rule cost_model:
    """Time of a draft step per exit layer (with its adapter and draft vocabulary; draft_ms: the first design,
    draft_design_ms: every design) and of verifying K+1 tokens, on the machine that runs this rule, at the
    base context and at each long context; and the memory floor of a pass against what passes of 1-9 tokens cost
    with each CPU kernel (floor.json, the same probe as `lede costs`)."""
    input:
        model_files=MODEL_FILES,
        data=DISTILL["train"],
        adapters=ADAPTERS,
        code=src("eval.cost_probe", "core.costs", "core.engine", "core.exits", "core.model", "core.lookup", "core.compiled"),
    output:
        costs=f"{R}/costs.json",
        floor=f"{R}/floor.json",
    params:
        **common_params(),
        **timed_params(LAYERS),
        layers=DRAFTERS,
        designs=DESIGNS,
        max_draft_len=max(config["sweep"]["draft_lens"]),
        context_len=config["costs"]["context_len"],
        long_contexts=config["costs"]["long_contexts"],
        repeats=config["costs"]["repeats"],
        bandwidth_mb=config["costs"]["bandwidth_mb"],
        vocab_size=EXITS["vocab_size"],
    threads: config["threads"]
    log:
        f"{R}/costs.log",
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/cost_model.py"


rule exit_report:
    """Per layer and head design: agreement with the full model per category (train, dev and held-out
    prompts), accepted run lengths and replayed speedup for every K; picks the head per layer and the best
    static (L, K) cells by replayed speedup on the dev split (training prompts the adapters never saw)."""
    input:
        model_files=MODEL_FILES,
        train=DISTILL["train"],
        dev=DISTILL["dev"],
        eval=DISTILL["eval"],
        adapters=ADAPTERS,
        costs=rules.cost_model.output.costs,
        code=src("drafters.report", "drafters.adapters", "drafters.distill", "core.costs", "core.lookup"),
    output:
        csv=f"{R}/exits/report.csv",
        md=report(f"{R}/exits/report.md", caption="../report/exits.rst", category="Exit adapters"),
        selected=f"{R}/exits/selected.json",
        sweep=f"{R}/sweep/replay_dev.csv",
        best=f"{R}/sweep/best_static.json",
    params:
        **common_params(),
        draft_lens=config["sweep"]["draft_lens"],
        top=config["bench"]["static_configs"],
        lookup=POLICY["lookup"],
    threads: config["threads"]
    log:
        f"{R}/exits/report.log",
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/exit_report.py"


# what every policy run reads besides the adapters: the selected heads, the cost model, the best static cells
HEADS = [rules.exit_report.output.selected, rules.cost_model.output.costs, rules.exit_report.output.best]
