# Stage 6: the paper's figures and tables. One papermill job per notebook under notebooks/ (written by
# notebooks/build_notebooks.py); each reads only results files and writes its executed copy, one figure
# (PNG + PDF) and one table (Markdown + LaTeX).
import os

NOTEBOOK_INPUTS = {
    "speedup_table": [f"{R}/eval/records.json"],
    "static_heatmap": [f"{R}/exits/report.csv", f"{R}/exits/selected.json", f"{R}/sweep/best_static.json"],
    "exit_quality": [f"{R}/exits/report.csv", f"{R}/exits/selected.json"],
    "policy_behaviour": [f"{R}/eval/records.json"],
    "training_curves": expand(f"{R}/rl/history_{{algo}}_s{{seed}}.csv", algo=POLICY["algos"], seed=POLICY["seeds"]),
    "ablations": [f"{R}/eval/records.json"],
    "quality_parity": [f"{R}/parity/parity.csv", f"{R}/parity/differences.csv"],
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
