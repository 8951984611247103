"""Drafters built on the core: self-distillation data, exit adapters, the early-exit variant and their report,
and ``load_model``, which composes the base model, an early-exit merge and the CPU kernels."""
