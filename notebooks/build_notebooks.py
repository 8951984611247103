"""Writes the paper's notebooks (notebooks/*.ipynb) from the cell sources below: `python notebooks/build_notebooks.py`.

The .ipynb files are checked in (papermill runs them, Snakemake declares them as inputs); this script is
their source, so edit it and rerun it rather than editing a notebook by hand (tests/test_notebooks.py
checks that the two agree). Every notebook has:

- a cell tagged ``parameters`` (``results_dir``, ``out_dir`` and a few of its own), which papermill
  overrides (`papermill notebooks/X.ipynb out.ipynb -p results_dir results`);
- the same set-up cell (style, paths, table writer), so each notebook runs on its own;
- it reads only files under ``results_dir`` and writes ``{out_dir}/figures/<name>.{png,pdf}`` and
  ``{out_dir}/tables/<name>.{md,tex}`` (``out_dir`` defaults to ``results_dir``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

PARAMS_COMMON = '''results_dir = "results"  # the workflow's results directory (config key results_dir)
out_dir = None  # figures/ and tables/ go under this directory; None: results_dir'''

SETUP = r'''import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from IPython.display import Markdown, display  # noqa: E402
from lede.core.io import atomic_path, atomic_write_text  # noqa: E402  (every output: whole or not at all)
from lede.data import GENERALISATION_CATEGORIES, NEW_SOURCES, in_report_group  # noqa: E402

NAME = "__NAME__"  # this notebook's outputs: figures/NAME.{png,pdf}, tables/NAME.{md,tex}
R = Path(results_dir)
OUT = Path(out_dir) if out_dir else R
FIGURES, TABLES = OUT / "figures", OUT / "tables"
FIGURES.mkdir(parents=True, exist_ok=True)
TABLES.mkdir(parents=True, exist_ok=True)

sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.3)
plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 200, "axes.titleweight": "bold", "axes.titlesize": "medium",
                     "legend.frameon": False, "pdf.fonttype": 42, "ps.fonttype": 42})

METHOD_LABELS = {"plain": "Plain decoding", "hf_generate": "HF generate", "hf_prompt_lookup": "Prompt lookup (HF)",
                 "best_static": "Best static", "adaptive_k": "Adaptive K", "confidence": "Confidence threshold",
                 "dynamic_exit": "Dynamic exit", "oracle": "Oracle"}
METHOD_ORDER = ["plain", "hf_generate", "hf_prompt_lookup", "best_static", "adaptive_k", "confidence", "dynamic_exit"]
CATEGORY_LABELS = {"all": "All", "mt_bench": "MT-Bench", "translation": "Translation",
                   "summarization": "Summarization", "qa": "QA", "math_reasoning": "Math reasoning", "rag": "RAG",
                   "coding_humaneval": "HumanEval (code)", "new sources": "New sources",
                   "new_short_factual": "New: short factual", "new_long_writing": "New: long writing",
                   "new_multi_turn": "New: multi-turn", "new_code": "New: code"}
ALL_ALGOS = ("DiscreteCQL", "DiscreteBCQ", "DoubleDQN", "DiscreteBC")
LEDE_RE = re.compile(r"lede_(?P<algo>.+)_s(?P<seed>\d+)")


def method_label(config):
    m = LEDE_RE.fullmatch(config)
    return f"LEDE ({m['algo']}, seed {m['seed']})" if m else METHOD_LABELS.get(config, config)


def lede_order(configs):
    """LEDE configs by algorithm (in the README's order, DiscreteCQL first), then seed."""
    def key(c):
        m = LEDE_RE.fullmatch(c)
        return (ALL_ALGOS.index(m["algo"]) if m["algo"] in ALL_ALGOS else len(ALL_ALGOS), m["algo"], int(m["seed"]))
    return sorted(configs, key=key)


def method_order(configs):
    """Baselines first, then every LEDE policy (by name), the oracle last, anything else before it."""
    configs = list(dict.fromkeys(configs))
    known = [c for c in METHOD_ORDER if c in configs]
    lede = lede_order(c for c in configs if LEDE_RE.fullmatch(c))
    rest = [c for c in configs if c not in known and c not in lede and c != "oracle"]
    return known + rest + lede + (["oracle"] if "oracle" in configs else [])


def category_label(cat):
    return CATEGORY_LABELS.get(cat, str(cat).replace("_", " ").capitalize())


def category_order(cats):
    order = list(CATEGORY_LABELS)
    cats = list(dict.fromkeys(cats))
    return sorted(cats, key=lambda c: (order.index(c) if c in order else len(order), c))


def in_group(category, group):
    """The rows of a category column in a table's row or column ``group`` (``lede.data.in_report_group``: "all" is
    the held-out Spec-Bench and HumanEval prompts, "new sources" the generalisation set's, else one category)."""
    return category.map(lambda c: in_report_group(c, group)).astype(bool)


def groups(categories):
    """A table's rows or columns: "all", "new sources" where the evaluation has such prompts, then each category."""
    cats = category_order(categories)
    return ["all"] + ([NEW_SOURCES] if any(c in GENERALISATION_CATEGORIES for c in cats) else []) + cats


def head_label(head):
    """plain: final norm + full LM head; plain_V4096: the same on the draft vocabulary; linear_V4096: an adapter."""
    m = re.fullmatch(r"(?P<design>[a-z]+)(?:_V(?P<v>\d+))?", head)
    if not m:
        return head
    design = {"plain": "plain head", "linear": "linear adapter", "lowrank": "low-rank adapter"}.get(m["design"], m["design"])
    return f"{design}, V={m['v']}" if m["v"] else f"{design}, full vocab"


def need(path):
    """A results file, or a clear error naming it (run the workflow first)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the workflow (snakemake) for results_dir={results_dir!r} first")
    return path


def fmt(x, decimals=3, sign=False):
    if x is None or not np.isfinite(x):
        return "–"
    return f"{x:+.{decimals}f}" if sign else f"{x:.{decimals}f}"


def save_figure(fig, name=None):
    """figures/NAME.png and .pdf (no timestamps in the files, so reruns give the same bytes)."""
    name = name or NAME
    with atomic_path(FIGURES / f"{name}.png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Software": None})
    with atomic_path(FIGURES / f"{name}.pdf") as tmp:
        fig.savefig(tmp, format="pdf", bbox_inches="tight", metadata={"CreationDate": None, "Creator": None,
                                                                        "Producer": None})
    print("wrote", FIGURES / f"{name}.png", "and .pdf")


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--", "×": r"$\times$",
        "±": r"$\pm$", "−": "$-$", "*": r"$^{*}$", "†": r"$^{\dagger}$"}


def tex_escape(s):
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def _md_cell(s):
    return str(s).replace("|", "\\|")


def write_table(sections, caption, note=None, name=None):
    """tables/NAME.md and .tex from [(section title or None, DataFrame of formatted strings)]: the index is
    the first column (its name the header), numbers are already formatted with fixed decimals."""
    name = name or NAME
    md, tex = [f"**{caption}**", ""], []
    ncols = 1 + max(len(df.columns) for _, df in sections)
    tex += [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{tex_escape(caption)}}}",
            rf"\label{{tab:{name}}}", r"\begin{tabular}{l" + "r" * (ncols - 1) + "}", r"\toprule"]
    header = None
    for k, (title, df) in enumerate(sections):
        cols = [df.index.name or ""] + [str(c) for c in df.columns]
        if title:
            md += [f"*{title}*", ""]
        md.append("| " + " | ".join(_md_cell(c) for c in cols) + " |")
        md.append("|" + "|".join([":---"] + ["---:"] * (len(cols) - 1)) + "|")
        for idx, row in zip(df.index, df.itertuples(index=False)):
            md.append("| " + " | ".join(_md_cell(v) for v in [idx, *row]) + " |")
        md.append("")
        if cols != header:
            if k:
                tex.append(r"\midrule")
            tex.append(" & ".join(tex_escape(c) for c in cols) + r" \\")
            header = cols
        if title:
            tex += [r"\midrule", rf"\multicolumn{{{ncols}}}{{l}}{{\textit{{{tex_escape(title)}}}}} \\"]
        tex.append(r"\midrule")
        for idx, row in zip(df.index, df.itertuples(index=False)):
            tex.append(" & ".join(tex_escape(v) for v in [idx, *row]) + r" \\")
    tex += [r"\bottomrule", r"\end{tabular}"]
    if note:
        md += [f"Note: {note}", ""]
        tex += [r"\par\smallskip\footnotesize " + tex_escape(note)]
    tex.append(r"\end{table}")
    atomic_write_text(TABLES / f"{name}.md", "\n".join(md))
    atomic_write_text(TABLES / f"{name}.tex", "\n".join(tex) + "\n")
    print("wrote", TABLES / f"{name}.md", "and .tex")
    display(Markdown("\n".join(md)))


def load_records():
    """R/eval/records.json: one record per (prompt, config, repeat), with ``speedup`` = tokens/s ÷ plain's
    tokens/s on the same prompt and repeat (the per-prompt ratio)."""
    payload = json.loads(need(R / "eval" / "records.json").read_text())
    rec = pd.DataFrame(payload["records"])
    plain = rec[rec.config == "plain"].set_index(["prompt", "repeat"])["tokens_per_s"]
    key = pd.MultiIndex.from_frame(rec[["prompt", "repeat"]])
    rec["speedup"] = rec["tokens_per_s"].to_numpy() / plain.reindex(key).to_numpy()
    return payload, rec


def per_prompt(rec, value="speedup"):
    """One value per (config, category, prompt): the median over repeats."""
    return rec.groupby(["config", "category", "prompt"], as_index=False)[value].median()


def median_ci(x, n_boot=2000, level=0.95, seed=0):
    """Median of x and a percentile-bootstrap interval over its elements (prompts)."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if not len(x):
        return np.nan, np.nan, np.nan
    boots = np.median(np.random.default_rng(seed).choice(x, size=(n_boot, len(x))), axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return float(np.median(x)), float(lo), float(hi)'''


def notebook(name: str, title: str, intro: str, params: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    p = new_code_cell(PARAMS_COMMON + ("\n" + params if params else ""))
    p.metadata["tags"] = ["parameters"]
    body = [new_markdown_cell(f"# {title}\n\n{intro.strip()}\n\nGenerated by `notebooks/build_notebooks.py`; "
                              f"run with `papermill notebooks/{name}.ipynb out.ipynb -p results_dir results`."),
            p, new_code_cell(SETUP.replace("__NAME__", name))]
    for kind, src in cells:
        body.append(new_markdown_cell(src.strip()) if kind == "md" else new_code_cell(src.strip()))
    for i, cell in enumerate(body):  # stable ids: rerunning this script gives the same files
        cell["id"] = f"{name}-{i}"
    nb.cells = body
    return nb


NOTEBOOKS: dict[str, dict] = {}

# ----------------------------------------------------------------------------------------- speedup table
NOTEBOOKS["speedup_table"] = dict(
    title="Speedup over plain decoding, per method and category",
    intro="""
Every method of the `evaluate` rule, measured interleaved on held-out prompts (`R/eval/records.json`):
the median over prompts of the per-prompt ratio tokens/s ÷ plain decoding's tokens/s on the same prompt,
with a 95 % percentile-bootstrap interval over prompts; mean tokens per round (accepted drafts + 1);
the share of outputs identical to plain decoding; and LEDE's gain over the best static configuration
(median of the per-prompt ratio LEDE ÷ best static, minus 1).""",
    params='''n_boot = 2000  # bootstrap resamples of the prompts
ci_level = 0.95
boot_seed = 0''',
    cells=[
        ("code", r'''
payload, rec = load_records()
pp = per_prompt(rec)
configs = method_order(rec.config.unique())
cats = groups(rec.category.unique())
n_prompts = {c: pp[(pp.config == "plain") & in_group(pp.category, c)].prompt.nunique() for c in cats}
best_l, best_k = payload.get("best_static", [None, None])
print(f"{len(configs)} methods, {n_prompts['all']} prompts, categories {cats[1:]}; best static L={best_l} K={best_k}")

rows = []
for cfg in configs:
    for cat in cats:
        sub = pp[(pp.config == cfg) & in_group(pp.category, cat)]
        med, lo, hi = median_ci(sub.speedup, n_boot, ci_level, boot_seed)
        r = rec[(rec.config == cfg) & in_group(rec.category, cat)]
        rows.append(dict(config=cfg, category=cat, median=med, lo=lo, hi=hi, prompts=sub.prompt.nunique(),
                         tokens_per_round=r.mean_accepted.mean(), identical=100 * r.identical.mean()))
stats = pd.DataFrame(rows)

# LEDE's gain over the best static cell: per-prompt ratio of the two, median over prompts (and interval)
tps = rec.groupby(["config", "category", "prompt"]).tokens_per_s.median()
gains = []
for cfg in [c for c in configs if LEDE_RE.fullmatch(c)]:
    for cat in cats:
        ratio = (tps[cfg] / tps["best_static"]).reset_index()
        ratio = ratio[in_group(ratio.category, cat)].tokens_per_s
        med, lo, hi = median_ci(ratio, n_boot, ci_level, boot_seed)
        gains.append(dict(config=cfg, category=cat, gain=100 * (med - 1), lo=100 * (lo - 1), hi=100 * (hi - 1)))
gains = pd.DataFrame(gains, columns=["config", "category", "gain", "lo", "hi"])
stats.round(4)'''),
        ("code", r'''
def wide(df, cell):
    out = df.assign(v=df.apply(cell, axis=1)).pivot(index="config", columns="category", values="v")
    out = out.loc[[c for c in configs if c in out.index], cats]
    out.index = [method_label(c) for c in out.index]
    out.index.name = "Method"
    out.columns = [f"{category_label(c)} (n={n_prompts[c]})" for c in cats]
    return out


pct = int(round(100 * ci_level))
sections = [
    (f"Median speedup over plain decoding (×) [{pct}% bootstrap interval over prompts]",
     wide(stats, lambda r: f"{fmt(r['median'], 2)} [{fmt(r.lo, 2)}, {fmt(r.hi, 2)}]")),
    ("Tokens per round (accepted drafts + 1), mean over prompts", wide(stats, lambda r: fmt(r.tokens_per_round, 2))),
    ("Output identical to plain decoding (%)", wide(stats, lambda r: fmt(r.identical, 1))),
]
if len(gains):
    sections.append((f"LEDE's gain over best static (%) [{pct}% bootstrap interval]",
                     wide(gains, lambda r: f"{fmt(r.gain, 1, sign=True)} [{fmt(r.lo, 1, sign=True)}, {fmt(r.hi, 1, sign=True)}]")))
write_table(sections, caption=f"Speedup over plain decoding on held-out prompts (best static: L={best_l}, K={best_k}).",
            note="HF generate and prompt lookup have no draft rounds (tokens per round: –).")'''),
        ("code", r'''
labels = [method_label(c) for c in configs]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 0.5 * len(configs) + 2.2), width_ratios=[1, 1.5],
                               layout="constrained")
