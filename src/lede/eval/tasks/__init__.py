"""The offline lm-eval task suite of lede (YAML files in this folder, hooks in :mod:`lede.eval.tasks.utils`).

    from lede.eval.tasks import task_manager
    tm = task_manager("data")       # lm_eval.tasks.TaskManager over this folder only
    lm_eval.simple_evaluate(model=..., tasks=["lede_gsm8k"], task_manager=tm, apply_chat_template=True)

Command line: ``python -m lede.eval.lm_eval_model run --model lede --tasks lede_gsm8k --metadata
data_dir=data --apply_chat_template ...`` (it adds ``--include_path`` for this folder).

How the data directory reaches the tasks. The YAMLs are static and versioned here; none names a file.
Each task's ``custom_dataset`` is :func:`lede.eval.tasks.utils.load_docs`, which lm-eval calls with the
task's ``dataset_kwargs`` plus the run's *metadata*; the data directory travels in that metadata
(``TaskManager(metadata={"data_dir": ...})``, or ``--metadata data_dir=...`` on the command line).
The loaders of :mod:`lede.data` read and validate the files, so the suite shares the project's
validation and prompt order, needs no ``datasets`` json builder or cache, never touches a hub, and
works for any data directory without generating files.

Tasks (metric per document; aggregated as the mean):

=================================  ==================================================================
``lede_humaneval``                 pass@1, code run in :mod:`lede.eval.sandbox`  (unsafe_code: pass
                                   ``confirm_run_unsafe_code``)
``lede_gsm8k``                     exact_match of the final number, 5-shot from the train split
``lede_spec_bench_summarization``  rougeL
``lede_spec_bench_translation``    bleu, chrf (sentence level)
``lede_spec_bench_math_reasoning`` exact_match of the final number
``lede_spec_bench_qa``             exact_match, f1, contains over documents with references; scored
``lede_spec_bench_rag``            exact_match, f1, contains; scored
``lede_spec_bench_mt_bench``       output_chars (quality: identity vs plain decoding, lede.eval.parity)
=================================  ==================================================================

Groups: ``lede_spec_bench`` (the six Spec-Bench tasks); tag ``lede_suite`` (all eight).
"""

from __future__ import annotations

from pathlib import Path

from lede.eval.tasks.utils import DEFAULT_DATA_DIR

TASK_DIR = Path(__file__).resolve().parent

SPEC_BENCH_TASKS = (
    "lede_spec_bench_summarization",
    "lede_spec_bench_translation",
    "lede_spec_bench_math_reasoning",
    "lede_spec_bench_qa",
    "lede_spec_bench_rag",
    "lede_spec_bench_mt_bench",
)
TASKS = ("lede_humaneval", "lede_gsm8k", *SPEC_BENCH_TASKS)

__all__ = ["DEFAULT_DATA_DIR", "SPEC_BENCH_TASKS", "TASKS", "TASK_DIR", "task_manager"]


def task_manager(data_dir=None, include_defaults: bool = False, **metadata):
    """An ``lm_eval.tasks.TaskManager`` that knows the lede tasks and passes ``data_dir`` to them.

    ``include_defaults``: also index lm-eval's ~14k built-in tasks (slow; most need a hub).
    Extra ``metadata`` is attached to every task, as lm-eval's ``--metadata`` does.
    """
    from lm_eval.tasks import TaskManager

    meta = {"data_dir": str(Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR).expanduser()), **metadata}
    return TaskManager(include_path=str(TASK_DIR), include_defaults=include_defaults, metadata=meta)
