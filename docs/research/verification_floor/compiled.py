"""torch.compile (inductor, CPU) of a whole decoding pass: embedding rows in, logits out, layers [0, end) in one
graph, K/V written in place into caches passed as inputs; dynamic T and position (dynamic=True).

opts (comma-separated): freezing (inductor freezing: weights become constants and are prepacked for oneDNN/MKL),
autotune (max_autotune with the CPP GEMM template: max_autotune_gemm_backends="CPP,ATEN"), none.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from fast import rms, rope_tables, rot


@torch.library.custom_op("lede40::kv_attend", mutates_args=("k_all", "v_all"))
def kv_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
              layer: int, pos0: int, scale: float) -> torch.Tensor:
    """Write k, v [KV, T, hd] at pos0.. of layer's cache and attend q [H, T, hd] over the cache -> [H, T, hd].
    An opaque op for inductor: the cache is mutated in place (no functional copy of the whole buffer), and
    attention is SDPA's fused CPU kernel with a bottom-right causal mask when T > 1."""
    T = q.shape[1]
    k_all[layer, 0, :, pos0 : pos0 + T] = k
    v_all[layer, 0, :, pos0 : pos0 + T] = v
    mask = None
    if T > 1:
        mask = (torch.arange(pos0 + T)[None, :] <= torch.arange(pos0, pos0 + T)[:, None])[None, None]
    return F.scaled_dot_product_attention(q[None], k_all[layer, :, :, : pos0 + T], v_all[layer, :, :, : pos0 + T],
                                          attn_mask=mask, scale=scale, enable_gqa=k.shape[0] != q.shape[0])[0]


@kv_attend.register_fake
def _(q, k, v, k_all, v_all, layer, pos0, scale):
    return torch.empty_like(q)


class Pass(nn.Module):
    """Layers [0, end) (+ final norm and LM head when head=True) as an nn.Module whose weights are parameters
    (so that inductor's freezing can treat them as constants)."""

    def __init__(self, model, end: int, head: bool):
        super().__init__()
        cfg = model.config
        inner = model.model
        self.D, self.H = cfg.hidden_size, cfg.num_attention_heads
        self.KV = cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or self.D // self.H
        self.eps, self.scale, self.end, self.head = cfg.rms_norm_eps, 1 / math.sqrt(self.hd), end, head
        p = lambda t: nn.Parameter(t.detach().clone(), requires_grad=False)  # noqa: E731
        self.ln1 = nn.ParameterList([p(l.input_layernorm.weight) for l in inner.layers[:end]])
        self.ln2 = nn.ParameterList([p(l.post_attention_layernorm.weight) for l in inner.layers[:end]])
        self.qkv = nn.ParameterList([p(torch.cat([l.self_attn.q_proj.weight, l.self_attn.k_proj.weight,
                                                  l.self_attn.v_proj.weight])) for l in inner.layers[:end]])
        self.o = nn.ParameterList([p(l.self_attn.o_proj.weight) for l in inner.layers[:end]])
        self.gu = nn.ParameterList([p(torch.cat([l.mlp.gate_proj.weight, l.mlp.up_proj.weight])) for l in inner.layers[:end]])
        self.down = nn.ParameterList([p(l.mlp.down_proj.weight) for l in inner.layers[:end]])
        self.inter = cfg.intermediate_size
        if head:
            self.norm_w = p(inner.norm.weight)
            self.lm_head = p(model.lm_head.weight)

    def forward(self, h, k_all, v_all, pos0: int, cos_tab, sin_tab):  # h [T, D]
        T = h.shape[0]
        H, KV, hd = self.H, self.KV, self.hd
        cos, sin = cos_tab[pos0 : pos0 + T], sin_tab[pos0 : pos0 + T]
        for i in range(self.end):
            qkv = F.linear(rms(h, self.ln1[i], self.eps), self.qkv[i])
            q = qkv[:, : H * hd].view(T, H, hd).transpose(0, 1)
            k = qkv[:, H * hd : (H + KV) * hd].view(T, KV, hd).transpose(0, 1)
            v = qkv[:, (H + KV) * hd :].view(T, KV, hd).transpose(0, 1)
            q, k = rot(q, cos, sin), rot(k, cos, sin)
            att = kv_attend(q, k, v, k_all, v_all, i, pos0, self.scale)
            h = h + F.linear(att.transpose(0, 1).reshape(T, H * hd), self.o[i])
            gu = F.linear(rms(h, self.ln2[i], self.eps), self.gu[i])
            h = h + F.linear(F.silu(gu[:, : self.inter]) * gu[:, self.inter :], self.down[i])
        if self.head:
            return F.linear(rms(h, self.norm_w, self.eps), self.lm_head)
        return h


def configure(opts: str) -> dict:
    import torch._inductor.config as ic

    o = set(opts.split(","))
    ic.freezing = "freezing" in o
    ic.cpp.weight_prepack = "noprepack" not in o
    kw = {"dynamic": True}
    if "autotune" in o:
        ic.max_autotune = True
        ic.max_autotune_gemm_backends = "CPP,ATEN"
    return kw


class CompiledLM:
    """Compiled full pass (verification) and compiled drafts through layers [0, L) (one graph per L)."""

    def __init__(self, lm, max_len: int, opts: str = "freezing", draft_layers=()):
        self.lm, self.max_len = lm, max_len
        self.kw = configure(opts)
        model = lm.model
        self.embed_w = model.model.embed_tokens.weight.detach()
        self.cos, self.sin = rope_tables(lm, max_len)
        self.k = torch.zeros(30, 1, 3, max_len, 64)
        self.v = torch.zeros_like(self.k)
        self.full_mod = Pass(model, len(model.model.layers), head=True).eval()
        self.full_fn = torch.compile(self.full_mod, **self.kw)
        self.drafts = {L: torch.compile(Pass(model, L, head=False).eval(), **self.kw) for L in draft_layers}
        self.compile_log: list[tuple[str, float]] = []

    @torch.inference_mode()
    def verify(self, ids: torch.Tensor, pos0: int) -> torch.Tensor:
        return self.full_fn(self.embed_w[ids], self.k, self.v, pos0, self.cos, self.sin)

    @torch.inference_mode()
    def draft(self, ids: torch.Tensor, pos0: int, L: int) -> torch.Tensor:
        return self.drafts[L](self.embed_w[ids], self.k, self.v, pos0, self.cos, self.sin)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return self.verify(ids, 0)

    def warmup(self, widths, contexts):
        """Call every (T, ctx) once, logging the time of each first call (compilation happens on the first ones)."""
        for ctx in contexts:
            for t in widths:
                t0 = time.perf_counter()
                self.verify(torch.arange(t) + 100, ctx)
                self.compile_log.append((f"verify T={t} ctx={ctx}", time.perf_counter() - t0))

    def recompile_report(self) -> dict:
        from torch._dynamo.utils import counters

        return {"stats": {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "frames")},
                "first_calls_s": self.compile_log}