allc = stats[stats.category == "all"].set_index("config").loc[configs]
y = np.arange(len(configs))
colors = ["#d55e00" if LEDE_RE.fullmatch(c) else ("#555555" if c in ("plain", "oracle") else "#0072b2") for c in configs]
ax1.errorbar(allc["median"], y, xerr=[allc["median"] - allc.lo, allc.hi - allc["median"]], fmt="none",
             ecolor="0.4", capsize=4, lw=1.5)
ax1.scatter(allc["median"], y, c=colors, s=60, zorder=3)
ax1.axvline(1.0, color="0.3", ls="--", lw=1)
ax1.set_yticks(y, labels)
ax1.invert_yaxis()
ax1.set_xlabel(f"speedup over plain decoding (×)\nmedian over prompts, {pct}% bootstrap interval")
ax1.set_title(f"All categories (n={n_prompts['all']} prompts)")

grid = stats.pivot(index="config", columns="category", values="median").loc[configs, cats]
sns.heatmap(grid, ax=ax2, annot=True, fmt=".2f", cmap="vlag", center=1.0, linewidths=0.5,
            cbar_kws={"label": "median speedup over plain (×)"}, yticklabels=labels,
            xticklabels=[category_label(c) for c in cats], annot_kws={"size": 10})
ax2.set_xlabel("Spec-Bench category")
ax2.set_ylabel("")
ax2.set_title("Per category")
plt.setp(ax2.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
save_figure(fig)'''),
    ],
)

# ----------------------------------------------------------------------------------------- static heatmap
NOTEBOOKS["static_heatmap"] = dict(
    title="Replayed static speedup over (exit layer, draft length)",
    intro="""
The teacher-forced replay of every static configuration Static(L, K) under the measured cost model
(`R/exits/report.csv`, held-out prompts, all categories), with the exit head selected per layer on the
dev split (`R/exits/selected.json`; training prompts the adapters were never distilled on). Solid box: the best
cell on these prompts; dashed box: the cell chosen on the dev split (`R/sweep/best_static.json`), which the
benchmark and LEDE compare against.""",
    params='''split = "eval"  # eval: held-out prompts; dev: the prompts the selection was made on; train: the distillation prompts
category = "all"''',
    cells=[
        ("code", r'''
from matplotlib.patches import Rectangle

report = pd.read_csv(need(R / "exits" / "report.csv"))
heads = {int(k): v for k, v in json.loads(need(R / "exits" / "selected.json").read_text())["heads"].items()}
heads[0] = "lookup"  # layer 0: the prompt-lookup drafter (its rows exist when policy.lookup is on)
chosen = json.loads(need(R / "sweep" / "best_static.json").read_text())["cells"]
rows = report[(report.split == split) & (report.category == category)]
rows = rows[[heads.get(int(l)) == h for l, h in zip(rows.layer, rows["head"])]]
if rows.empty:
    raise ValueError(f"no rows for split={split!r} category={category!r} with the selected heads {heads}")
grid = rows.pivot(index="layer", columns="draft_len", values="replay_speedup").sort_index().sort_index(axis=1)
best_layer, best_k = grid.stack().idxmax()
dev_cell = (chosen[0]["exit_layer"], chosen[0]["draft_len"]) if chosen else None
print(f"best on {split}/{category}: L={best_layer} K={best_k} ({grid.loc[best_layer, best_k]:.3f}x); "
      f"chosen on dev: {dev_cell}")
grid.round(3)'''),
        ("code", r'''
fig, ax = plt.subplots(figsize=(max(1.1 * grid.shape[1] + 5, 10), max(0.6 * grid.shape[0] + 2.4, 4.5)),
                       layout="constrained")
sns.heatmap(grid, ax=ax, annot=True, fmt=".2f", cmap="vlag", center=1.0, linewidths=0.5,
            cbar_kws={"label": "speedup over plain (×)"}, annot_kws={"size": 11})
ax.set_yticklabels(["prompt lookup" if l == 0 else f"L={l}  ({head_label(heads[l])})" for l in grid.index], rotation=0)
ax.set_xticklabels([f"{k}" for k in grid.columns])
ax.set_xlabel("draft length K (tokens drafted per round)")
ax.set_ylabel("exit layer (selected head)")
where = {"eval": "held-out prompts", "dev": "dev prompts", "train": "distillation prompts"}.get(split, split)
ax.set_title(f"Replayed speedup of static self-speculation over plain decoding\n{where}, "
             f"{'all categories' if category == 'all' else category_label(category)}")


def box(cell, **kw):
    i, j = list(grid.index).index(cell[0]), list(grid.columns).index(cell[1])
    ax.add_patch(Rectangle((j + 0.03, i + 0.03), 0.94, 0.94, fill=False, **kw))


handles = [Rectangle((0, 0), 1, 1, fill=False, ec="black", lw=2.5, label=f"best here (L={best_layer}, K={best_k})")]
box((best_layer, best_k), ec="black", lw=2.5)
if dev_cell and dev_cell[0] in grid.index and dev_cell[1] in grid.columns:
    i, j = list(grid.index).index(dev_cell[0]), list(grid.columns).index(dev_cell[1])
    ax.add_patch(Rectangle((j + 0.08, i + 0.08), 0.84, 0.84, fill=False, ec="#009e73", lw=2.5, ls="--"))
    handles.append(Rectangle((0, 0), 1, 1, fill=False, ec="#009e73", lw=2.5, ls="--",
                             label=f"chosen on the dev split (L={dev_cell[0]}, K={dev_cell[1]})"))
ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
save_figure(fig)'''),
        ("code", r'''
table = grid.map(lambda v: fmt(v, 3))
table.loc[best_layer, best_k] += " *"
if dev_cell and dev_cell[0] in grid.index and dev_cell[1] in grid.columns:
    table.loc[dev_cell] += " †"
table.index = ["prompt lookup" if l == 0 else f"L={l} ({head_label(heads[l])})" for l in grid.index]
table.index.name = "Exit layer (head)"
table.columns = [f"K={k}" for k in grid.columns]
write_table([(None, table)], caption=f"Replayed speedup over plain decoding of Static(L, K), {split} split, "
            f"{'all categories' if category == 'all' else category_label(category)}, selected head per layer.",
            note="* best cell on these prompts; † cell chosen on the dev split (the best static baseline).")'''),
    ],
)

# ----------------------------------------------------------------------------------------- exit quality
NOTEBOOKS["exit_quality"] = dict(
    title="Exit quality: agreement with the full model per layer and head",
    intro="""
How often the early exit's greedy token equals the full model's greedy token, per candidate exit layer,
for the plain head (final norm + LM head, full or reduced draft vocabulary) and every trained adapter
(`R/exits/report.csv`, held-out prompts), overall and per Spec-Bench category.""",
    params='''split = "eval"''',
    cells=[
        ("code", r'''
report = pd.read_csv(need(R / "exits" / "report.csv"))
report = report[report.layer > 0]  # layer 0 is prompt lookup, no exit head (its rows are in the static heatmap)
selected = {int(k): v for k, v in json.loads(need(R / "exits" / "selected.json").read_text())["heads"].items()}
ev = (report[report.split == split]  # agreement does not depend on K: one row per (category, layer, head)
      .drop_duplicates(["category", "layer", "head"])[["category", "layer", "head", "agreement", "positions"]])
cats = category_order(ev.category.unique())
head_order = sorted(ev["head"].unique(), key=lambda h: (h != "plain", not h.startswith("plain"), h))
ev = ev.assign(agreement_pct=100 * ev.agreement, head_label=ev["head"].map(head_label),
               category_label=ev.category.map(category_label))
positions = ev.groupby("category").positions.max()
ev.pivot_table(index=["category", "layer"], columns="head", values="agreement").round(3)'''),
        ("code", r'''
ncol = min(4, len(cats))
layers = sorted(ev.layer.unique())
# heads with equal agreement would hide each other: shift each head a little along x (ticks stay on the layers)
gap = min(np.diff(layers)) if len(layers) > 1 else 1
shift = {h: 0.07 * gap * (i - (len(head_order) - 1) / 2) for i, h in enumerate(head_order)}
ev["layer_x"] = ev.layer + ev["head"].map(shift)
g = sns.relplot(data=ev, x="layer_x", y="agreement_pct", hue="head_label", style="head_label", col="category_label",
                col_order=[category_label(c) for c in cats], hue_order=[head_label(h) for h in head_order],
                style_order=[head_label(h) for h in head_order], kind="line", markers=True, dashes=False,
                col_wrap=ncol, height=3.2, aspect=1.15, linewidth=2, markersize=8, facet_kws={"sharey": True},
                alpha=0.9)
for cat, ax in zip(cats, g.axes.flat):
    ax.set_title(f"{category_label(cat)} ({positions[cat]} tokens)")
    ax.set_xticks(layers)
g.set_axis_labels("exit layer L", "agreement with full model (%)")
g.set(ylim=(-2, min(102, ev.agreement_pct.max() * 1.1 + 5)))
sns.move_legend(g, "upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(head_order), title="exit head")
g.figure.suptitle("Early-exit greedy token equal to the full model's, " +
                  {"eval": "held-out prompts", "dev": "dev prompts", "train": "distillation prompts"}.get(split, split), y=1.03,
                  fontweight="bold")
save_figure(g.figure)'''),
        ("code", r'''
sections = []
for cat in cats:
    t = (ev[ev.category == cat].pivot(index="layer", columns="head", values="agreement_pct")
         .reindex(columns=head_order).map(lambda v: fmt(v, 1)))
    t.columns = [head_label(h) for h in t.columns]
    if cat == "all":
        t["selected (train)"] = [head_label(selected[l]) if l in selected else "–" for l in t.index]
    t.index = [f"L={l}" for l in t.index]
    t.index.name = "Exit layer"
    sections.append((f"{category_label(cat)} ({positions[cat]} tokens)", t))
write_table(sections, caption=f"Agreement (%) of the early exit's greedy token with the full model's, {split} split, "
            "per exit layer and head.")'''),
    ],
)

# ----------------------------------------------------------------------------------------- policy behaviour
NOTEBOOKS["policy_behaviour"] = dict(
    title="What the LEDE policy does: exit layers and draft lengths",
    intro="""
From the rounds of every LEDE generation in `R/eval/records.json` (`rounds_detail`: exit layer or a plain
step, tokens drafted, drafts accepted, per round; `pieces`: the output token by token): the share of rounds
at each exit layer and of each draft length, per category, and one generation token by token (each token
coloured by the exit layer whose draft it was, white where the full model produced it, a red mark where
drafts were rejected) and round by round (exit layer chosen, tokens drafted against accepted).""",
    params='''policy = None  # a LEDE config name (e.g. "lede_DiscreteCQL_s0"); None: the first one in the records
example_prompt = None  # the generation shown round by round; None: the prompt with the median speedup
max_tokens_shown = 96  # tokens of the example generation drawn one by one''',
    cells=[
        ("code", r'''
payload, rec = load_records()
lede_cfgs = lede_order(c for c in rec.config.unique() if LEDE_RE.fullmatch(c))
if not lede_cfgs:
    raise ValueError(f"no LEDE policy (lede_*) in {R / 'eval' / 'records.json'}: configs {sorted(rec.config.unique())}")
policy = policy or lede_cfgs[0]
layers = sorted(payload.get("settings", {}).get("layers") or [])
rounds = pd.DataFrame([dict(config=r.config, prompt=r.prompt, category=r.category, round=i,
                            layer=d[0], drafted=d[1], accepted=d[2])
                       for r in rec[rec.config.isin(lede_cfgs)].itertuples() for i, d in enumerate(r.rounds_detail or [])])
layers = sorted(set(layers) | set(rounds.layer.dropna().astype(int)))
exit_names = ["plain step"] + [f"L{l}" for l in layers]
rounds["exit"] = pd.Categorical([("plain step" if pd.isna(l) else f"L{int(l)}") for l in rounds.layer],
                                categories=exit_names, ordered=True)
kmax = int(payload.get("settings", {}).get("policy", {}).get("max_draft_len") or rounds.drafted.max())
cats = groups(rounds.category.unique())
print(f"{policy}: {len(rounds[rounds.config == policy])} rounds over "
      f"{rounds[rounds.config == policy].prompt.nunique()} prompts; candidate layers {layers}, max draft {kmax}")'''),
        ("code", r'''
mine = rounds[rounds.config == policy]
pools = [mine[in_group(mine.category, g)].assign(category=g) for g in cats if g in ("all", NEW_SOURCES)]
with_all = pd.concat([*pools, mine])  # the pooled rows, then each category
order = [category_label(c) for c in cats]
with_all["category_label"] = pd.Categorical(with_all.category.map(category_label), categories=order, ordered=True)

layer_share = pd.crosstab(with_all.category_label, with_all.exit, normalize="index", dropna=False).reindex(
    index=order, columns=exit_names, fill_value=0) * 100
draft_share = pd.crosstab(with_all.category_label, with_all.drafted, normalize="index").reindex(
    index=order, columns=range(0, kmax + 1), fill_value=0) * 100

# the example generation: the prompt whose speedup is the median one for this policy
sp = rec[rec.config == policy].groupby("prompt").speedup.median().sort_values()
example = example_prompt or sp.index[(len(sp) - 1) // 2]
ex = mine[mine.prompt == example].sort_values("round")
ex_rec = rec[(rec.config == policy) & (rec.prompt == example)].iloc[0]

layer_colors = ["#999999"] + sns.color_palette("viridis", len(layers))
ypos_all = {name: i for i, name in enumerate(exit_names)}
draft_colors = ["#999999"] + sns.color_palette("rocket_r", kmax + 1)[1:]
fig = plt.figure(figsize=(14, 14), layout="constrained")
top, middle, bottom = fig.subfigures(3, 1, height_ratios=[1.1, 0.8, 1])
ax_a, ax_b = top.subplots(1, 2)
layer_share.plot.barh(stacked=True, ax=ax_a, color=layer_colors, width=0.75, edgecolor="white", linewidth=0.5)
draft_share.plot.barh(stacked=True, ax=ax_b, color=draft_colors, width=0.75, edgecolor="white", linewidth=0.5)
for ax, title, legend, n in ((ax_a, "Exit layer chosen", "exit layer", len(exit_names)),
                             (ax_b, "Tokens drafted per round", "drafted", kmax + 1)):
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of rounds (%)")
    ax.set_ylabel("")
    ax.set_title(title)
    ax.legend(title=legend, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 if n <= 10 else 2,
              fontsize="small", title_fontsize="small")
ax_b.set_yticklabels([])
top.suptitle(f"{method_label(policy)}: rounds on held-out prompts (n={mine.prompt.nunique()} prompts, "
             f"{len(mine)} rounds)", fontweight="bold")

# token by token: each round emits its accepted drafts (coloured by the exit layer) and one token of the full
# model (white); a red bar marks where the rest of a round's drafts were rejected
ax_t = middle.subplots()
ax_t.set_axis_off()
pieces = ex_rec.pieces if isinstance(getattr(ex_rec, "pieces", None), list) else None
if pieces:
    cols, row_h, x, y, k = 110, 1.0, 0, 0, 0
    spans = []  # (first token, n tokens, colour, rejected after)
    for d in ex.itertuples():
        name = "plain step" if pd.isna(d.layer) else f"L{int(d.layer)}"
        spans.append((k, int(d.accepted), layer_colors[ypos_all[name]], False))
        spans.append((k + int(d.accepted), 1, "white", int(d.drafted) > int(d.accepted)))
        k += int(d.accepted) + 1
    for first, n, color, rejected in spans:
        for t in range(first, min(first + n, len(pieces), max_tokens_shown)):
            text = pieces[t].replace("\n", "⏎").replace("\t", "→").replace("$", r"\$") or "∅"
            if x + len(text) > cols:
                x, y = 0, y - row_h
            if rejected and t == first:  # after the wrap, so the bar stands before its token
                ax_t.plot([x - 0.15, x - 0.15], [y - 0.45, y + 0.45], color="#d62728", lw=2.5)
            r, g, b = matplotlib.colors.to_rgb(color)
            ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"  # readable on dark fills
            ax_t.text(x, y, text, family="monospace", fontsize=9, va="center", ha="left", color=ink,
                      bbox=dict(boxstyle="square,pad=0.12", facecolor=color, edgecolor="0.6", linewidth=0.4))
            x += len(text) + 0.6
            if pieces[t].endswith("\n"):  # the text's own line breaks
                x, y = 0, y - row_h
    ax_t.set_xlim(-1, cols + 1)
    ax_t.set_ylim(min(y, -7 * row_h) - 0.8, 0.8)  # at least 8 rows tall, so the marks keep their size
    handles = [matplotlib.patches.Patch(facecolor=c, edgecolor="0.6", label=n) for n, c in zip(exit_names, layer_colors)
               if n != "plain step"]
    handles += [matplotlib.patches.Patch(facecolor="white", edgecolor="0.6", label="full model's token"),
                matplotlib.lines.Line2D([], [], color="#d62728", lw=2.5, label="drafts rejected")]
    ax_t.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 7),
                fontsize="small")
    shown = min(len(pieces), max_tokens_shown)
    middle.suptitle(f"The same generation token by token (first {shown} of {len(pieces)} tokens)", fontweight="bold")
    print(f"example {example}: drawn token by token (first {shown} of {len(pieces)} tokens)")
else:
    ax_t.text(0.5, 0.5, "these records hold no token pieces (written before bench.BenchRecord.pieces existed): "
              "rerun the evaluate rule to draw the generation token by token", ha="center", va="center")

ax_c, ax_d = bottom.subplots(2, 1, sharex=True, height_ratios=[1, 1.2])
ypos = {name: i for i, name in enumerate(exit_names)}
ax_c.scatter(ex["round"], [ypos[e] for e in ex.exit], c=[layer_colors[ypos[e]] for e in ex.exit], s=70,
             edgecolor="black", linewidth=0.5, zorder=3)
ax_c.plot(ex["round"], [ypos[e] for e in ex.exit], color="0.7", lw=1, zorder=2)
ax_c.set_yticks(range(len(exit_names)), exit_names)
ax_c.set_ylim(-0.5, len(exit_names) - 0.5)
ax_c.set_ylabel("exit layer")
ax_d.bar(ex["round"], ex.drafted, color="white", edgecolor="0.3", linewidth=1.2, width=0.8, label="drafted")
ax_d.bar(ex["round"], ex.accepted, color="#0072b2", width=0.8, label="accepted")
ax_d.set_ylabel("tokens")
ax_d.set_xlabel("round index")
ax_d.set_ylim(0, kmax + 0.5)
ax_d.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
ax_d.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
ax_d.legend(loc="center left", bbox_to_anchor=(1.005, 0.5), fontsize="small")
bottom.suptitle(f"One generation round by round: prompt {example} ({category_label(ex_rec.category)}), "
                f"{ex_rec.new_tokens} tokens in {len(ex)} rounds, {ex_rec.speedup:.2f}× plain decoding", fontweight="bold")
save_figure(fig)'''),
        ("code", r'''
sections = []
for cfg in lede_cfgs:
    rs = rounds[rounds.config == cfg]
    rows = {}
    for cat in cats:
        r = rs[in_group(rs.category, cat)]
        share = r.exit.value_counts(normalize=True).reindex(exit_names, fill_value=0) * 100
        drafting = r[r.drafted > 0]
        rows[category_label(cat)] = {"rounds": str(len(r)), **{f"{e} (%)": fmt(share[e], 1) for e in exit_names},
                                     "mean drafted": fmt(r.drafted.mean(), 2),
                                     "mean accepted": fmt(r.accepted.mean(), 2),
                                     "acceptance (%)": fmt(100 * drafting.accepted.sum() / max(drafting.drafted.sum(), 1), 1)}
    t = pd.DataFrame(rows).T
    t.index.name = "Category"
    sections.append((method_label(cfg), t))
write_table(sections, caption="LEDE's choices on held-out prompts: share of rounds per exit layer (or plain step), "
            "mean tokens drafted and accepted per round, and the acceptance rate of drafted tokens.")'''),
    ],
)

# ----------------------------------------------------------------------------------------- training curves
NOTEBOOKS["training_curves"] = dict(
    title="Offline RL training curves",
    intro="""
Per epoch of d3rlpy training (`R/rl/history_{algo}_s{seed}.csv`, one file per algorithm and seed): the
mean squared TD error on the logged episodes, the estimated value of the initial states (in the reward's
units: tokens gained over plain decoding in the same time, see `lede.rl.features`) and the training loss.
DiscreteBC has no Q-function, hence no TD error or value.""",
    params="",
    cells=[
        ("code", r'''
files = sorted((R / "rl").glob("history_*_s*.csv"))
if not files:
    raise FileNotFoundError(f"no {R / 'rl' / 'history_*_s*.csv'}: run the train_policy rule first")
frames = []
for f in files:
    m = re.fullmatch(r"history_(?P<algo>.+)_s(?P<seed>\d+)\.csv", f.name)
    frames.append(pd.read_csv(f).assign(algo=m["algo"], seed=int(m["seed"])))
hist = pd.concat(frames, ignore_index=True)
METRICS = {"td_error": "TD error (mean squared, tokens²)",
           "initial_state_value": "Initial-state value (tokens gained)",
           "fqe_initial_state_value": "FQE initial-state value (tokens gained)", "loss": "Training loss"}
metrics = [m for m in METRICS if m in hist and hist[m].notna().any()]
runs = hist.groupby(["algo", "seed"]).epoch.max()
print("runs (algo, seed → epochs):", runs.to_dict(), "; metrics:", metrics, "; all columns:", list(hist.columns))
hist.head()'''),
        ("code", r'''
fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.2), layout="constrained", squeeze=False)
hist["algorithm"], hist["seed "] = hist.algo, hist.seed.astype(str)
algo_order = sorted(hist.algo.unique(), key=lambda a: (ALL_ALGOS.index(a) if a in ALL_ALGOS else len(ALL_ALGOS), a))
for ax, m in zip(axes.flat, metrics):
    sns.lineplot(data=hist, x="epoch", y=m, hue="algorithm", style="seed ", markers=True, dashes=False, ax=ax,
                 hue_order=algo_order, linewidth=2, markersize=7, legend="full")
    ax.set_xlabel("epoch")
    ax.set_ylabel(METRICS[m])
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    vals = hist[m].dropna()
    if (vals > 0).all() and vals.max() / vals.min() > 50:
        ax.set_yscale("log")
    ax.set_title(METRICS[m].split(" (")[0])
# one legend for the figure, from the panel that shows every algorithm (DiscreteBC has no TD error)
handles, labels = max((ax.get_legend_handles_labels() for ax in axes.flat), key=lambda hl: len(hl[1]))
for ax in axes.flat:
    ax.get_legend().remove()
fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize="small")
fig.suptitle("Offline RL training (d3rlpy), per algorithm and seed", fontweight="bold")
save_figure(fig)'''),
        ("code", r'''
rows = {}
for (algo, seed), h in hist.sort_values("epoch").groupby(["algo", "seed"]):
    last = h.iloc[-1]
    rows[f"{algo}, seed {seed}"] = {"epochs": str(int(last.epoch)),
                                    **{f"final {METRICS[m].split(' (')[0].replace('Initial', 'initial').replace('Training ', '')}":
                                       fmt(last.get(m, np.nan), 4) for m in metrics},
                                    **({"min TD error": fmt(h.td_error.min(), 4)} if "td_error" in metrics else {})}
table = pd.DataFrame(rows).T
table.index.name = "Algorithm, seed"
write_table([(None, table)], caption="Offline RL training: values at the last epoch per algorithm and seed.")'''),
    ],
)

# ----------------------------------------------------------------------------------------- ablations
NOTEBOOKS["ablations"] = dict(
    title="Ablations: RL algorithm and seeds",
    intro="""
The speedup of every trained LEDE policy in `R/eval/records.json` (configs `lede_{algo}_s{seed}`),
grouped by algorithm, with the spread over seeds as error bars (mean ± standard deviation of the
per-seed median speedups), against the best static configuration and the oracle. The other ablations
of the README (reward weight, candidate exit layers, adapter designs, feature subsets) need a rerun of
the workflow with a changed config; the cell below says which of them this results directory holds.""",
    params="",
    cells=[
        ("code", r'''
payload, rec = load_records()
settings = payload.get("settings", {})
pol = settings.get("policy", {})
pp = per_prompt(rec)
lede_cfgs = lede_order(c for c in pp.config.unique() if LEDE_RE.fullmatch(c))
if not lede_cfgs:
    raise ValueError(f"no LEDE policy (lede_*) in {R / 'eval' / 'records.json'}")
cats = groups(pp.category.unique())
tps = rec.groupby(["config", "category", "prompt"]).tokens_per_s.median()
rows = []
for cfg in lede_cfgs + ["best_static", "oracle"]:
    m = LEDE_RE.fullmatch(cfg)
    for cat in cats:
        sub = pp[(pp.config == cfg) & in_group(pp.category, cat)]
        r = rec[(rec.config == cfg) & in_group(rec.category, cat)]
        vs = (tps[cfg] / tps["best_static"]).reset_index() if cfg in tps and "best_static" in tps else None
        gain = (100 * (vs[in_group(vs.category, cat)].tokens_per_s.median() - 1)) if vs is not None else np.nan
        rows.append(dict(config=cfg, algo=m["algo"] if m else cfg, seed=int(m["seed"]) if m else -1, category=cat,
                         speedup=sub.speedup.median(), tokens_per_round=r.mean_accepted.mean(), gain=gain))
per_run = pd.DataFrame(rows)
lede = per_run[per_run.config.isin(lede_cfgs)]
algos = sorted(lede.algo.unique(), key=lambda a: ALL_ALGOS.index(a) if a in ALL_ALGOS else len(ALL_ALGOS))
seeds = {a: sorted(lede[lede.algo == a].seed.unique()) for a in algos}
refs = per_run[~per_run.config.isin(lede_cfgs) & (per_run.category == "all")].set_index("config").speedup

# which ablations this results directory holds, and which it does not
run = [f"RL algorithm: {', '.join(algos)}" + (f" (not run: {', '.join(a for a in ALL_ALGOS if a not in algos)})"
                                              if set(ALL_ALGOS) - set(algos) else "")]
run.append("seeds: " + "; ".join(f"{a}: {', '.join(map(str, s))}" for a, s in seeds.items()))
not_run = []
if all(len(s) < 2 for s in seeds.values()):
    not_run.append("seed variance: one seed per algorithm, so no error bars")
not_run.append(f"reward weight: only policy.reward_weight = {pol.get('reward_weight', '?')} (one value per run)")
not_run.append(f"candidate exit layers: only exits.layers = {settings.get('layers', '?')}, "
               f"max draft length {pol.get('max_draft_len', '?')} (one candidate set per run)")
not_run.append("feature subsets: the state features are fixed in lede.rl.features (no config key), not ablated")
statement = ("**Run here:** " + "; ".join(run) + ".\n\n**Not run by this config:**\n\n"
             + "\n".join(f"- {s}" for s in not_run))
display(Markdown(statement))'''),
        ("code", r'''
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.8), width_ratios=[1, 1.8], layout="constrained")
overall = lede[lede.category == "all"]
agg = overall.groupby("algo").speedup.agg(["mean", "std", "count"]).reindex(algos)
x = np.arange(len(algos))
ax1.errorbar(x, agg["mean"], yerr=agg["std"].fillna(0), fmt="D", color="#d55e00", ecolor="black", capsize=8,
             lw=1.5, markersize=10, label="mean ± SD over seeds", zorder=2)
for i, a in enumerate(algos):
    ys = overall[overall.algo == a].speedup
    ax1.scatter(np.full(len(ys), i) + 0.15 + np.linspace(0, 0.1, len(ys)), ys, color="black", s=25, zorder=3,
                label="one seed" if i == 0 else None)
for cfg, style in (("best_static", "--"), ("oracle", ":")):
    if cfg in refs:
        ax1.axhline(refs[cfg], color="0.3", ls=style, lw=1.5, label=f"{method_label(cfg)} ({refs[cfg]:.2f}×)")
ax1.axhline(1.0, color="0.6", lw=1)
ax1.set_xticks(x, algos)
ax1.set_xlim(-0.6, len(algos) - 0.4)
ax1.set_xlabel("offline RL algorithm")
ax1.set_ylabel("median speedup over plain decoding (×)")
ax1.margins(y=0.15)
one_seed = all(len(s) < 2 for s in seeds.values())
ax1.set_title("All categories" + (" (one seed: no error bars)" if one_seed else ""))
ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize="small")

by_cat = per_run[per_run.category != "all"].assign(category_label=lambda d: d.category.map(category_label))
by_cat["method"] = by_cat.algo.map(lambda a: a if a in algos else method_label(a))
hue_order = algos + [method_label(c) for c in ("best_static", "oracle") if c in refs]
sns.pointplot(data=by_cat, x="category_label", y="speedup", hue="method", hue_order=hue_order,
              order=[category_label(c) for c in cats[1:]], errorbar="sd", dodge=0.35, capsize=0.1, ax=ax2,
              markers=["o", "s", "D", "^", "v", "P"][:len(hue_order)], linestyles="none")
ax2.axhline(1.0, color="0.6", lw=1)
ax2.set_xlabel("Spec-Bench category")
ax2.set_ylabel("median speedup over plain decoding (×)")
ax2.set_title("Per category" + ("" if one_seed else " (error bars: SD over seeds)"))
plt.setp(ax2.get_xticklabels(), rotation=25, ha="right", rotation_mode="anchor")
sns.move_legend(ax2, "center left", bbox_to_anchor=(1.01, 0.5), ncol=1, title=None, fontsize="small")
fig.suptitle("LEDE ablation over RL algorithms and seeds", fontweight="bold")
save_figure(fig)'''),
        ("code", r'''
rows = {}
for a in algos:
    o = overall[overall.algo == a]
    rows[a] = {"seeds": str(len(o)), "speedup mean (×)": fmt(o.speedup.mean(), 3),
               "SD over seeds": fmt(o.speedup.std(), 3) if len(o) > 1 else "–",
               "min": fmt(o.speedup.min(), 3), "max": fmt(o.speedup.max(), 3),
               "tokens/round": fmt(o.tokens_per_round.mean(), 2),
               "vs best static (%)": fmt(o.gain.mean(), 1, sign=True)}
for cfg in ("best_static", "oracle"):
    if cfg in refs:
        o = per_run[(per_run.config == cfg) & (per_run.category == "all")]
        rows[method_label(cfg)] = {"seeds": "–", "speedup mean (×)": fmt(refs[cfg], 3), "SD over seeds": "–",
                                   "min": "–", "max": "–", "tokens/round": fmt(o.tokens_per_round.mean(), 2),
                                   "vs best static (%)": fmt(o.gain.mean(), 1, sign=True)}
table = pd.DataFrame(rows).T
table.index.name = "Algorithm"
write_table([(None, table)], caption="LEDE per offline RL algorithm: median speedup over plain decoding on held-out "
            "prompts (all categories), mean and spread over seeds; vs best static: median over prompts of the "
            "per-prompt ratio to the best static configuration, minus 1 (mean over seeds).", note=" ".join(["Not run by this config:"] + [s + ";" for s in not_run[:-1]] + [not_run[-1] + "."]))'''),
    ],
)


# ----------------------------------------------------------------------------------------- quality parity
NOTEBOOKS["quality_parity"] = dict(
    title="Quality parity with plain decoding on the offline lm-eval suite",
    intro="""
The `parity` rule's report (`R/parity/parity.csv`, `R/parity/differences.csv`): for every task of the offline
suite and every method, the task metric, its difference to plain decoding over the same documents with a paired
bootstrap 95 % interval, and the output identity rate (share of generated outputs equal to plain decoding's).
Greedy self-speculation is exact in exact arithmetic: a difference is either a numerical near-tie (small top-2
margin of the full model where the outputs first differ) or a bug (large margin); every one is listed.""",
    params='''identity_target = 0.99  # the greedy identity rate the study requires per task''',
    cells=[
        ("code", r'''
rows = pd.read_csv(need(R / "parity" / "parity.csv"))
diffs = pd.read_csv(need(R / "parity" / "differences.csv"))
methods = method_order(m for m in rows.method.unique() if m != "plain")
tasks = sorted(rows.task.unique())
cmp = rows[rows.method != "plain"].copy()
cmp["within_ci"] = ((cmp.ci_low <= 0) & (cmp.ci_high >= 0)) | (cmp["diff"] == 0)
ident = (cmp.groupby(["task", "method"]).identity_rate.first().unstack("method")
         .reindex(index=tasks, columns=methods))
docs = rows[rows.method == "plain"].groupby("task").n_outputs.max()
display(Markdown(f"{len(tasks)} tasks × {len(methods)} methods; generated outputs per task: "
                 + ", ".join(f"{t} {int(n)}" for t, n in docs.items())
                 + f". Outputs that differ from plain decoding: {len(diffs)}."))'''),
        ("code", r'''
groups = list(cmp.groupby(["task", "metric"]).groups)
keys = [f"{t} · {m}" for t, m in groups]
ypos = {k: i for i, k in enumerate(keys)}
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.45 * len(keys) + 2.5), width_ratios=[1.6, 1],
                               layout="constrained")
offsets = np.linspace(-0.25, 0.25, len(methods)) if len(methods) > 1 else [0.0]
for off, meth, color in zip(offsets, methods, sns.color_palette("colorblind", len(methods))):
    sub = cmp[cmp.method == meth]
    y = np.array([ypos[f"{t} · {m}"] for t, m in zip(sub.task, sub.metric)]) + off
    err = np.vstack([sub["diff"] - sub.ci_low, sub.ci_high - sub["diff"]]).clip(min=0)
    ax1.errorbar(sub["diff"], y, xerr=err, fmt="o", color=color, capsize=3, label=method_label(meth))
ax1.axvline(0, color="0.3", lw=1)
ax1.set_yticks(range(len(keys)), keys)
ax1.invert_yaxis()
ax1.set_xlabel("metric − plain decoding's (95 % paired bootstrap CI)")
ax1.set_title("Metric difference per task and metric")
ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(3, len(methods)), fontsize="small")
sns.heatmap(ident.rename(columns=method_label), annot=True, fmt=".2f", vmin=0.9, vmax=1.0, cmap="viridis",
            cbar_kws={"label": "output identity with plain decoding"}, ax=ax2)
ax2.set_xlabel("")
ax2.set_ylabel("")
ax2.set_title(f"Greedy output identity (target ≥ {identity_target:.0%})")
plt.setp(ax2.get_xticklabels(), rotation=25, ha="right", rotation_mode="anchor")
plt.setp(ax2.get_yticklabels(), rotation=0)
fig.suptitle("Quality parity: self-speculative decoding vs plain decoding", fontweight="bold")
save_figure(fig)'''),
        ("code", r'''
plain = rows[rows.method == "plain"].set_index(["task", "metric"])
sections = []
for meth in methods:
    sub = cmp[cmp.method == meth].set_index(["task", "metric"])
    table = pd.DataFrame({
        "n": sub.n.astype(int).astype(str),
        "plain": plain.value.reindex(sub.index).map(lambda v: fmt(v, 3)),
        "method": sub.value.map(lambda v: fmt(v, 3)),
        "diff [95 % CI]": [f"{fmt(d, 3, sign=True)} [{fmt(lo, 3, sign=True)}, {fmt(hi, 3, sign=True)}]"
                           for d, lo, hi in zip(sub["diff"], sub.ci_low, sub.ci_high)],
        "identity": [f"{int(i)}/{int(n)}" if n else "–" for i, n in zip(sub.identical, sub.n_outputs)],
        "speed-up (×)": sub.speedup.map(lambda v: fmt(v, 2)),
    }, index=sub.index)
    table.index = [f"{t} · {m}" for t, m in table.index]
    table.index.name = "Task · metric"
    sections.append((method_label(meth), table))
bad = cmp[~cmp.within_ci]
low = int((ident < identity_target).to_numpy().sum())
margins = diffs.margin.dropna() if len(diffs) else pd.Series(dtype=float)
note = (f"{len(diffs)} outputs differ from plain decoding"
        + (f" (full model's top-2 margin at the first difference: median {margins.median():.3g}, "
           f"max {margins.max():.3g})" if len(margins) else "")
        + f"; {len(bad)} task-metric-method rows whose CI excludes 0; {low} task-method pairs below "
        + f"{identity_target:.0%} identity. Speed-up: tokens/s over a task's requests relative to plain decoding's "
        "(sequential runs, not interleaved: the speed table holds the measured speed-ups).")
write_table(sections, caption="Quality parity with plain decoding: task metric, difference with a paired "
            "bootstrap 95 % interval, greedy output identity.", note=note)
if len(diffs):
    display(diffs)'''),
    ],
)



def build(out_dir: Path = HERE) -> list[Path]:
    paths = []
    for name, spec in NOTEBOOKS.items():
        nb = notebook(name, spec["title"], spec["intro"], spec["params"], spec["cells"])
        nbformat.validate(nb)
        path = out_dir / f"{name}.ipynb"
        path.write_text(nbformat.writes(nb) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print("wrote", p)
