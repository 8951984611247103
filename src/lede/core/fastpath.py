"""A lean forward of LLaMA-family decoder layers for the engine: the same maths as transformers' layers in fewer
ops, over the engine's KV cache.

A decoding pass of a small model runs ~100 eager ops per layer through transformers' modules (norms as six ops,
three q/k/v GEMMs, rotary as eight ops per tensor, the attention interface, two MLP input GEMMs); on a CPU each op
costs microseconds of dispatch, which adds up to a sizeable share of a pass bound by reading ~0.5 GB of weights.
``FastLayers`` runs the same layer with ``F.rms_norm``, one GEMM for q/k/v and one for gate/up
(``CpuLinear.fused``: each weight read once, on the model's kernels), rotary on the stacked q/k heads, and SDPA
with grouped-query attention. Computed values equal transformers' up to float rounding (tests/test_fastpath.py);
plain decoding and every speculative pass go through it alike.

Used by ``lede.core.engine.Decoder`` for layers it supports (``supports``: LLaMA, Mistral without a sliding window
shorter than the model's positions, Qwen2; not Qwen3's q/k norms) when the model's linears are
``lede.core.kernels.CpuLinear`` (CPU float32 with lede's kernels); otherwise the engine calls the layers themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lede.core.kernels import CpuLinear

_SUPPORTED = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}


def supports(model: nn.Module) -> str | None:
    """None if ``FastLayers`` can run every decoder layer of ``model`` (a causal LM), else why not."""
    cfg = model.config
    layers = model.model.layers
    kinds = {type(layer).__name__ for layer in layers}
    if not kinds <= _SUPPORTED:
        return f"decoder layers {sorted(kinds - _SUPPORTED)} are not LLaMA-style"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} is not silu"
    window = getattr(cfg, "sliding_window", None)
    if window is not None and window < cfg.max_position_embeddings:
        return f"a sliding window of {window} tokens"
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        if not all(isinstance(x, CpuLinear) for x in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj,
                                                     m.down_proj)):
            return "the linears are not lede's CpuLinear (kernels='torch', GPU or not float32)"
    return None


@dataclass
class _Layer:
    """One decoder layer's pieces: norms (weight, eps), fused q/k/v and gate/up, o and down (the model's own)."""

    ln1: torch.Tensor
    eps1: float
    qkv: CpuLinear
    o: CpuLinear
    ln2: torch.Tensor
    eps2: float
    gate_up: CpuLinear
    down: CpuLinear


class LayerStack(Protocol):
    """What the engine runs the decoder layers through (``LoadedModel.fast_layers``): ``FastLayers`` (eager) or
    ``lede.core.compiled.CompiledLayers`` (compiled segments over a ``FastLayers``)."""

    layers: list
    #: the LM head's compiled product (``lede.core.compiled.LinearGraph``: ``takes(x)``, ``__call__(x)``), or None
    head: object

    def run(self, i: int, h: torch.Tensor, cache, mask, cos, sin) -> torch.Tensor:
        """Layer i on h [1, T, D], appending its K/V to ``cache``."""

    def run_range(self, start: int, end: int, h: torch.Tensor, cache, mask, cos, sin) -> torch.Tensor:
        """Layers [start, end) on h [1, T, D] at positions cache.lengths[start] .. +T-1, appending their K/V."""

    @property
    def eager(self) -> "FastLayers":
        """The eager lean forward underneath (itself for ``FastLayers``): the probes time kernels on it."""


class FastLayers:
    """The lean forward of every decoder layer of ``model``; ``run(i, h, cache, mask, cos, sin)`` is layer i
    (a ``LayerStack``)."""

    def __init__(self, model: nn.Module):
        why = supports(model)
        if why:
            raise ValueError(f"FastLayers cannot run this model: {why}")
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.layers = []
        self.head = None  # the LM head stays on its CpuLinear kernel
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
            self.layers.append(_Layer(
                ln1=n1.weight, eps1=float(getattr(n1, "variance_epsilon", getattr(n1, "eps", 1e-6))),
                qkv=CpuLinear.fused([a.q_proj, a.k_proj, a.v_proj]), o=a.o_proj,
                ln2=n2.weight, eps2=float(getattr(n2, "variance_epsilon", getattr(n2, "eps", 1e-6))),
                gate_up=CpuLinear.fused([m.gate_proj, m.up_proj]), down=m.down_proj))

    def run(self, i: int, h: torch.Tensor, cache, mask: torch.Tensor | None, cos: torch.Tensor,
            sin: torch.Tensor) -> torch.Tensor:
        """Layer i on h [1, T, D] (appending its K/V to ``cache`` at layer i); cos/sin [1, T, hd] of the T positions;
        ``mask`` [1, 1, T, n + T] (bottom-right causal) or None for T = 1."""
        p = self.layers[i]
        t, hd, nq, nkv = h.shape[1], self.head_dim, self.heads, self.kv_heads
        x = F.rms_norm(h, (h.shape[-1],), p.ln1, p.eps1)
        qkv = p.qkv(x).view(1, t, nq + 2 * nkv, hd).transpose(1, 2)  # [1, H + 2KV, T, hd]
        qk, v = qkv[:, : nq + nkv], qkv[:, nq + nkv :]
        half = hd // 2
        qk = qk * cos[:, None] + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin[:, None]  # rotary
        k_all, v_all = cache.update(qk[:, nq:], v, i)  # [1, KV, n + T, hd]
        attn = F.scaled_dot_product_attention(qk[:, :nq], k_all, v_all, attn_mask=mask,
                                              enable_gqa=nkv != nq)  # [1, H, T, hd]
        h = h + p.o(attn.transpose(1, 2).reshape(1, t, nq * hd))
        x = F.rms_norm(h, (h.shape[-1],), p.ln2, p.eps2)
        gate, up = p.gate_up(x).chunk(2, dim=-1)
        return h + p.down(F.silu(gate) * up)

    def run_range(self, start: int, end: int, h: torch.Tensor, cache, mask, cos, sin) -> torch.Tensor:
        """Layers [start, end) on h [1, T, D], one ``run`` each."""
        for i in range(start, end):
            h = self.run(i, h, cache, mask, cos, sin)
        return h

    @property
    def eager(self) -> FastLayers:
        return self
