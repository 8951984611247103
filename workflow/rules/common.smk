import sys
from pathlib import Path

from snakemake.utils import validate

validate(config, "../../config/schema.yaml")

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # the library, also where it is not pip-installed
from lede.data import DataError, check_data_dir  # noqa: E402
from lede.model import ModelError, model_depth  # noqa: E402

R = config.get("results_dir", "results")
EXITS = config["exits"]
LAYERS = sorted(EXITS["layers"])
DESIGNS = EXITS["designs"]
CATEGORIES = config.get("categories", ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"])


def src(*modules):
    """The library files a job runs (a change to one of them reruns the job)."""
    return [f"src/lede/{m}.py" for m in modules]


def _check_config():
    """Cross-key checks the schema cannot express; stop before any job with the key and the fix."""
    try:
        check_data_dir(config["data_dir"])
    except DataError as err:
        raise WorkflowError(f"config key data_dir={config['data_dir']!r}: {err}")
    try:
        depth = model_depth(config["model"])
    except ModelError as err:
        raise WorkflowError(f"config key model={config['model']!r}: {err}")
    bad = [l for l in LAYERS if not 1 <= l <= depth - 1]
    if bad:
        raise WorkflowError(
            f"config key exits.layers has {bad} outside 1..{depth - 1} for model {config['model']!r} "
            f"({depth} layers): choose exit layers in that range"
        )


_check_config()


def common_params():
    return dict(model=config["model"], dtype=config["dtype"], device=config["device"],
                threads=config["threads"], seed=config["seed"], categories=CATEGORIES)
