# Stages 3–5: LEDE. Experience from behaviour policies on training prompts (the real engine, and a
# teacher-forced replay of the distillation sequences), offline RL (one job per algorithm and seed), and the
# evaluation of every method, interleaved, on held-out prompts.


rule collect_experience:
    input:
        model_files=MODEL_FILES,
        heads=HEADS,
        adapters=ADAPTERS,
        sweep=rules.exit_report.output.sweep,
        code=src("rl.offline", "rl.features", "rl.heuristics", "core.engine", "core.policy", "core.costs", "data", "core.lookup"),
    output:
        multiext(f"{R}/rl/experience", parquet=".parquet", h5=".h5", json=".json"),
    params:
        **common_params(),
        data_dir=config["data_dir"],
        layers=DRAFTERS,
        policy=policy_params(*BEHAVIOUR, "collect"),
        prompts=EXITS["train"],  # the adapters' distillation prompts, which experience must not reuse
    threads: config["threads"]
    resources:
        gpu=0,
    log:
        f"{R}/rl/experience.log",
    benchmark:
        f"{R}/rl/experience.benchmark.tsv"
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/collect_experience.py"


rule replay_experience:
    """Extra experience without model forwards: the behaviour policies that do not read the draft confidence,
    replayed along the dev split's sequences, the policy's training prompts that the adapters never saw
    (exact episodes; src/lede/rl/replay.py)."""
    input:
        model_files=MODEL_FILES,
        heads=HEADS,
        adapters=ADAPTERS,
        distill=DISTILL["dev"],
        sweep=rules.exit_report.output.sweep,
        code=src("rl.replay", "rl.offline", "rl.features", "rl.heuristics", "core.policy", "core.costs", "drafters.distill", "core.exits", "core.lookup"),
    output:
        multiext(f"{R}/rl/replay", parquet=".parquet", h5=".h5", json=".json"),
    params:
        **common_params(),
        layers=DRAFTERS,
        policy=policy_params(*BEHAVIOUR, "replay", collect=["epsilon"]),
    threads: config["threads"]
    log:
        f"{R}/rl/replay.log",
    benchmark:
        f"{R}/rl/replay.benchmark.tsv"
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/replay_experience.py"


rule train_policy:
    input:
        model_files=MODEL_FILES,
        exp=rules.collect_experience.output,
        replay=rules.replay_experience.output if POLICY["replay"]["enabled"] else [],
        # restarts > 1: candidates replayed on the dev split's sequences, the fastest kept; FullInfo learns from
        # the dev split's replay (every action's outcome) with the replayed behaviour policies' states
        heads=lambda wc: HEADS if replays_dev(wc) else [],
        adapters=lambda wc: ADAPTERS
        if replays_dev(wc) else [],
        distill=lambda wc: DISTILL["dev"] if replays_dev(wc) else [],
        sweep=lambda wc: rules.exit_report.output.sweep if full_information(wc) else [],
        code=src("rl.offline", "rl.features", "rl.replay", "rl.fullinfo", "rl.counterfactual"),
    output:
        policy=f"{R}/rl/policy_{{algo}}_s{{seed}}.pt",
        history=f"{R}/rl/history_{{algo}}_s{{seed}}.csv",
    params:
        **common_params(),
        n_steps=POLICY["n_steps"],
        hidden_units=POLICY["hidden_units"],
        eval_episodes=POLICY["eval_episodes"],
        fqe_steps=POLICY["fqe_steps"],
        fqe_epoch_steps=POLICY["fqe_epoch_steps"],
        gamma=POLICY["gamma"],
        cql_alpha=POLICY["cql_alpha"],
        reward_scale=POLICY["reward_scale"],
        decision=POLICY["decision"],
        discount=POLICY["discount"],
        target_update_interval=POLICY["target_update_interval"],
        restarts=POLICY["restarts"],
        fullinfo=POLICY["fullinfo"],
        full_information=POLICY["full_information"],
        policy=policy_params(*BEHAVIOUR, "replay", collect=["epsilon"]),  # FullInfo's behaviour policies
        layers=DRAFTERS,
        max_draft_len=POLICY["max_draft_len"],
        max_new_tokens=config["exits"]["eval"]["max_new_tokens"],
        logs=f"{R}/rl/logs",
    wildcard_constraints:
        algo="DiscreteCQL|DiscreteBCQ|DoubleDQN|DiscreteBC|FullInfo|DoubleDQN-FI|DiscreteCQL-FI|DiscreteBCQ-FI",
        seed=r"\d+",
    threads: config["threads"]
    log:
        f"{R}/rl/train_{{algo}}_s{{seed}}.log",
    benchmark:
        f"{R}/rl/train_{{algo}}_s{{seed}}.benchmark.tsv"
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/train_policy.py"


rule replay_eval:
    """Every trained policy, the baselines and the oracle replayed along the held-out distillation sequences,
    timed by the cost model (seconds; src/lede/rl/replay.py): the cheap comparison for ablations."""
    input:
        model_files=MODEL_FILES,
        heads=HEADS,
        adapters=ADAPTERS,
        distill=DISTILL["eval"],
        policies=expand(rules.train_policy.output.policy, algo=POLICY["algos"], seed=POLICY["seeds"]),
        code=src("rl.replay", "rl.offline", "rl.features", "rl.heuristics", "rl.oracle", "core.policy", "core.costs", "drafters.distill", "core.exits", "core.lookup"),
    output:
        json=f"{R}/rl/replay_eval.json",
        md=report(f"{R}/rl/replay_eval.md", caption="../report/replay_eval.rst", category="Speed"),
    params:
        **common_params(),
        layers=DRAFTERS,
        max_draft_len=POLICY["max_draft_len"],
        max_new_tokens=config["exits"]["eval"]["max_new_tokens"],
    threads: config["threads"]
    log:
        f"{R}/rl/replay_eval.log",
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/replay_eval.py"


rule evaluate:
    """Plain decoding, transformers' generate and prompt lookup, the best static cell, the heuristics,
    every trained LEDE policy and the oracle, interleaved on held-out prompts."""
    input:
        model_files=MODEL_FILES,
        heads=HEADS,
        adapters=ADAPTERS,
        policies=expand(rules.train_policy.output.policy, algo=POLICY["algos"], seed=POLICY["seeds"]),
        code=src("rl.offline", "rl.features", "rl.heuristics", "rl.oracle", "rl.online", "eval.bench", "core.engine", "core.policy", "core.costs", "data", "core.lookup", "core.compiled"),
    output:
        json=f"{R}/eval/records.json",
        md=report(f"{R}/eval/summary.md", caption="../report/eval.rst", category="Speed"),
    params:
        **common_params(),
        **timed_params(LAYERS),
        data_dir=config["data_dir"],
        layers=DRAFTERS,
        policy=policy_params("max_draft_len", "evaluate"),
        prompts=EXITS["train"],  # the adapters' distillation prompts, which threshold tuning must not reuse
    threads: config["threads"]
    resources:
        gpu=0,
    log:
        f"{R}/eval/evaluate.log",
    benchmark:
        f"{R}/eval/evaluate.benchmark.tsv"
    conda:
        "../envs/lede.yaml"
    script:
        "../scripts/evaluate.py"
