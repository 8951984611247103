"""Faster fp32 kernels for small-batch decoding on CPU: linear layers and masked attention.

On the 2-core CPU of our machines, transformers' layers pick slow kernels for the shapes of decoding.
Linear: with one row, ``x @ W^T`` from a transposed weight copy (this module's earlier path) cost 45 ms
per SmolLM2 step, and ``F.linear``'s GEMV 28-54 ms depending on what ran before it (alone: 54 ms);
``W @ X^T`` with the token count as the narrow side (a GEMM) takes 28 ms steadily, so a one-token step
is computed as a two-row product of the token with itself (the arithmetic doubles, but the step is bound
by reading the weights). Outputs are made contiguous: a transposed output sent later ops, and attention,
to their slow strided paths. Attention with several query tokens and an explicit mask (a verification
pass; prefill) made transformers' "sdpa" repeat the key/value heads (grouped-query attention) and fall
back to the math kernel; ``lede_sdpa`` calls SDPA with ``enable_gqa`` and the mask instead, which stays
on the fused CPU kernel.

Measured on a SmolLM2-135M forward (30 layers + LM head, fp32, 2 threads; ms, median of 10 after
warm-up; T tokens in one pass over a cache of ``ctx`` tokens; ``python -m lede.eval.kernel_bench`` measures both
interleaved on the machine at hand):

    ctx   T:  1     2     3     5        kernels
    256      46    46    52    56        F.linear-style GEMV (T=1) / transposed GEMM output (T>1), "sdpa"
    256      31    28    36    44        this module
    2048     52    81    93    96        before
    2048     37    41    52    64        this module

Which linear kernel is faster depends on the CPU. On a later host (Xeon, 2026-12-02) it went the other way: one-token
passes took 72-84 ms on the two-row GEMM and 38-46 ms on ``F.linear``'s GEMV, and plain decoding ran 1.69-1.81x
faster on torch's kernels than on ours, level with transformers' own ``generate`` (interleaved, 6 prompts, with and
without exit heads loaded). ``lede.core.tuning.tune_cpu_kernels`` times a one-token step and a several-token pass with both
(interleaved, after warm-up) and keeps the faster for each (ours unless torch's wins by over 10%, so that close
calls do not flip from job to job); ``load_model(kernels="auto")`` does it at load (~3 s) and records the choice in
``LoadedModel.kernels``. The study's config and the CLI default to ``auto``; ``load_model``'s default stays
``"lede"`` so that library calls and tests compute the same on every run. (An earlier end-to-end reading on that host,
``python -m lede.eval.kernel_bench --end-to-end``, had found the kernels level; the one-process runs above did not reproduce it.)

``CpuLinear`` is the same maths with a different summation order, so results can differ from
``F.linear`` in the last bits (a near-tie can flip a greedy choice, as with any change of kernel);
``lede_sdpa`` is SDPA's own fused kernel. ``load_model`` applies both on CPU in float32 by default
(``use_cpu_kernels``); ``kernels="torch"`` keeps transformers' layers untouched, and
``reference_kernels`` times transformers' own path on the same model.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn


class CpuLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # [out, in], shared (the LM head may be tied to the embedding)
        self.bias = linear.bias
        self.one_row, self.many_rows = True, True  # this module's GEMM for 1 / for several rows; else F.linear

    @property
    def enabled(self) -> bool:
        """False: F.linear for every call (``reference_kernels``, or ``set_linear_kernels(model, "torch", "torch")``)."""
        return self.one_row or self.many_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        rows = x.shape[:-1].numel()
        if not (self.one_row if rows == 1 else self.many_rows) or (torch.is_grad_enabled() and self.weight.requires_grad):
            return nn.functional.linear(x, self.weight, self.bias)  # reference path; training
        x2 = x.reshape(rows, -1)  # [rows, in]
        if rows == 1:  # two copies of the row: a GEMM, faster here than the GEMV for one
            y = (self.weight @ torch.cat([x2, x2]).T)[:, 0].contiguous()  # [out]
        else:
            y = (self.weight @ x2.T).T.contiguous()  # [out, rows] -> [rows, out]
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


ATTENTION = "lede_sdpa"


def masked_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' "sdpa" attention, except that several query tokens with an explicit mask go to SDPA
    with ``enable_gqa`` (no repeated key/value heads, the fused kernel) -> ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None or query.shape[2] == 1 or dropout or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    mask = attention_mask[:, :, :, : key.shape[-2]]
    out = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def use_cpu_kernels(model: nn.Module) -> int:
    """Replace every nn.Linear of a causal LM (decoder layers and LM head) by CpuLinear and switch its
    attention to ``lede_sdpa`` (when it uses "sdpa"); returns the number of linears replaced."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, CpuLinear(child))
                count += 1
    if model.config._attn_implementation == "sdpa":
        register_attention()
        model.set_attn_implementation(ATTENTION)
    return count


KERNELS = ("lede", "torch")  # lede: CpuLinear's GEMM; torch: F.linear
#: ``load_model(kernels=...)``, ``--kernels`` and config ``kernels`` (schema enum; a test keeps them equal).
KERNEL_OPTIONS = ("auto", *KERNELS)


@dataclass
class KernelChoice:
    """The linear kernels kept for one-token passes (plain decoding, drafting) and for passes of several tokens
    (verification, prefill), with the timings they were chosen by."""

    one_token: str  # "lede" | "torch"
    many_tokens: str
    ms: dict[str, float] = field(default_factory=dict)  # "<kernels>/<tokens>": median forward, ms

    def __str__(self) -> str:
        return f"one token {self.one_token}, several {self.many_tokens}"


def set_linear_kernels(model: nn.Module, one_token: str, many_tokens: str) -> int:
    """Route every CpuLinear's one-row and several-row calls to ``"lede"`` or ``"torch"``; returns their number."""
    for k in (one_token, many_tokens):
        if k not in KERNELS:
            raise ValueError(f"kernels {k!r}: expected one of {KERNELS}")
    layers = [m for m in model.modules() if isinstance(m, CpuLinear)]
    for m in layers:
        m.one_row, m.many_rows = one_token == "lede", many_tokens == "lede"
    return len(layers)


def register_attention() -> None:
    """Register ``lede_sdpa`` with transformers: the attention function *and* its mask function (sdpa's).
    Without the latter transformers builds no attention mask at all for an implementation it does not know,
    so a model-level forward of a left-padded batch (``generate`` in ``greedy_continuations``) attended to
    the padding: every padded row's continuation was garbage, and with it the distillation data, until
    2026-11-30. The engine builds its own masks and was not affected."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, masked_gqa_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


@contextmanager
def reference_kernels(model: nn.Module):
    """Temporarily compute every CpuLinear with F.linear and attention with transformers' "sdpa" (e.g. to
    time transformers' own generate, or as the reference in tests)."""
    layers = [m for m in model.modules() if isinstance(m, CpuLinear)]
    saved = [(m.one_row, m.many_rows) for m in layers]  # restored as they were (tuned or not)
    attention = model.config._attn_implementation
    for m in layers:
        m.one_row = m.many_rows = False
    if attention == ATTENTION:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        for m, (one, many) in zip(layers, saved):
            m.one_row, m.many_rows = one, many
        if attention == ATTENTION:
            model.set_attn_implementation(ATTENTION)
