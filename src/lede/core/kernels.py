"""CPU float32 kernels for small-batch decoding: the linear layers and masked attention.

A decoding pass of a small model on a CPU is bound by reading the weights (SmolLM2-135M: 538 MB per full pass),
so a pass of T = 1..9 tokens should cost about what one token costs. ``CpuLinear`` replaces every ``nn.Linear`` of
the decoder and the LM head and routes one-token and several-token calls to one of three kernels:

* ``onednn``: the weight is reordered once into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``,
  a copy made at the first call) and multiplied by ``torch.ops.mkldnn._linear_pointwise``. It is near the best at
  T = 1 and nearly flat up to T = 9, and it is **batch-invariant**: every row of an M-row product is bit-identical
  to the same row computed alone, for M = 2..17. For M = 1 oneDNN reduces a long inner dimension in another order,
  so a one-row product is computed as the first row of the row duplicated (the extra row costs nothing in a
  memory-bound GEMM). ``tests/test_kernels.py`` checks the invariance on the model's weight shapes.
* ``lede``: ``W @ X^T`` with the token count as the narrow side (one token as a two-row product of the token with
  itself): flat in T, but about twice the floor at T = 1 on some CPUs.
* ``torch``: ``F.linear`` (MKL): good at T = 1..2, it repacks the weight per call for M >= 3 and grows with T.

Which is fastest depends on the CPU, so ``load_model(kernels="auto")`` times them at load
(``lede.core.tuning``); ``lede costs`` (``lede.eval.cost_probe.probe_floor``) measures them against the memory
floor. The measurements are in ``docs/measurement_log.md``.

Attention with several query tokens and an explicit mask (a verification pass; prefill) made transformers' "sdpa"
repeat the key/value heads (grouped-query attention) and fall back to the math kernel; ``lede_sdpa`` calls SDPA with
``enable_gqa`` and the mask instead, which stays on the fused CPU kernel. SDPA is not batch-invariant: a query row
attended alone and inside a T-row masked call differ in the last bits, so a speculative pass can still differ from
a one-token pass at a near-tie (the identity rate is measured, ``lede.eval.parity``).

Every kernel is the same maths with its own summation order, so results differ from ``F.linear`` in the last bits;
``kernels="torch"`` keeps transformers' layers untouched, and ``reference_kernels`` times transformers' own path on
the same model.
"""

from __future__ import annotations

import re

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

KERNELS = ("onednn", "lede", "torch")  # the linear kernels; onednn first: the default where oneDNN is available
#: ``load_model(kernels=...)``, ``--kernels`` and config ``kernels`` (schema enum; a test keeps them equal).
KERNEL_OPTIONS = ("auto", *KERNELS)


def onednn_available() -> bool:
    """Whether this torch build can run the ``onednn`` kernel (oneDNN compiled in and its linear ops present)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def available_kernels() -> tuple[str, ...]:
    """The linear kernels this machine can run, in ``KERNELS`` order."""
    return tuple(k for k in KERNELS if k != "onednn" or onednn_available())


class CpuLinear(nn.Module):
    """An ``nn.Linear`` whose one-row and several-row calls go to the kernel named by ``one_token`` /
    ``many_tokens`` (``KERNELS``; set by ``set_linear_kernels``). Autograd (a trainable weight with grad enabled)
    always takes ``F.linear``."""

    def __init__(self, linear: nn.Linear, one_token: str = "lede", many_tokens: str = "lede"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # [out, in], shared (the LM head may be tied to the embedding)
        self.bias = linear.bias
        self.one_token, self.many_tokens = one_token, many_tokens
        self._packed: tuple[int, torch.Tensor] | None = None  # (weight version, oneDNN-reordered copy)

    @property
    def enabled(self) -> bool:
        """False: F.linear for every call (``reference_kernels``, or ``set_linear_kernels(model, "torch", "torch")``)."""
        return self.one_token != "torch" or self.many_tokens != "torch"

    def packed(self) -> torch.Tensor:
        """The weight in oneDNN's layout, made at the first ``onednn`` call and again if the weight changed."""
        version = weight_key(self.weight)
        if self._packed is None or self._packed[0] != version:
            with torch.no_grad():
                self._packed = (version, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().contiguous(), None))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        rows = x.shape[:-1].numel()
        kernel = self.one_token if rows == 1 else self.many_tokens
        if kernel == "torch" or (torch.is_grad_enabled() and self.weight.requires_grad) or x.dtype != torch.float32:
            return nn.functional.linear(x, self.weight, self.bias)  # reference path; training; other dtypes
        x2 = x.reshape(rows, -1)  # [rows, in]
        if kernel == "onednn":
            # one row as row 0 of the row twice: oneDNN's M = 1 path sums in another order than M >= 2 (batch invariance)
            y = torch.ops.mkldnn._linear_pointwise(x2.expand(2, -1) if rows == 1 else x2, self.packed(), self.bias,
                                                  "none", [], "")[:rows]  # [rows, out]
            return y.reshape(*x.shape[:-1], self.out_features)
        if rows == 1:  # two copies of the row: a GEMM, faster on some CPUs than the GEMV for one
            y = (self.weight @ torch.cat([x2, x2]).T)[:, 0].contiguous()  # [out]
        else:
            y = (self.weight @ x2.T).T.contiguous()  # [out, rows] -> [rows, out]
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def rows(self, index: torch.Tensor) -> "CpuLinear":
        """A CpuLinear over the output rows ``index`` of this one (a reduced-vocabulary draft head) that follows this
        one's kernel routing (``set_linear_kernels`` on the model reaches it through its parent)."""
        return _Follower([self], lambda ws: ws[0][index])

    @staticmethod
    def fused(parts: list["CpuLinear"]) -> "CpuLinear":
        """One CpuLinear computing ``parts`` side by side (their output rows stacked: q/k/v, gate/up), in one GEMM that
        reads each weight once; it follows ``parts[0]``'s kernel routing and re-stacks if a part's weight changes."""
        return _Follower(parts, torch.cat)


