"""A fast decoding pass for LLaMA-family models on CPU (float32): functional decoder layers over the engine's
preallocated KV cache, with oneDNN-prepacked linears (batch-invariant for the attention/MLP-in projections and the
LM head), q/k/v and gate/up fused into one GEMM each, and optional torch.compile of the whole layer range.

Standalone prototype for issue 40 (scratch; the lead integrates it). Call pattern mirrors lede's
``Decoder._run``: h [1, T, D] through layers [start, end) at positions pos0 .. pos0+T-1, writing K/V into
``k_all``/``v_all`` of shape [n_layers, 1, kv_heads, max_len, head_dim] (``KVCache.k``/``.v``).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SNAP = Path(__file__).resolve().parent / "snap"  # a snapshot of lede's src/lede (the package is being moved)
if str(SNAP) not in sys.path:
    sys.path.insert(0, str(SNAP))

LINEARS = ("onednn", "mkl", "torch")


class Lin:
    """y = x @ W^T for x [M, K] with a weight prepared once for ``kind``:
    onednn: torch.ops.mkldnn._linear_pointwise on a weight reordered by _reorder_linear_weight (any M);
    mkl: torch.ops.mkl._mkl_linear with a cblas-packed weight (one packing serves every M here);
    torch: F.linear on the plain weight."""

    def __init__(self, w: torch.Tensor, kind: str):
        self.kind, self.w = kind, w.contiguous()
        self.n = w.shape[0]
        if kind == "onednn":
            self.p = torch.ops.mkldnn._reorder_linear_weight(self.w, None)
        elif kind == "mkl":
            self.p = torch.ops.mkl._mkl_reorder_linear_weight(self.w, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "onednn":
            if x.shape[0] == 1:  # a 1-row product as the 1st row of a duplicated 2-row one: oneDNN reduces
                # K = 1536 (down_proj) in another order for M = 1 than for M >= 2; M = 2..17 agree bit for bit
                # (invariance_probe.py), so this makes every pass batch-invariant at no measurable cost
                return torch.ops.mkldnn._linear_pointwise(x.expand(2, -1), self.p, None, "none", [], "")[:1]
            return torch.ops.mkldnn._linear_pointwise(x, self.p, None, "none", [], "")
        if self.kind == "mkl":
            return torch.ops.mkl._mkl_linear(x, self.p, self.w, None, x.shape[0])
        return F.linear(x, self.w)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:  # LlamaRMSNorm, float32
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rot(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # x [h, T, hd]; cos [T, hd]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class FastLM:
    """Functional LLaMA decoder over a loaded lede model (``lm.model`` a transformers LlamaForCausalLM)."""

    def __init__(self, model, linear: str = "onednn"):
        cfg = model.config
        self.D = cfg.hidden_size
        self.H = cfg.num_attention_heads
        self.KV = getattr(cfg, "num_key_value_heads", None) or self.H
        self.hd = getattr(cfg, "head_dim", None) or self.D // self.H
        self.eps = cfg.rms_norm_eps
        self.scale = 1.0 / math.sqrt(self.hd)
        self.linear = linear
        inner = model.model
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            assert getattr(a.q_proj, "bias", None) is None, "prototype: no q/k/v bias (qwen2 has them)"
            wqkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()
            wgu = torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach()
            self.layers.append(dict(
                ln1=layer.input_layernorm.weight.detach(), qkv=Lin(wqkv, linear), o=Lin(a.o_proj.weight.detach(), linear),
                ln2=layer.post_attention_layernorm.weight.detach(), gu=Lin(wgu, linear),
                down=Lin(m.down_proj.weight.detach(), linear)))
        self.norm_w = inner.norm.weight.detach()
        self.head = Lin(model.lm_head.weight.detach(), linear)
        self.embed_w = inner.embed_tokens.weight.detach()
        self.inter = self.layers[0]["gu"].n // 2

    def weight_bytes(self, start: int = 0, end: int | None = None, head: bool = True) -> int:
        end = len(self.layers) if end is None else end
        n = sum(l[k].w.numel() for l in self.layers[start:end] for k in ("qkv", "o", "gu", "down"))
        return 4 * (n + (self.head.w.numel() if head else 0))

    def layer(self, i: int, x: torch.Tensor, k_all, v_all, pos0: int, cos, sin, mask):
        """x [T, D] -> [T, D]; writes K/V at pos0.. of layer i."""
        L, T = self.layers[i], x.shape[0]
        H, KV, hd = self.H, self.KV, self.hd
        qkv = L["qkv"](rms(x, L["ln1"], self.eps))
        q = qkv[:, : H * hd].view(T, H, hd).transpose(0, 1)
        k = qkv[:, H * hd : (H + KV) * hd].view(T, KV, hd).transpose(0, 1)
        v = qkv[:, (H + KV) * hd :].view(T, KV, hd).transpose(0, 1)
        q, k = rot(q, cos, sin), rot(k, cos, sin)
        k_all[i, 0, :, pos0 : pos0 + T] = k
        v_all[i, 0, :, pos0 : pos0 + T] = v
        kk, vv = k_all[i, :, :, : pos0 + T], v_all[i, :, :, : pos0 + T]  # [1, KV, n, hd]
        att = F.scaled_dot_product_attention(q[None], kk, vv, attn_mask=mask, scale=self.scale,
                                             enable_gqa=KV != H)  # [1, H, T, hd]
        x = x + L["o"](att[0].transpose(0, 1).reshape(T, H * hd))
        gu = L["gu"](rms(x, L["ln2"], self.eps))
        return x + L["down"](F.silu(gu[:, : self.inter]) * gu[:, self.inter :])

    def run(self, h: torch.Tensor, k_all, v_all, pos0: int, cos_tab, sin_tab, start: int, end: int):
        """Layers [start, end) on h [T, D] at positions pos0 .. pos0+T-1 (cos/sin tables [max_len, hd])."""
        T = h.shape[0]
        cos, sin = cos_tab[pos0 : pos0 + T], sin_tab[pos0 : pos0 + T]
        mask = None
        if T > 1:  # bottom-right-aligned causal mask, as lede's engine builds it
            qp = torch.arange(pos0, pos0 + T)[:, None]
            mask = (torch.arange(pos0 + T)[None, :] <= qp)[None, None]
        for i in range(start, end):
            h = self.layer(i, h, k_all, v_all, pos0, cos, sin, mask)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, V]
        return self.head(rms(h, self.norm_w, self.eps))

    def full(self, ids: torch.Tensor, k_all, v_all, pos0: int, cos_tab, sin_tab):
        """Embedding, all layers, final norm and LM head: a verification pass -> logits [T, V]."""
        h = self.embed_w[ids]
        return self.logits(self.run(h, k_all, v_all, pos0, cos_tab, sin_tab, 0, len(self.layers)))


def load(linear: str = "onednn", kernels: str = "torch", cache_dir: str = "/work/scratch40/models"):
    """lede's loader (from the snapshot) -> (lm, FastLM)."""
    from lede.model import load_model

    lm = load_model("smollm2-135m", dtype="float32", device="cpu", kernels=kernels, cache_dir=cache_dir)
    return lm, FastLM(lm.model, linear)


def rope_tables(lm, max_len: int):
    """cos, sin [max_len, hd] exactly as lede's Decoder.new_cache computes them."""
    inner = lm.model.model
    pos = torch.arange(max_len)[None]
    cos, sin = inner.rotary_emb(inner.embed_tokens.weight[:1][None], pos)
    return cos[0].contiguous(), sin[0].contiguous()
