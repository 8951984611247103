"""Rule exit_report: agreement and replayed speedups per layer/head on the train (distilled), dev (training
prompts never distilled on) and eval splits; head selection and the best static cells, both chosen on dev."""

import json
import logging
import os
from pathlib import Path

from lede.study import adapter_files, load_lm, setup

p = setup(snakemake)  # noqa: F821
from lede.core.costs import CostModel  # noqa: E402
from lede.drafters.distill import load_distill  # noqa: E402
from lede.core.exits import load_adapter  # noqa: E402
from lede.core.io import atomic_write_csv, atomic_write_text  # noqa: E402
from lede.drafters.report import best_cells, exit_rows, lookup_markdown, lookup_rows, markdown, rows_as_dicts, select_heads  # noqa: E402

inp, out = snakemake.input, snakemake.output  # noqa: F821
train_seqs, train, _ = load_distill(inp.train)
dev_seqs, dev, _ = load_distill(inp.dev)
eval_seqs, evald, _ = load_distill(inp.eval)
costs = CostModel.load(inp.costs)
lm = load_lm(p, device="cpu")
layers = sorted(train.layers)

adapters: dict[str, dict] = {}
paths: dict[tuple[int, str], str] = {}
vocab = None
for (layer, design), path in adapter_files(inp.adapters).items():
    a = load_adapter(path, lm.name, layer, lm.hidden_size, template=lm.model.model.layers[-1])
    vocab = a.vocab
    adapters.setdefault(design, {})[layer] = a
    paths[(layer, design)] = path
suffix = f"_V{len(vocab)}" if vocab is not None else ""
heads = {"plain": (None, None)}
if vocab is not None:
    heads["plain" + suffix] = (None, vocab)
heads.update({d + suffix: (a, vocab) for d, a in adapters.items()})

rows = []
for split, data, seqs in (("train", train, train_seqs), ("dev", dev, dev_seqs), ("eval", evald, eval_seqs)):
    rows += exit_rows(lm, data, split, heads, layers, p.draft_lens, costs, sequences=seqs)
    logging.info("%s rows done", split)
selected = select_heads(rows)
exit_cells = best_cells(rows, selected, p.top)
lookup = [r for split, data, seqs in (("dev", dev, dev_seqs), ("eval", evald, eval_seqs))
          for r in lookup_rows(data, split, seqs, p.draft_lens, costs)] if p.lookup else []
cells = best_cells(rows + lookup, selected | {0: "lookup"}, p.top)  # prompt lookup (layer 0) competes too
logging.info("selected heads %s; best cells %s; best exit cells %s", selected, cells, exit_cells)


def design_of(head):
    return head.removesuffix(suffix) if suffix else head


selection = {
    "model": p.model, "dtype": p.dtype,
    "vocab": vocab.tolist() if vocab is not None and selected and any(h != "plain" for h in selected.values()) else None,
    # adapter paths relative to the selection file, so that a results folder can be moved whole
    "layers": {str(l): (os.path.relpath(paths[(l, design_of(h))], Path(out.selected).parent) if design_of(h) in adapters
                        else None) for l, h in selected.items()},
    "heads": {str(l): h for l, h in selected.items()},
}
# a layer whose best head is the full plain head keeps the full vocabulary only if no layer uses V
if selection["vocab"] is not None and any(h == "plain" for h in selected.values()):
    logging.info("some layers select the full plain head; they draft with the shared draft vocabulary in the engine")
atomic_write_csv(out.csv, rows_as_dicts(rows + lookup))
sweep = [r for r in rows_as_dicts(rows + lookup) if r["split"] == "dev" and r["head"] == (selected | {0: "lookup"}).get(r["layer"])]
atomic_write_csv(out.sweep, sweep)
atomic_write_text(out.selected, json.dumps(selection, indent=1))
atomic_write_text(out.best, json.dumps({"cells": cells, "exit_cells": exit_cells, "chosen_on": "dev (replay)"}, indent=1))
atomic_write_text(out.md, markdown(rows, selected, costs) + lookup_markdown(lookup)
                  + "\n## Best static cells (chosen on the dev split: training prompts the adapters never saw)\n\n"
                  + "\n".join(f"- L={c['exit_layer']} K={c['draft_len']} head={c['head']}: replayed {c['replay_speedup']:.3f}x on dev"
                               for c in cells) + "\n")
