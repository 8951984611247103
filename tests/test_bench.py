"""The benchmark's run order: every configuration once per prompt, in a seeded order whose predecessors vary."""

from collections import Counter

from lede.bench import run_order

NAMES = ["plain", "hf_generate", "static", "adaptive", "lede", "oracle"]


def test_run_order_is_a_seeded_permutation_with_varying_predecessors() -> None:
    orders = [run_order(NAMES, i, 0) for i in range(60)]
    assert all(sorted(o) == sorted(NAMES) for o in orders)
    assert orders == [run_order(NAMES, i, 0) for i in range(60)]  # the same in every run
    assert run_order(NAMES, 0, 1) != run_order(NAMES, 0, 0) or run_order(NAMES, 1, 1) != run_order(NAMES, 1, 0)
    # a rotated order gave each config one predecessor; here each one follows most of the others, and every
    # config runs first on some prompts
    for name in NAMES:
        before = Counter(o[o.index(name) - 1] for o in orders if o.index(name) > 0)
        assert len(before) >= len(NAMES) - 2, (name, before)
    assert set(o[0] for o in orders) == set(NAMES)