def weight_key(w: torch.Tensor) -> tuple[int, int]:
    """(version, storage address) of a weight: changes when it is modified in place or replaced (what a packed or
    compiled copy of it was made from)."""
    return tensor_version(w), w.data_ptr()


def tensor_version(t: torch.Tensor) -> int:
    """The tensor's in-place version counter (0 for an inference-mode tensor, which cannot change in place)."""
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor has no version counter
        return 0


class _Follower(CpuLinear):
    """A CpuLinear whose weight is made from other CpuLinears' (``make([weights]) -> weight``, biases likewise) and
    whose kernels are the first one's at every call. The sources are not submodules: they belong to the model."""

    def __init__(self, sources: list[CpuLinear], make):
        nn.Module.__init__(self)
        self.__dict__["_sources"], self.__dict__["_make"] = list(sources), make
        self.one_token, self.many_tokens = sources[0].one_token, sources[0].many_tokens
        self._packed, self._made = None, None
        self._remake()

    def _remake(self) -> None:
        src = self._sources
        with torch.no_grad():
            self.weight = self._make([m.weight.detach() for m in src]).contiguous()
            self.bias = self._make([m.bias.detach() for m in src]).contiguous() if src[0].bias is not None else None
        self.out_features, self.in_features = self.weight.shape
        self._made = [tensor_version(m.weight) for m in src]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self._sources
        if self._made != [tensor_version(m.weight) for m in src]:
            self._remake()
        self.one_token, self.many_tokens = src[0].one_token, src[0].many_tokens
        return super().forward(x)


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


@dataclass
class KernelChoice:
    """The linear kernels kept for one-token passes (plain decoding, drafting) and for passes of several tokens
    (verification, prefill), with the timings they were chosen by."""

    one_token: str  # one of KERNELS
    many_tokens: str
    ms: dict[str, float] = field(default_factory=dict)  # "<kernels>/<tokens>": median forward, ms

    def __str__(self) -> str:
        return f"one token {self.one_token}, several {self.many_tokens}"

    @classmethod
    def parse(cls, text: str) -> "KernelChoice":
        """The choice ``str(choice)`` wrote (e.g. the cost model's record of the kernels it was timed on)."""
        m = re.fullmatch(r"one token (\w+), several (\w+)", text.strip())
        if m is None or not set(m.groups()) <= set(KERNELS):
            raise ValueError(f"{text!r} is not a kernel choice ('one token K, several K' with K in {KERNELS})")
        return cls(*m.groups())


def set_linear_kernels(model: nn.Module, one_token: str, many_tokens: str) -> int:
    """Route every CpuLinear's one-row and several-row calls to the named kernels (``KERNELS``); returns their number.
    ``onednn`` where this torch has no oneDNN is a ValueError naming the others."""
    for k in (one_token, many_tokens):
        if k not in KERNELS:
            raise ValueError(f"kernels {k!r}: expected one of {KERNELS}")
        if k not in available_kernels():
            raise ValueError(f"kernels {k!r}: this torch build has no oneDNN (torch.backends.mkldnn): use one of "
                             f"{available_kernels()}")
    layers = [m for m in model.modules() if isinstance(m, CpuLinear)]
    for m in layers:
        m.one_token, m.many_tokens = one_token, many_tokens
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
    saved = [(m.one_token, m.many_tokens) for m in layers]  # restored as they were (tuned or not)
    attention = model.config._attn_implementation
    for m in layers:
        m.one_token = m.many_tokens = "torch"
    if attention == ATTENTION:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        for m, (one, many) in zip(layers, saved):
            m.one_token, m.many_tokens = one, many
        if attention == ATTENTION:
            model.set_attn_implementation(ATTENTION)
