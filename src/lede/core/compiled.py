"""Decoder layers compiled by TorchInductor (opt-in): the lean layer forward of ``lede.core.fastpath`` as a few
frozen graphs whose linears run inductor's C++ GEMM template.

Why: a decoding pass of a small model on a CPU should cost what reading its weights costs, but the eager lean
forward pays ~8 ms of per-op and Python overhead per SmolLM2 pass, and no eager GEMM kernel is both at the memory
floor for one token and flat up to nine (``docs/measurement_log.md``, 2026-12-06/07). With the weights frozen into
the graph (``freezing``), inductor prepacks them and ``max_autotune`` lets its C++ GEMM template (the ``CPP``
backend, autotuned against ATen's) compute the small-M products; norms, rotary, SiLU and residuals fuse into a
handful of C++ kernels. The graph only *reads* the KV cache: each layer attends over its cached keys (a read-only
slice of the engine's buffer) and over the pass's own new keys, one softmax merged over both (below), and the graph
returns the new keys and values, which ``run_range`` writes into the cache in one copy per segment. Why: with the
cache write inside the graph, functionalisation turned each layer's slice write into a copy of the whole cache
buffer (a SmolLM2 pass took 190 ms instead of 22 ms); with the write and attention as one opaque custom op, that
op's dispatch cost ~75 us per layer, on top of SDPA's own ~55 us for a one-token query (measured 2026-12-07,
``docs/measurement_log.md``).

The attention of a pass of T tokens at positions n .. n+T-1, per key/value head (the G = H / KV query heads that
share it stacked as G*T rows, q [KV, G*T, hd]):

    s_c = q K[:n]^T / sqrt(hd)             [KV, G*T, n]   cached keys, all visible
    s_t = q k_new^T / sqrt(hd), causal     [KV, G*T, T]   row g*T+i sees new keys 0..i
    m   = max(rowmax s_c, rowmax s_t)
    out = (exp(s_c - m) V[:n] + exp(s_t - m) v_new) / (sum exp(s_c - m) + sum exp(s_t - m))

which is softmax over the concatenated keys, without materialising the concatenation.

The layers are cut into *segments* at ``cuts`` (the exit layers the engine drafts from; always 0 and N): each
segment is one graph, and a pass over layers [start, end) runs the segments between two cuts. A pass over every
layer (verification, plain decoding) runs one more graph over all of them (``whole``): each segment boundary cost
~0.4 ms a pass (SmolLM2 at the study's seven segments: verification 1.15-1.18x one segment's time, plain decoding
1.09x; 2026-12-08), for one more graph pair to compile. A range that does not start and end on a cut, the prompt's
prefill (an empty cache) and a pass over a one-token cache go through the eager lean forward.
``torch.compile(dynamic=True)``: one graph per segment for one token and one for 2+ tokens (any T and any context),
compiled at the first pass of each (``CompiledLayers.warm`` does it up front and says how long it took); the
context length never recompiles. Compiling needs a C++ compiler at run time (``compiler_problem``); without one
``load_model`` warns once and keeps the eager forward.

The LM head gets a graph as well (``LinearGraph``, for products of up to ``HEAD_ROWS`` rows: plain decoding, a
round's drafts through the full head, verification of up to two tokens); the engine takes it from the layer stack
(``Decoder._lm_head``), so the probes' eager variants keep the head on their own kernel.

Exactness: the graphs compute the same maths as the eager forward in another summation order (a one-token graph
and a several-token graph differ in the last bits as well), so greedy speculative output equals plain decoding up
to near-ties, as with every other kernel (``lede.eval.parity`` measures it).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from torch._inductor import config as inductor_config

from lede.core.fastpath import FastLayers
from lede.core.kernels import weight_key

log = logging.getLogger(__name__)

#: inductor config while a segment compiles (``torch._inductor.config.patch``; as ``torch.compile(options=...)``,
#: freezing was not applied and every linear became an unpacked ``mm``)
INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


#: the most rows the compiled LM head takes; wider products go to the model's own kernel (oneDNN's is flat in the
#: rows). SmolLM2's head alone in the graph took 0.79 / 0.82 / 0.94 / 1.9 / 2.0x oneDNN's time at 1 / 2 / 3 / 5 / 9
#: rows (the template's micro-kernel of 5+ rows runs far below the FMA peak); whole passes with it took 0.95 / 0.97 /
#: 1.02x at 1 / 2 / 3 tokens and a draft step from L4 0.86x (paired medians of 25 interleaved repetitions, 2026-12-08).
HEAD_ROWS = 2


def compiler_problem() -> str | None:
    """None if inductor can compile C++ on this machine, else why not (one line)."""
    try:
        from torch._inductor import cpp_builder

        compiler = cpp_builder.get_cpp_compiler()
    except Exception as err:  # inductor raises for a missing compiler; any failure means: stay eager
        return f"no C++ compiler for TorchInductor ({err.__class__.__name__}: {str(err).splitlines()[0][:120]})"
    if shutil.which(compiler) is None:
        return f"TorchInductor's C++ compiler {compiler!r} is not on PATH"
    return None


class _Segment(nn.Module):
    """Decoder layers [a, b) of a ``FastLayers`` as one module whose weights are buffers (freezing folds them into
    the graph as constants; they share storage with the model's weights)."""

    def __init__(self, fast: FastLayers, a: int, b: int):
        super().__init__()
        self.a, self.b = a, b
        self.heads, self.kv_heads, self.head_dim = fast.heads, fast.kv_heads, fast.head_dim
        self.eps = []
        for i in range(a, b):
            p = fast.layers[i]
            for name, t in (("ln1", p.ln1), ("qkv", p.qkv.weight), ("o", p.o.weight), ("ln2", p.ln2),
                            ("gate_up", p.gate_up.weight), ("down", p.down.weight)):
                self.register_buffer(f"{name}_{i}", t.detach(), persistent=False)
            for name, lin in (("qkv", p.qkv), ("o", p.o), ("gate_up", p.gate_up), ("down", p.down)):
                bias = lin.bias.detach() if lin.bias is not None else None  # Qwen2's q/k/v biases
                self.register_buffer(f"{name}_bias_{i}", bias, persistent=False)
            self.eps.append((p.eps1, p.eps2))

    def forward(self, h: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, n: int, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layers [a, b) on h [1, T, D] at positions n .. n+T-1 over the cache k_all/v_all [N, KV, max, hd] (every
        layer's, read only: positions < n) -> (h [1, T, D], these layers' new keys and values [b-a, KV, T, hd]).
        cos/sin [T, hd] (no size-1 leading dims: dynamo would guard on their strides, which change with the cache's
        length, and recompile)."""
        t, hd, nq, nkv = h.shape[1], self.head_dim, self.heads, self.kv_heads
        g, half, scale = nq // nkv, hd // 2, hd**-0.5
        cos, sin = cos[None], sin[None]  # [1, T, hd]
        new = torch.arange(t, device=h.device)
        causal = new[None, :] <= new.repeat(g)[:, None]  # [G*T, T]: query row g*T+i sees new keys 0..i
        ks, vs = [], []
        for j, i in enumerate(range(self.a, self.b)):
            w = lambda name, i=i: getattr(self, f"{name}_{i}")
            eps1, eps2 = self.eps[j]
            x = F.rms_norm(h, (h.shape[-1],), w("ln1"), eps1)
            qkv = F.linear(x, w("qkv"), w("qkv_bias")).view(1, t, nq + 2 * nkv, hd).transpose(1, 2)  # [1, H+2KV, T, hd]
            qk, v = qkv[0, : nq + nkv], qkv[0, nq + nkv :]
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin  # rotary, [H+KV, T, hd]
            q, k = qk[:nq].reshape(nkv, g * t, hd), qk[nq:]  # q [KV, G*T, hd] (head kv*G+g -> kv), k/v [KV, T, hd]
            s_c = torch.matmul(q, k_all[i, :, :n].transpose(1, 2)) * scale  # [KV, G*T, n]
            s_t = (torch.matmul(q, k.transpose(1, 2)) * scale).masked_fill(~causal, float("-inf"))  # [KV, G*T, T]
            m = torch.maximum(s_c.amax(-1, keepdim=True), s_t.amax(-1, keepdim=True))
            p_c, p_t = torch.exp(s_c - m), torch.exp(s_t - m)
            attn = (torch.matmul(p_c, v_all[i, :, :n]) + torch.matmul(p_t, v)) / (
                p_c.sum(-1, keepdim=True) + p_t.sum(-1, keepdim=True))  # [KV, G*T, hd]
            attn = attn.view(nq, t, hd).transpose(0, 1).reshape(1, t, nq * hd)
            h = h + F.linear(attn, w("o"), w("o_bias"))
            x = F.rms_norm(h, (h.shape[-1],), w("ln2"), eps2)
            gate, up = F.linear(x, w("gate_up"), w("gate_up_bias")).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, w("down"), w("down_bias"))
            ks.append(k)
            vs.append(v)
        return h, torch.stack(ks), torch.stack(vs)


class _Product(nn.Module):
    """x W^T (+ b) with W (and b) as buffers, folded into the graph by freezing (prepacked for the GEMM template)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.detach(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [rows, in] -> [rows, out]
        return F.linear(x, self.weight, self.bias)


class LinearGraph:
    """A linear layer (the LM head) as a frozen inductor graph for products of up to ``rows`` rows in inference mode:
    one graph for one row, one for 2..``rows`` (compiled by ``warm``). ``takes(x)`` says whether a call goes here;
    it refuses once the layer's weight has changed (the graph holds a prepacked copy of the weight it was made from).
    Why the head: its 113 MB (SmolLM2) through the template cost 3.0 ms a row against oneDNN's 3.9 (``HEAD_ROWS``)."""

    def __init__(self, linear: nn.Module, rows: int = HEAD_ROWS):
        if rows < 1:
            raise ValueError(f"rows={rows} must be >= 1")
        self.linear, self.rows = linear, rows
        self._made_from = weight_key(linear.weight)
        self._graph = torch.compile(_Product(linear.weight, linear.bias), dynamic=True)
        self.calls = 0  # products computed here since ``warm``

    def takes(self, x: torch.Tensor) -> bool:
        return (x.shape[:-1].numel() <= self.rows and x.dtype == self.linear.weight.dtype
                and torch.is_inference_mode_enabled() and weight_key(self.linear.weight) == self._made_from)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        self.calls += 1
        with inductor_config.patch(INDUCTOR_OPTIONS):
            y = self._graph(x.reshape(-1, x.shape[-1]))
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def warm(self) -> None:
        """Compile the one-row graph and the several-row graph (traced at 2 rows, as the layers' are)."""
        w = self.linear.weight
        with torch.inference_mode():
            for rows in sorted({1, min(2, self.rows)}):
                self(torch.zeros(rows, w.shape[1], dtype=w.dtype, device=w.device))
        self.calls = 0


class CompiledLayers:
    """The decoder layers of a ``FastLayers`` compiled per segment between ``cuts`` (see the module docstring); a
    ``lede.core.fastpath.LayerStack``.

    ``run_range(start, end, h, cache, mask, cos, sin)`` is the engine's entry (``Decoder._layers``); ``run(i, ...)``
    is the eager lean forward of layer i (the fallback, and ``FastLayers``' interface). ``head`` (given the model's LM
    head): its ``LinearGraph``, which the engine uses while this stack is the model's."""

    def __init__(self, fast: FastLayers, cuts: Iterable[int] = (), head: nn.Module | None = None, whole: bool = True):
        n = len(fast.layers)
        self.fast = fast
        self.head = LinearGraph(head) if head is not None else None
        self.cuts = sorted({0, n} | {int(c) for c in cuts if 0 < int(c) < n})
        self.segments = [(a, b, torch.compile(_Segment(fast, a, b), dynamic=True))
                         for a, b in zip(self.cuts, self.cuts[1:])]
        # all layers in one graph for passes over all of them, where there are several segments (``whole``=True)
        self.whole = ((0, n, torch.compile(_Segment(fast, 0, n), dynamic=True))
                      if whole and len(self.segments) > 1 else None)
        self.whole_calls = 0  # passes that went through ``whole``
        # every segment is the same code object to dynamo (one cache entry per segment and specialisation)
        limit = 4 * (len(self.segments) + 1) + 8
        if torch._dynamo.config.recompile_limit < limit:
            torch._dynamo.config.recompile_limit = limit
        self.compile_s = 0.0  # wall time of ``warm``
        self.graphs = 0  # graphs compiled by ``warm``
        self._graphs_after_warm: int | None = None  # dynamo's process-wide graph count when ``warm`` ended
        self.eager_calls = 0  # ranges that went through the eager forward (off the cuts, or prefill)

    @property
    def layers(self):
        return self.fast.layers

    @property
    def eager(self) -> FastLayers:
        return self.fast

    def run(self, i: int, h: torch.Tensor, cache, mask, cos, sin) -> torch.Tensor:
        return self.fast.run(i, h, cache, mask, cos, sin)

    def covers(self, start: int, end: int) -> bool:
        return start in self.cuts and end in self.cuts and start < end

    def run_range(self, start: int, end: int, h: torch.Tensor, cache, mask, cos, sin) -> torch.Tensor:
        """Layers [start, end) on h [1, T, D] at positions cache.lengths[start] .. +T-1, appending their K/V (``mask``:
        the eager forward's; the graphs build their causal mask themselves)."""
        n, t = cache.lengths[start], h.shape[1]
        if n < 2 or not self.covers(start, end) or any(cache.lengths[i] != n for i in range(start, end)):
            # prefill, or a pass over one cached token (dynamo specialises sizes 0 and 1: each would compile another
            # graph), or a range off the cuts
            self.eager_calls += 1
            for i in range(start, end):
                h = self.fast.run(i, h, cache, mask, cos, sin)
            return h
        if n + t > cache.max_len:  # before any layer runs
            raise RuntimeError(f"KV cache overflow at layer {start}: {n}+{t} > {cache.max_len}")
        cos, sin = cos[0], sin[0]  # no size-1 leading dims (_Segment); the graphs build the causal mask themselves
        k_all, v_all = cache.k[:, 0], cache.v[:, 0]  # [N, KV, max, hd] views of the engine's buffers
        if self.whole is not None and (start, end) == self.whole[:2]:
            self.whole_calls += 1
            graphs = [self.whole]
        else:
            graphs = [seg for seg in self.segments if start <= seg[0] and seg[1] <= end]
        with inductor_config.patch(INDUCTOR_OPTIONS):  # read only when a graph compiles (warm, or a recompilation)
            for a, b, graph in graphs:
                h, k_new, v_new = graph(h, k_all, v_all, n, cos, sin)
                cache.append(a, k_new[:, None], v_new[:, None])  # one copy per graph (the graph only read the cache)
        return h

    def warm(self, hidden_size: int, dtype: torch.dtype, device, context: int = 13, tokens: int = 2) -> float:
        """Compile every segment's one-token and several-token graphs (and ``whole``'s and the head's) now, on a scratch
        cache; returns (and keeps in ``compile_s``) the seconds it took. The several-token graph is traced at
        ``tokens`` (inductor sizes its GEMM blocking by that hint: on SmolLM2, 2.4 GHz EPYC, traced at 2 it took 32 /
        35 / 49 / 63 ms at T = 2 / 3 / 5 / 9, traced at 7 52 / 45 / 56 / 57 ms; a noisy host, one run; static widths
        per bucket did not help either, 2026-12-08) with "duck sizing" off: dynamo would otherwise tie T to a model
        dimension of the same size (a tiny model's 2 key/value heads) and recompile for every other T."""
        from torch.fx.experimental import _config as fx_config

        from lede.core.engine import KVCache

        t0, before = time.perf_counter(), graphs_compiled()
        with torch.inference_mode(), fx_config.patch(use_duck_shape=False):  # inference tensors: as the engine decodes
            scratch = KVCache(len(self.layers), self.fast.kv_heads, self.fast.head_dim, context + tokens + 1, dtype,
                              device)
            ranges = [(a, b) for a, b, _ in self.segments] + ([self.whole[:2]] if self.whole is not None else [])
            for t in (1, tokens):
                h = torch.zeros(1, t, hidden_size, dtype=dtype, device=device)
                cos = torch.ones(1, context + tokens + 1, self.fast.head_dim, dtype=dtype, device=device)[:, :t]
                sin = torch.zeros_like(cos)
                mask = None if t == 1 else torch.ones(1, 1, t, context + t, dtype=torch.bool, device=device)
                for a, b in ranges:  # each graph on its own (a segment's range is not (0, N) when there are several)
                    for i in range(len(self.layers)):
                        scratch.lengths[i] = context
                    self.run_range(a, b, h, scratch, mask, cos, sin)
            self.whole_calls = 0
            if self.head is not None:
                self.head.warm()
        self.compile_s = time.perf_counter() - t0
        self._graphs_after_warm = graphs_compiled()
        self.graphs = self._graphs_after_warm - before
        return self.compile_s

    @property
    def recompilations(self) -> int | None:
        """Graphs dynamo compiled in this process since ``warm`` ended (None before ``warm``): after a warm-up every
        pass should reuse its graphs."""
        return None if self._graphs_after_warm is None else graphs_compiled() - self._graphs_after_warm


def graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process (to count recompilations)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
