"""lede.kernels: the CPU linear and attention kernels compute what transformers' layers compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lede.engine import Decoder
from lede.kernels import ATTENTION, CpuLinear, reference_kernels, use_cpu_kernels
from lede.testing import tiny_model


@pytest.mark.parametrize("shape", [(1, 48), (2, 48), (3, 48), (1, 5, 48), (2, 1, 48)])
def test_cpu_linear_matches_f_linear(shape):
    torch.manual_seed(0)
    ref = nn.Linear(48, 40)
    fast = CpuLinear(ref)
    x = torch.randn(*shape)
    with torch.inference_mode():
        y = fast(x)
    assert y.shape == (*shape[:-1], 40)
    assert y.is_contiguous()  # a strided output sends later ops (and SDPA) to slow paths
    torch.testing.assert_close(y, nn.functional.linear(x, ref.weight, ref.bias), rtol=1e-5, atol=1e-5)


def test_cpu_kernels_match_transformers_forward():
    """Prefill + a 3-token verification pass through our cache with the fast kernels (GQA, explicit
    bottom-right mask) give transformers' own logits for those positions."""
    lm = tiny_model("llama", num_layers=4, dtype=torch.float32, seed=1)
    assert use_cpu_kernels(lm.model) > 0
    assert lm.model.config._attn_implementation == ATTENTION
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(0)).tolist()[0]
    dec = Decoder(lm)
    with torch.inference_mode():
        cache = dec.new_cache(64)
        dec._layers(dec.embed(torch.tensor([ids[:-3]])), 0, dec.n_layers, cache)
        ours = dec._verify(ids[-3:], None, cache)  # [3, V]
        with reference_kernels(lm.model):
            assert lm.model.config._attn_implementation == "sdpa"
            assert not any(m.enabled for m in lm.model.modules() if isinstance(m, CpuLinear))
            theirs = lm.model(torch.tensor([ids])).logits[0, -3:]  # row i predicts the token after ids[-3 + i]
    assert lm.model.config._attn_implementation == ATTENTION  # restored
    assert all(m.enabled for m in lm.model.modules() if isinstance(m, CpuLinear))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
