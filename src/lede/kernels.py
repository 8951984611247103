"""Faster fp32 linear layers for small-batch decoding on CPU.

On the 2-core CPU of our machines, ``F.linear`` (x @ W^T) picks slow kernels for the shapes of
decoding: for T = 2..4 rows a verification pass cost 1.4–2.0x a one-token step, and the one-token step
itself is slower than a plain matrix-vector product. Measured on a SmolLM2 forward (30 layers + LM head,
fp32, 2 threads, 300 cached tokens; ms, median of 15):

    T          1     2     3     4     5     8
    F.linear  57   103   123    87    77    90
    this      51    46    59    48    57    64

``CpuLinear`` computes T = 1 as ``x @ W^T`` from a transposed copy of the weight (a plain GEMV) and
T > 1 as ``(W @ x^T)^T`` (a GEMM whose narrow side is the token count). It is the same maths with a
different summation order, so results can differ from ``F.linear`` in the last bits (a near-tie can
flip a greedy choice, as with any change of kernel). ``load_model`` applies it on CPU in float32 by
default; pass ``fast_linear=False`` to keep transformers' layers untouched.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class CpuLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # [out, in], shared (the LM head may be tied to the embedding)
        self.bias = linear.bias
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous(), persistent=False)  # [in, out]
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if not self.enabled or (torch.is_grad_enabled() and self.weight.requires_grad):
            return nn.functional.linear(x, self.weight, self.bias)  # reference path; training
        rows = x.shape[:-1].numel()
        if rows == 1:
            y = x @ self.weight_t
        else:
            y = (self.weight @ x.reshape(rows, -1).T).T.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def use_cpu_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of a causal LM (decoder layers and LM head) by CpuLinear; returns the count."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, CpuLinear(child))
                count += 1
    return count


@contextmanager
def reference_linears(model: nn.Module):
    """Temporarily compute every CpuLinear with F.linear (e.g. to time transformers' own generate)."""
    layers = [m for m in model.modules() if isinstance(m, CpuLinear)]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True
