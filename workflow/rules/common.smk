import importlib.util
from pathlib import Path

from snakemake.logging import logger
from snakemake.utils import validate


def _typed_leaves(node, depth=0):
    """snakemake's --config parses top-level values as YAML but leaves values inside a nested mapping as
    strings (`--config 'policy={n_steps: 100}'` gives '100'): parse those string leaves as YAML scalars too,
    so the schema sees 100. Top-level strings (a model id, a path) are left as they are."""
    import yaml

    if isinstance(node, dict):
        return {k: _typed_leaves(v, depth + 1) for k, v in node.items()}
    if isinstance(node, list):
        return [_typed_leaves(v, depth + 1) for v in node]
    if isinstance(node, str) and depth > 1:
        try:
            value = yaml.safe_load(node)
        except yaml.YAMLError:
            return node
        return value if isinstance(value, (int, float, bool, list, dict)) or value is None and node in ("null", "~") else node
    return node


config.update(_typed_leaves(config))
validate(config, "../../config/schema.yaml")
# a relative data_dir names a folder of the repository (default: data/, shipped), whatever the working directory
config["data_dir"] = str(Path(workflow.basedir, config["data_dir"]))

# the installed package (make setup: pip install -e .; the conda env and the container install it too)
from lede.data import DataError, check_data_dir  # noqa: E402
from lede.core.model import ModelError, load_config  # noqa: E402

