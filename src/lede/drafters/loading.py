"""``load_model``: the studied model, composed from the layers below — the base model as transformers loads it
(``lede.core.model``), an early-exit variant's deltas merged in (``lede.drafters.early_exit``), and the CPU
linear kernels swapped in and, with ``kernels="auto"``, timed (``lede.core.kernels``, ``lede.core.tuning``).

    from lede import load_model
    lm = load_model("smollm2-135m")          # the embedded default, offline
    lm = load_model("facebook/layerskip-llama3.2-1B", dtype="bfloat16", device="cuda")
    lm = load_model("smollm2-135m", cache_dir="resources/models")  # GGUF converted once, then ~1 s a load
"""

from __future__ import annotations

import logging
import os

from collections.abc import Sequence
from pathlib import Path

import torch

from lede.core.fastpath import FastLayers, supports
from lede.core.kernels import KERNEL_OPTIONS, KernelChoice, available_kernels, set_linear_kernels, use_cpu_kernels
from lede.core.model import EARLY_EXIT_SUFFIX, SMOLLM2_ALIAS, LoadedModel, ModelError, load_base_model
from lede.core.tuning import tune_cpu_kernels
from lede.drafters.early_exit import merge_early_exit, read_early_exit

log = logging.getLogger(__name__)


def load_model(
    spec: str = SMOLLM2_ALIAS,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    kernels: str | KernelChoice = "lede",
    early_exit_weights: str | Path | None = None,
    cache_dir: str | os.PathLike | None = None,
    fast_layers: bool = True,
    compiled: bool = False,
    compile_cuts: Sequence[int] = (),
) -> LoadedModel:
    """Load a causal LM by alias, local path or Hugging Face id; refuse unsupported architectures.

    ``dtype``/``device`` default to float32 on CPU, bfloat16 on CUDA (CUDA when available).
    ``kernels``: on CPU in float32, the linear kernels of ``lede.core.kernels``: ``"onednn"`` (oneDNN-prepacked,
    batch-invariant), ``"lede"`` (its two-row GEMM; this function's default, so library calls and tests compute alike
    on every run), ``"torch"`` transformers' layers untouched (training), ``"auto"`` (the study's and the CLI's
    default) times every available kernel for one-token and several-token passes at load and keeps oneDNN's unless
    another is faster by over 10% (~5 s; ``LoadedModel.kernels`` says which). Without oneDNN in the torch build
    ``auto`` says so in one warning and chooses among the others; ``"onednn"`` is a ModelError. A ``KernelChoice``
    sets the two widths as given, untimed (the study's jobs take the one its cost model was timed on).
    ``early_exit_weights``: an artefact of ``lede.drafters.early_exit`` for this base model; its deltas are merged
    into the weights and the model is named ``<base>-ee``. ``spec`` may name the variant itself
    (``smollm2-135m-ee``): then the weights are required.
    ``cache_dir``: convert a GGUF alias there once and load the converted folder (``lede.core.model.convert_gguf``).
    ``fast_layers``: with lede's kernels, the engine runs the decoder layers through ``lede.core.fastpath`` (fused
    q/k/v and gate/up GEMMs, fewer ops; ``LoadedModel.fast_layers``) where the architecture allows.
    ``compiled``: also compile those layers with TorchInductor (``lede.core.compiled.CompiledLayers``, frozen
    weights, its C++ GEMM template), cut into segments at ``compile_cuts`` (the exit layers to draft from through
    compiled graphs), and the LM head for products of a few rows (``LinearGraph``); compiled here, before returning
    (minutes on a small CPU: ``fast_layers.compile_s``). Without a C++ compiler, or where the lean forward does not
    apply, one warning and the eager forward.
    """
    fixed = kernels if isinstance(kernels, KernelChoice) else None
    if fixed is not None:
        missing = {fixed.one_token, fixed.many_tokens} - set(available_kernels())
        if missing:
            raise ModelError(f"kernels ({fixed}): {sorted(missing)} not available in this torch build: use one of "
                             f"{available_kernels()}")
        kernels = "fixed"
    elif kernels not in KERNEL_OPTIONS:
        raise ModelError(f"kernels={kernels!r}: expected one of {KERNEL_OPTIONS}")
    if kernels == "onednn" and "onednn" not in available_kernels():
        raise ModelError("kernels='onednn': this torch build has no oneDNN (torch.backends.mkldnn is unavailable): "
                         f"use one of {tuple(k for k in KERNEL_OPTIONS if k != 'onednn')}")
    base = spec[: -len(EARLY_EXIT_SUFFIX)] if spec.endswith(EARLY_EXIT_SUFFIX) and not Path(spec).exists() else spec
    if base != spec and early_exit_weights is None:
        raise ModelError(
            f"model {spec!r} is the early-exit-trained variant of {base!r}: pass its weights "
            "(early_exit_weights= / --early-exit-weights FILE), made by `snakemake early_exit`"
        )
    # a missing or foreign file fails before the model loads
    blob = read_early_exit(early_exit_weights) if early_exit_weights is not None else None
    lm = load_base_model(base, dtype=dtype, device=device, cache_dir=cache_dir)
    if blob is not None:
        merge_early_exit(lm.model, base, blob, str(early_exit_weights))  # before use_cpu_kernels wraps the linears
        lm.name, lm.draft_vocab = base + EARLY_EXIT_SUFFIX, blob.get("vocab")
    if kernels != "torch" and lm.device.type == "cpu" and lm.dtype == torch.float32:
        use_cpu_kernels(lm.model)
        why = supports(lm.model) if fast_layers else "fast_layers=False"
        lm.fast_layers = FastLayers(lm.model) if why is None else None
        if why is not None:
            log.info("the engine runs the model's own layers: %s", why)
        if kernels == "auto" and "onednn" not in available_kernels():
            log.warning("oneDNN is not in this torch build: the CPU kernels are chosen among %s", available_kernels())
        lm.kernels = (fixed or tune_cpu_kernels(lm) if kernels in ("auto", "fixed")
                      else KernelChoice(kernels, kernels))
        set_linear_kernels(lm.model, lm.kernels.one_token, lm.kernels.many_tokens)
        log.info("CPU linear kernels: %s (%s)", lm.kernels,
                 ", ".join(f"{k} {v:.1f} ms" for k, v in lm.kernels.ms.items()) or "not timed")
    if compiled:
        _compile_layers(lm, compile_cuts)
    return lm


def _compile_layers(lm: LoadedModel, cuts: Sequence[int]) -> None:
    """Swap ``lm.fast_layers`` for its TorchInductor-compiled segments, compiled now; warn once and stay eager where
    that cannot be done."""
    from lede.core.compiled import CompiledLayers, compiler_problem

    problem = "the engine does not run the lean layer forward on this model (GPU, not float32, kernels='torch' or " \
              "an unsupported architecture)" if lm.fast_layers is None else compiler_problem()
    if problem:
        log.warning("compiled=True: the decoder layers stay eager: %s", problem)
        return
    bad = [c for c in cuts if not 0 < int(c) < lm.num_layers]
    if bad:
        raise ModelError(f"compile_cuts {bad}: exit layers must lie in 1..{lm.num_layers - 1} for {lm.name}")
    layers = CompiledLayers(lm.fast_layers, cuts, head=lm.model.lm_head)
    seconds = layers.warm(lm.hidden_size, lm.dtype, lm.device)
    log.info("decoder layers compiled by TorchInductor in %d segments (cuts %s)%s: %.0f s", len(layers.segments),
             layers.cuts, " and one graph over all layers" if layers.whole is not None else "", seconds)
    lm.fast_layers = layers
