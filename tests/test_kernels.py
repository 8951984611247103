"""lede.core.kernels: the CPU linear and attention kernels compute what transformers' layers compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lede.core.engine import Decoder
from lede import Autoregressive, Static
from lede.core.kernels import ATTENTION, KERNEL_OPTIONS, KERNELS, CpuLinear, reference_kernels, set_linear_kernels, use_cpu_kernels
from lede.core.tuning import tune_cpu_kernels
from lede.core.model import ModelError
from lede.drafters.loading import load_model
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
        ours = dec.verify(ids[-3:], None, cache)  # [3, V]
        with reference_kernels(lm.model):
            assert lm.model.config._attn_implementation == "sdpa"
            assert not any(m.enabled for m in lm.model.modules() if isinstance(m, CpuLinear))
            theirs = lm.model(torch.tensor([ids])).logits[0, -3:]  # row i predicts the token after ids[-3 + i]
    assert lm.model.config._attn_implementation == ATTENTION  # restored
    assert all(m.enabled for m in lm.model.modules() if isinstance(m, CpuLinear))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_kernel_routing_per_width():
    """set_linear_kernels routes one-row and several-row calls separately: "torch" is F.linear itself."""
    torch.manual_seed(0)
    model = nn.Sequential(CpuLinear(nn.Linear(48, 40)))
    fast, x1, x3 = model[0], torch.randn(1, 48), torch.randn(3, 48)
    with torch.inference_mode():
        assert set_linear_kernels(model, "torch", "lede") == 1
        assert torch.equal(fast(x1), nn.functional.linear(x1, fast.weight, fast.bias))
        assert torch.equal(fast(x3), (fast.weight @ x3.T).T + fast.bias)  # the GEMM path
        set_linear_kernels(model, "lede", "torch")
        assert torch.equal(fast(x3), nn.functional.linear(x3, fast.weight, fast.bias))
        torch.testing.assert_close(fast(x1), nn.functional.linear(x1, fast.weight, fast.bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kernels 'fast'"):
        set_linear_kernels(model, "fast", "lede")


def test_tuning_keeps_the_timed_faster_kernels_and_output_stays_exact():
    """tune_cpu_kernels times both kernel sets per width and keeps the faster; whichever mix it (or a user) sets,
    speculative output equals plain greedy output under that mix."""
    lm = tiny_model("llama", num_layers=4, dtype=torch.float32, seed=2)
    with pytest.raises(ValueError, match="use_cpu_kernels first"):
        tune_cpu_kernels(lm)
    use_cpu_kernels(lm.model)
    choice = tune_cpu_kernels(lm, context=16, tokens=3, repeats=2)
    assert set(choice.ms) == {f"{k}/{t}" for k in KERNELS for t in (1, 3)} and all(v > 0 for v in choice.ms.values())
    for kept, t in ((choice.one_token, 1), (choice.many_tokens, 3)):  # torch's only where faster by > 10%
        assert kept == ("torch" if choice.ms[f"torch/{t}"] < 0.9 * choice.ms[f"lede/{t}"] else "lede")
    layers = [m for m in lm.model.modules() if isinstance(m, CpuLinear)]
    assert all(m.one_row == (choice.one_token == "lede") and m.many_rows == (choice.many_tokens == "lede")
               for m in layers)
    dec, prompt = Decoder(lm), [5, 17, 33, 2, 9]
    for mix in [("torch", "lede"), ("lede", "torch"), ("torch", "torch")]:
        set_linear_kernels(lm.model, *mix)
        ref = dec.generate(prompt, Autoregressive(), max_new_tokens=30).token_ids
        for layer, k in [(1, 2), (2, 4), (3, 6)]:
            assert dec.generate(prompt, Static(layer, k), max_new_tokens=30).token_ids == ref, (mix, layer, k)


def test_unknown_kernels_option_is_a_clear_error():
    with pytest.raises(ModelError, match="kernels='fast': expected one of"):
        load_model("smollm2-135m", kernels="fast")


def test_kernel_options_are_spelled_once():
    """The config schema's enum and the CLI's choices are lede.core.kernels.KERNEL_OPTIONS (the one list)."""
    import argparse
    from pathlib import Path

    import yaml

    from lede.cli import _common

    schema = yaml.safe_load((Path(__file__).parents[1] / "config" / "schema.yaml").read_text())
    assert tuple(schema["properties"]["kernels"]["enum"]) == KERNEL_OPTIONS
    parser = argparse.ArgumentParser()
    _common(parser)
    assert tuple(next(a for a in parser._actions if a.dest == "kernels").choices) == KERNEL_OPTIONS