R = config.get("results_dir", "results")
EXITS = config["exits"]
LAYERS = sorted(EXITS["layers"])
DESIGNS = EXITS["designs"]
CATEGORIES = config.get("categories", ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"])


def src(*modules):
    """The library files a job runs, by module under ``lede`` (a change to one of them reruns the job), found where
    the package is installed. Every job runs ``lede.study`` (the scripts' shared layer); a job that loads the model
    ("core.model") also runs ``lede.drafters.loading``, the CPU kernels and the lean layer forward it installs: a fix
    there (5fe56fb, the attention mask of batched generation) changes the outputs of every such job."""
    if "core.model" in modules:
        modules += ("drafters.loading", "core.kernels", "core.fastpath", "core.tuning")
    return [importlib.util.find_spec(f"lede.{m}").origin for m in ("study", *dict.fromkeys(modules))]


def _check_config():
    """Cross-key checks the schema cannot express; stop before any job with the key and the fix."""
    try:
        check_data_dir(config["data_dir"])
    except DataError as err:
        raise WorkflowError(f"config key data_dir={config['data_dir']!r}: {err}")
    dev = str(config["device"])
    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise WorkflowError(f"config key device={dev!r}: CUDA is not available on this machine (torch "
                                f"{torch.__version__}): use device: cpu or auto")
        if ":" in dev and int(dev.split(":")[1]) >= torch.cuda.device_count():
            raise WorkflowError(f"config key device={dev!r}: this machine has {torch.cuda.device_count()} CUDA "
                                "device(s): use cuda:0 .. or auto")
    try:
        model_config = load_config(config["model"], cache_dir=config.get("model_cache"))  # fast once converted
    except ModelError as err:
        raise WorkflowError(f"config key model={config['model']!r}: {err}")
    depth = int(model_config.num_hidden_layers)
    positions = getattr(model_config, "max_position_embeddings", None)
    costs = config.get("costs", {})
    k_max = max(max(config["sweep"]["draft_lens"]), config["policy"]["max_draft_len"])
    if positions is not None:
        too_long = [c for c in [costs.get("context_len", 256)] + list(costs.get("long_contexts", []))
                    if c + k_max + 1 > positions]
        if too_long:
            raise WorkflowError(f"config key costs.long_contexts/context_len has {too_long}: with a round of "
                                f"{k_max} drafted + 1 token it exceeds model {config['model']!r}'s "
                                f"{positions} positions: use contexts <= {positions - k_max - 1}")
    ee_bad = [l for l in config["early_exit"]["exit_layers"] if not 1 <= l <= depth - 1]
    if config["early_exit"]["enabled"] and ee_bad:
        raise WorkflowError(f"config key early_exit.exit_layers has {ee_bad} outside 1..{depth - 1} for model "
                            f"{config['model']!r}: choose exit layers in that range")
    weights = config["early_exit"].get("exit_weights")
    if weights is not None and len(weights) != len(config["early_exit"]["exit_layers"]):
        raise WorkflowError(f"config key early_exit.exit_weights={weights}: give one weight per exit layer "
                            f"{config['early_exit']['exit_layers']} (or null)")
    dev, engine = config["policy"]["dev_per_category"], config["policy"]["collect"]["per_category"]
    if engine > dev:
        raise WorkflowError(f"config key policy.collect.per_category={engine} exceeds policy.dev_per_category={dev}: "
                            "the engine collects on the first prompts of the dev split; lower it or enlarge the split")
    steps, tui = config["policy"]["n_steps"], config["policy"]["target_update_interval"]
    if tui > steps:
        raise WorkflowError(f"config key policy.target_update_interval={tui} exceeds policy.n_steps={steps}: the "
                            "Q-learning target network would never be updated; lower it (e.g. n_steps / 10)")
    for key in ("online", "correct"):
        extra = [a for a in config["policy"]["evaluate"].get(key, []) if a not in config["policy"]["algos"]]
        if extra:
            raise WorkflowError(f"config key policy.evaluate.{key} has {extra}, which policy.algos does not train: "
                                f"add them to policy.algos or drop them from policy.evaluate.{key}")
    bad = [l for l in LAYERS if not 1 <= l <= depth - 1]
    if bad:
        raise WorkflowError(
            f"config key exits.layers has {bad} outside 1..{depth - 1} for model {config['model']!r} "
            f"({depth} layers): choose exit layers in that range"
        )
    if config["compile"] and not str(config["device"]).startswith("cuda"):
        from lede.core.compiled import compiler_problem

        problem = compiler_problem()
        if problem:  # not an error: the timed jobs warn again and stay eager
            logger.warning(f"config key compile=true: {problem}; the timed jobs will decode eagerly (install g++, "
                           "e.g. make setup, or set compile: false)")


_check_config()


# The early-exit-trained variant (issue 7): when enabled, every stage after `early_exit` runs on the base
# model plus the trained deltas, named "<model>-ee"; the base model only serves as the variant's teacher.
EE = config["early_exit"]
EE_WEIGHTS = f"{R}/early_exit/weights.pt"
MODEL_FILES = [EE_WEIGHTS] if EE["enabled"] else []  # an input of every job that loads the studied model
STUDIED_MODEL = config["model"] + ("-ee" if EE["enabled"] else "")


def common_params(base=False):
    """Params shared by every job that loads a model. With base=True, the base model even when the study
    runs on the early-exit variant (for the variant's teacher data and its quality comparison)."""
    variant = EE["enabled"] and not base
    return dict(model=STUDIED_MODEL if variant else config["model"],
                early_exit_weights=EE_WEIGHTS if variant else None,
                dtype=config["dtype"], device=config["device"], kernels=config["kernels"],
                threads=config["threads"], seed=config["seed"], categories=CATEGORIES)


def timed_params(cuts):
    """Params of a job that times decoding: whether it compiles the decoder layers (config key compile) and the
    segment cuts, the exit layers it drafts from (every such job compiles the same cuts, so that the engine the
    cost model priced is the engine the evaluation times)."""
    return dict(compile=config["compile"], compile_cuts=sorted(c for c in cuts if c > 0))


POLICY = config["policy"]
# the policy's candidate drafters: prompt lookup ("exit layer 0", src/lede/core/lookup.py) and the exit layers
DRAFTERS = ([0] if POLICY["lookup"] else []) + LAYERS


def policy_params(*keys, **subsets):
    """The parts of the policy config a job reads (params trigger reruns: e.g. changing policy.n_steps must
    not recollect experience). ``subsets``: {key: [subkeys]} for nested sections read only in part."""
    out = {k: POLICY[k] for k in keys}
    out.update({k: {s: POLICY[k][s] for s in subs} for k, subs in subsets.items()})
    return out


def replays_dev(wc):
    """Does this train_policy job replay the dev split (restarts chosen by replay, or full-information training)?"""
    return POLICY["restarts"] > 1 or full_information(wc)


def full_information(wc):
    """Does this train_policy job learn from the dev replay's every-action outcomes (FullInfo, <algo>-FI)?"""
    return wc.algo == "FullInfo" or wc.algo.endswith("-FI")


# what a behaviour-policy run reads: the draft cap, the reward, the ε of the perturbed heuristics
BEHAVIOUR = ("max_draft_len", "reward_weight", "reward_credit")

# Quality parity (issue 5, rules in parity.smk): plain decoding, the configured baselines, every LEDE policy.
PARITY = config["parity"]
LEDE_NAMES = {f"lede_{a}_s{s}": (a, s) for a in POLICY["algos"] for s in POLICY["seeds"]}  # method -> (algo, seed)
PARITY_METHODS = ["plain"] + [m for m in PARITY["methods"] if m != "lede"] + (
    list(LEDE_NAMES) if "lede" in PARITY["methods"] else [])
PARITY_FILES = ["results_{method}.json", "samples_{method}.jsonl", "speed_{method}.jsonl"]
PARITY_CODE = src("eval.parity", "eval.lm_eval_model", "eval.sandbox", "core.engine", "core.policy", "core.model") + sorted(
    str(p) for p in Path(importlib.util.find_spec("lede.eval.tasks").origin).parent.iterdir()
    if p.suffix in (".py", ".yaml"))


def parity_method_inputs(wc):
    """Named inputs of one method's run: nothing beyond the model for plain decoding; the exit heads (the
    selection, cost model, best static cells, adapters) and the heuristics' or the trained policy's files for
    the speculative methods."""
    if wc.method == "plain":
        return {}
    named = {"heads": HEADS, "adapters": ADAPTERS}  # defined in exits.smk, read when the DAG is built
    if wc.method in LEDE_NAMES:
        algo, seed = LEDE_NAMES[wc.method]
        return named | {"policy": expand(rules.train_policy.output.policy, algo=algo, seed=seed)[0], "policy_code": src("rl.offline", "rl.features")}
    return named | {"policy_code": src("rl.heuristics")}
