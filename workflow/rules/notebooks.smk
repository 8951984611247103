# Stage 6: the paper's figures and tables. One papermill job per notebook under notebooks/ (written by
# notebooks/build_notebooks.py); each reads only results files and writes its executed copy, one figure
# (PNG + PDF) and one table (Markdown + LaTeX).
import os

NOTEBOOK_INPUTS = {
    "speedup_table": [rules.evaluate.output.json],
    "static_heatmap": [rules.exit_report.output.csv, rules.exit_report.output.selected, rules.exit_report.output.best],
    "exit_quality": [rules.exit_report.output.csv, rules.exit_report.output.selected],
    "policy_behaviour": [rules.evaluate.output.json],
    "training_curves": expand(rules.train_policy.output.history, algo=POLICY["algos"], seed=POLICY["seeds"]),
    "ablations": [rules.evaluate.output.json],
    "quality_parity": [rules.parity.output.csv, rules.parity.output.diffs],
}
NOTEBOOKS = list(NOTEBOOK_INPUTS)
# every file the notebook jobs write (an input of rule all)
NOTEBOOK_OUTPUTS = expand(
    [f"{R}/notebooks/{{nb}}.ipynb", f"{R}/figures/{{nb}}.png", f"{R}/figures/{{nb}}.pdf",
     f"{R}/tables/{{nb}}.md", f"{R}/tables/{{nb}}.tex"],
    nb=NOTEBOOKS,
)


rule notebook:
    """Runs notebooks/{notebook}.ipynb with papermill on the results directory (kernel python3: the
    environment's own, which ipykernel installs)."""
    input:
        nb="notebooks/{notebook}.ipynb",
        data=lambda wc: NOTEBOOK_INPUTS[wc.notebook],
    output:
        nb=f"{R}/notebooks/{{notebook}}.ipynb",
        png=report(f"{R}/figures/{{notebook}}.png", caption="../report/figures.rst", category="Figures",
                   subcategory="{notebook}"),
        pdf=f"{R}/figures/{{notebook}}.pdf",
        md=report(f"{R}/tables/{{notebook}}.md", caption="../report/tables.rst", category="Tables",
                  subcategory="{notebook}"),
        tex=f"{R}/tables/{{notebook}}.tex",
    params:
        # the results directory, R: where the inputs are and where figures/ and tables/ go
        results=lambda wc, output: os.path.dirname(os.path.dirname(output.nb)),
    wildcard_constraints:
        notebook="|".join(NOTEBOOKS),
    log:
        f"{R}/notebooks/{{notebook}}.log",
    conda:
        "../envs/lede.yaml"
    shell:
        # figures and tables are written atomically by the notebook (lede.core.io.atomic_path); the executed
        # notebook goes to a unique temporary name beside its output and is renamed onto it when papermill succeeds
        "tmp=$(mktemp --suffix=.tmp.ipynb {output.nb:q}.XXXXXX) && trap 'rm -f \"$tmp\"' EXIT &&"
        " MPLBACKEND=Agg papermill {input.nb:q} \"$tmp\" -r results_dir {params.results:q}"
        " -r out_dir {params.results:q} -k python3 --no-progress-bar > {log:q} 2>&1 &&"
        " sync \"$tmp\" && mv -f \"$tmp\" {output.nb:q}"
