"""lede.core.fastpath: the lean layer forward computes what transformers' layers compute, and speculative output
through it equals plain decoding through it (tiny float32 models)."""

from __future__ import annotations

import pytest
import torch

from lede import Autoregressive, Static
from lede.core.engine import Decoder
from lede.core.fastpath import FastLayers, supports
from lede.core.kernels import available_kernels, set_linear_kernels, use_cpu_kernels
from lede.core.policy import LOOKUP
from lede.testing import tiny_model


def fast_tiny(model_type: str = "llama", seed: int = 1, layers: int = 4):
    lm = tiny_model(model_type, num_layers=layers, dtype=torch.float32, seed=seed)
    use_cpu_kernels(lm.model)
    lm.fast_layers = FastLayers(lm.model)
    return lm


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("kernel", available_kernels())
def test_fast_layers_give_the_layers_own_logits(model_type, kernel):
    """Prefill, a 1-token and a 4-token pass through the lean forward equal the same passes through the model's own
    layers (transformers' modules, same kernels), and transformers' full forward, up to float rounding."""
    lm = fast_tiny(model_type)
    set_linear_kernels(lm.model, kernel, kernel)
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    dec, fast = Decoder(lm), lm.fast_layers
    out = {}
    with torch.inference_mode():
        for name, layers in (("fast", fast), ("own", None)):
            lm.fast_layers = layers
            cache = dec.new_cache(48)
            dec.prefill(ids[:35], cache)
            out[name] = torch.cat([dec.verify(ids[35:36], None, cache), dec.verify(ids[36:40], None, cache)])
        theirs = lm.model(torch.tensor([ids])).logits[0, -5:]
    torch.testing.assert_close(out["fast"], out["own"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["fast"], theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", available_kernels())
def test_speculative_output_through_the_fast_layers_equals_plain_decoding(kernel):
    lm = fast_tiny(seed=2, layers=6)
    set_linear_kernels(lm.model, kernel, kernel)
    dec = Decoder(lm, max_draft_len=8)
    for prompt in ([5, 17, 33, 2, 9], [40, 41, 42, 43, 40, 41, 42]):
        ref = dec.generate(prompt, Autoregressive(), max_new_tokens=40).token_ids
        for policy in (Static(1, 3), Static(3, 5), Static(5, 8), Static(LOOKUP, 4)):
            assert dec.generate(prompt, policy, max_new_tokens=40).token_ids == ref, (kernel, prompt, policy.name)


def test_fused_weights_follow_the_model_and_unsupported_models_say_why():
    lm = fast_tiny(seed=3)
    ids = [3, 14, 15, 92, 65]
    dec = Decoder(lm)
    with torch.inference_mode():
        cache = dec.new_cache(8)
        before = dec.verify(ids, None, cache)
    with torch.no_grad():  # e.g. merging an early-exit delta after the model loaded: the fused copies follow
        lm.model.model.layers[1].self_attn.k_proj.weight.mul_(1.5)
        lm.model.model.layers[2].mlp.up_proj.weight.mul_(0.5)
    with torch.inference_mode():
        cache = dec.new_cache(8)
        after = dec.verify(ids, None, cache)
        lm.fast_layers = None
        cache = dec.new_cache(8)
        own = dec.verify(ids, None, cache)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, own, rtol=1e-4, atol=1e-4)
    plain = tiny_model("llama", num_layers=2, dtype=torch.float32)  # transformers' linears (kernels="torch")
    assert "not lede's CpuLinear" in supports(plain.model)
    qwen3 = tiny_model("qwen3", num_layers=2, dtype=torch.float32)
    use_cpu_kernels(qwen3.model)
    assert "not LLaMA-style" in supports(qwen3.model)
    with pytest.raises(ValueError, match="FastLayers cannot run this model"):
        FastLayers(qwen3.model)
