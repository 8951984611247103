"""The decoding core: model loading as transformers builds it, CPU kernels, the KV cache and the engine's
draft → verify → accept round, the ``Policy`` protocol, prompt lookup, exit heads and the cost model as data.
Imports nothing from the layers above (drafters, rl, eval)."""
