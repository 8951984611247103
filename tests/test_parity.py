"""lede.eval.parity: the parity table (metric diff + bootstrap CI, identity rate, first differing token, margin)."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from conftest import tiny
from lede.eval.parity import (
    MethodRun,
    _first_difference,
    full_model_margin,
    paired_bootstrap,
    parity_report,
)


def _sample(doc_id, text, **metrics):
    return {"doc_id": doc_id, "filter": "none", "resps": [[text]], "filtered_resps": [text],
            "metrics": list(metrics), **metrics}


def _record(task, doc_id, tokens, prompt=(1, 2, 3), wall=1.0, accepted=(0,), finish="eos", cut=0):
    return {"task": task, "doc_id": doc_id, "prompt_ids": list(prompt), "token_ids": list(tokens),
            "new_tokens": len(tokens), "wall_s": wall, "rounds": len(accepted), "accepted": list(accepted),
            "finish_reason": finish, "context_truncated": cut}


def _runs():
    plain = MethodRun(
        "plain", "autoregressive",
        {"qa": [_sample(0, "Paris", exact_match=1.0), _sample(1, "blue", exact_match=0.0),
                _sample(2, "x", exact_match=None)]},
        [_record("qa", 0, [5, 6], wall=2.0, accepted=(0, 0)), _record("qa", 1, [7, 8, 9], wall=3.0,
                                                                          accepted=(0, 0, 0), finish="length"),
         _record("qa", 2, [4], wall=1.0)],
    )
    fast = MethodRun(
        "static_8_4", "static:8:4",
        {"qa": [_sample(0, "Paris", exact_match=1.0), _sample(1, "red", exact_match=1.0),
                _sample(2, "x", exact_match=None)]},
        [_record("qa", 0, [5, 6], wall=1.0, accepted=(1,)), _record("qa", 1, [7, 3, 9], wall=1.0,
                                                                       accepted=(2,), cut=5),
         _record("qa", 2, [4], wall=0.5)],
    )
    return plain, fast


def test_paired_bootstrap():
    mean, lo, hi = paired_bootstrap([1.0] * 10)
    assert (mean, lo, hi) == (1.0, 1.0, 1.0)
    mean, lo, hi = paired_bootstrap([0.0, 1.0] * 50, n_boot=500)
    assert mean == 0.5 and lo < 0.5 < hi and hi - lo < 0.35
    assert all(math.isnan(x) for x in paired_bootstrap([]))
    assert paired_bootstrap([0.3])[0] == 0.3 and math.isnan(paired_bootstrap([0.3])[1])
    assert paired_bootstrap([0.0, 1.0] * 20, seed=1) == paired_bootstrap([0.0, 1.0] * 20, seed=1)


def test_first_difference():
    assert _first_difference([1, 2, 3], [1, 2, 3]) is None
    assert _first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert _first_difference([1, 2], [1, 2, 3]) == 2


def test_report_rows_identity_speed_and_differences(tmp_path):
    plain, fast = _runs()
    calls = []

    def margin_fn(prompt, prefix):
        calls.append((list(prompt), list(prefix)))
        return {"margin": 0.125, "full_top1": 7, "full_top2": 3}

    rep = parity_report([plain, fast], margin_fn=margin_fn, decode=lambda ids: f"<{ids[0]}>", n_boot=200)
    rows = {(r["method"], r["metric"]): r for r in rep.rows}
    p, f = rows[("plain", "exact_match")], rows[("static_8_4", "exact_match")]
    # doc 2 has no reference (None): left out of the metric, not scored as zero
    assert p["n"] == f["n"] == 2
    assert p["value"] == 0.5 and f["value"] == 1.0 and f["plain_value"] == 0.5 and f["diff"] == 0.5
    assert p["diff"] == 0.0 and p["identity_rate"] == 1.0
    assert f["identical"] == 2 and f["n_outputs"] == 3 and f["identity_rate"] == pytest.approx(2 / 3)
    assert p["tokens_per_s"] == pytest.approx(6 / 6.0) and f["tokens_per_s"] == pytest.approx(6 / 2.5)
    assert f["speedup"] == pytest.approx(2.4)
    assert p["mean_accepted"] == 1.0 and f["mean_accepted"] == pytest.approx((2 + 3 + 1) / 3)
    assert f["context_truncated"] == 1 and p["length_capped"] == 1 and f["length_capped"] == 0
    # the one differing output: first differing token at position 1, margin at plain's prefix
    assert len(rep.differences) == 1
    d = rep.differences[0]
    assert (d["task"], d["method"], d["doc_id"], d["position"]) == ("qa", "static_8_4", 1, 1)
    assert (d["plain_token"], d["method_token"], d["plain_piece"], d["method_piece"]) == (8, 3, "<8>", "<3>")
    assert d["margin"] == 0.125 and calls == [([1, 2, 3], [7])]

    paths = rep.write(tmp_path)
    with open(paths["csv"]) as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 and {"diff", "ci_low", "ci_high", "identity_rate"} <= set(table[0])
    with open(paths["differences"]) as fh:
        listed = list(csv.DictReader(fh))
    assert listed[0]["position"] == "1" and listed[0]["margin"] == "0.125"
    md = paths["markdown"].read_text()
    assert "| qa | static_8_4 | exact_match | 2 |" in md and "2/3 (0.67)" in md and "0.1250" in md


def test_report_refuses_mismatched_runs():
    plain, fast = _runs()
    fast.samples["qa"] = fast.samples["qa"][:2]
    with pytest.raises(ValueError, match="lacks 1"):
        parity_report([plain, fast])
    with pytest.raises(ValueError, match="unique"):
        parity_report([plain, plain])
    with pytest.raises(ValueError, match="log_samples"):
        MethodRun.from_evaluation("x", {"results": {}})


def test_full_model_margin_matches_a_plain_forward():
    lm = tiny()
    fn = full_model_margin(lm)
    out = fn([1, 2, 3], [4, 5])
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits[0, -1]
    top = torch.topk(logits, 2)
    assert out["full_top1"] == int(top.indices[0]) and out["full_top2"] == int(top.indices[1])
    assert out["margin"] == pytest.approx(float(top.values[0] - top.values[1]))
    assert out["margin"] >= 0
