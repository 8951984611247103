"""Head selection and the best static cells are chosen on the dev split, never on the adapters' own
distillation prompts (where a higher-capacity adapter looks better than it is)."""

import pytest

from lede.drafters.report import ALL, ReportRow, best_cells, select_heads


def _row(split, layer, head, k, speedup, category=ALL):
    return ReportRow(split, category, layer, head, agreement=speedup / 2, positions=100, draft_len=k,
                     tokens_per_round=1.0 + speedup, replay_speedup=speedup)


ROWS = [
    # on the distillation prompts the lowrank adapter wins everywhere ...
    _row("train", 2, "linear", 1, 1.10), _row("train", 2, "lowrank", 1, 1.40), _row("train", 2, "lowrank", 3, 1.50),
    _row("train", 4, "linear", 1, 1.05), _row("train", 4, "lowrank", 1, 1.30),
    # ... on unseen training prompts the linear one does at layer 2
    _row("dev", 2, "linear", 1, 1.08), _row("dev", 2, "linear", 3, 0.90), _row("dev", 2, "lowrank", 1, 1.02),
    _row("dev", 4, "linear", 1, 0.97), _row("dev", 4, "lowrank", 1, 1.01),
    _row("dev", 2, "lowrank", 1, 9.99, category="qa"),  # per-category rows never decide
    _row("eval", 2, "lowrank", 1, 3.00), _row("eval", 4, "linear", 1, 3.00),  # nor do held-out ones
]


def test_heads_and_cells_are_chosen_on_dev() -> None:
    selected = select_heads(ROWS)
    assert selected == {2: "linear", 4: "lowrank"}
    cells = best_cells(ROWS, selected, top=2)
    assert [(c["exit_layer"], c["draft_len"], c["head"]) for c in cells] == [(2, 1, "linear"), (4, 1, "lowrank")]
    assert cells[0]["replay_speedup"] == 1.08
    # the old behaviour, for comparison: on train the overfit head and its longer drafts would win
    assert select_heads(ROWS, split="train") == {2: "lowrank", 4: "lowrank"}
    assert (best_cells(ROWS, select_heads(ROWS, "train"), 1, split="train")[0]["draft_len"]) == 3


def test_no_dev_rows_is_an_error() -> None:
    with pytest.raises(ValueError, match="no 'dev' rows"):
        select_heads([r for r in ROWS if r.split != "dev"])
