"""lede.core.kernels: the CPU linear and attention kernels compute what transformers' layers compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lede.core.engine import Decoder
from lede import Autoregressive, Static
from lede.core.kernels import (ATTENTION, KERNEL_OPTIONS, CpuLinear, available_kernels, reference_kernels,
                               set_linear_kernels, use_cpu_kernels)
from lede.core.tuning import pick_kernel, tune_cpu_kernels
from lede.core.model import ModelError
from lede.drafters.loading import load_model
from lede.testing import tiny_model


needs_onednn = pytest.mark.skipif("onednn" not in available_kernels(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("kernel", available_kernels())
@pytest.mark.parametrize("shape", [(1, 48), (2, 48), (3, 48), (1, 5, 48), (2, 1, 48)])
def test_cpu_linear_matches_f_linear(shape, kernel):
    torch.manual_seed(0)
    ref = nn.Linear(48, 40)
    fast = CpuLinear(ref, kernel, kernel)
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
            assert not any(m.enabled for m in lm.model.modules() if isinstance(m, CpuLinear))  # all F.linear
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


# every weight shape of SmolLM2-135M's pass: q, k/v, o, gate/up, down (K = 1536: oneDNN's M = 1 path differs there)
SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


@needs_onednn
@pytest.mark.parametrize("out_in", SMOLLM2_SHAPES)
def test_onednn_linear_is_batch_invariant(out_in):
    """Every row of an M-row product is bit-identical to the same row computed alone, M = 1..9 (and with a bias):
    a verification pass of T tokens then computes each token's linears exactly as a one-token pass would."""
    out_f, in_f = out_in
    torch.manual_seed(0)
    for bias in (False, True):
        fast = CpuLinear(nn.Linear(in_f, out_f, bias=bias), "onednn", "onednn")
        x = torch.randn(9, in_f)
        with torch.inference_mode():
            alone = torch.cat([fast(x[i : i + 1]) for i in range(9)])
            for m in range(2, 10):
                assert torch.equal(fast(x[:m]), alone[:m]), (out_in, bias, m)
            torch.testing.assert_close(alone, nn.functional.linear(x, fast.weight, fast.bias), rtol=1e-4, atol=1e-4)


@needs_onednn
def test_onednn_repacks_a_changed_weight_and_subsets_follow_their_parent():
    torch.manual_seed(0)
    model = nn.Sequential(CpuLinear(nn.Linear(32, 24, bias=False), "onednn", "onednn"))
    fast, x = model[0], torch.randn(2, 32)
    with torch.inference_mode():
        before = fast(x)
    with torch.no_grad():
        fast.weight.mul_(2)  # e.g. a merged early-exit delta after the first pass
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), 2 * before)
        sub = fast.rows(torch.tensor([3, 7, 11]))
        torch.testing.assert_close(sub(x), fast(x)[:, [3, 7, 11]])
        set_linear_kernels(model, "torch", "torch")  # reaches the subset through its parent
        assert torch.equal(sub(x[:1]), nn.functional.linear(x[:1], sub.weight))


def test_pick_kernel_keeps_the_first_unless_clearly_beaten():
    ms = {"onednn/1": 30.0, "lede/1": 28.0, "torch/1": 26.0, "onednn/5": 40.0, "lede/5": 35.0, "torch/5": 60.0}
    kernels = ("onednn", "lede", "torch")
    assert pick_kernel(ms, kernels, 1, 0.1) == "torch"  # 26 ms < 0.9 x 30 ms: clearly faster
    assert pick_kernel(ms, kernels, 1, 0.15) == "onednn"
    assert pick_kernel(ms, kernels, 5, 0.1) == "lede"
    assert pick_kernel(ms, ("lede", "torch"), 5, 0.1) == "lede"


def test_tuning_keeps_the_timed_faster_kernels_and_output_stays_exact():
    """tune_cpu_kernels times every available kernel per width and keeps the first unless another is clearly faster;
    whichever mix it (or a user) sets, speculative output equals plain greedy output under that mix."""
    lm = tiny_model("llama", num_layers=4, dtype=torch.float32, seed=2)
    with pytest.raises(ValueError, match="use_cpu_kernels first"):
        tune_cpu_kernels(lm)
    use_cpu_kernels(lm.model)
    choice = tune_cpu_kernels(lm, context=16, tokens=3, repeats=2)
    kernels = available_kernels()
    assert set(choice.ms) == {f"{k}/{t}" for k in kernels for t in (1, 3)} and all(v > 0 for v in choice.ms.values())
    assert choice.one_token == pick_kernel(choice.ms, kernels, 1, 0.1)
    assert choice.many_tokens == pick_kernel(choice.ms, kernels, 3, 0.1)
    layers = [m for m in lm.model.modules() if isinstance(m, CpuLinear)]
    assert all((m.one_token, m.many_tokens) == (choice.one_token, choice.many_tokens) for m in layers)
    dec, prompt = Decoder(lm), [5, 17, 33, 2, 9]
    mixes = [("torch", "lede"), ("lede", "torch"), ("torch", "torch")] + [("onednn", "onednn")] * ("onednn" in kernels)
    for mix in mixes:
        set_linear_kernels(lm.model, *mix)
        ref = dec.generate(prompt, Autoregressive(), max_new_tokens=30).token_ids
        for layer, k in [(1, 2), (2, 4), (3, 6)]:
            assert dec.generate(prompt, Static(layer, k), max_new_tokens=30).token_ids == ref, (mix, layer, k)


@needs_onednn
def test_onednn_passes_match_transformers_and_the_reduced_vocab_head():
    """A model on oneDNN's kernels gives transformers' logits, and a reduced-vocabulary draft head on them gives the
    full head's logits on its rows."""
    from lede.core.exits import ExitHead

    lm = tiny_model("llama", num_layers=3, dtype=torch.float32, seed=4)
    use_cpu_kernels(lm.model)
    set_linear_kernels(lm.model, "onednn", "onednn")
    ids = torch.randint(0, 96, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    dec = Decoder(lm)
    with torch.inference_mode():
        cache = dec.new_cache(40)
        dec.prefill(ids[:-4], cache)
        ours = dec.verify(ids[-4:], None, cache)
        with reference_kernels(lm.model):
            theirs = lm.model(torch.tensor([ids])).logits[0, -4:]
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        vocab = torch.tensor([0, 5, 9, 40, 95])
        head = ExitHead(dec.norm, dec.lm_head, vocab=vocab)
        h = torch.randn(2, lm.config.hidden_size)
        sub = head(h)
        torch.testing.assert_close(sub[:, vocab], dec.lm_head(dec.norm(h))[:, vocab], rtol=1e-5, atol=1e-5)
        assert torch.isinf(sub[:, 1]).all()


def test_onednn_unavailable_is_one_clear_error(monkeypatch):
    import lede.drafters.loading as loading

    monkeypatch.setattr(loading, "available_kernels", lambda: ("lede", "torch"))
    with pytest.raises(ModelError, match="kernels='onednn': this torch build has no oneDNN"):
        load_model("smollm2-135m", kernels="onednn")


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


def test_a_recorded_kernel_choice_is_read_back_and_loaded_untimed(monkeypatch, tmp_path):
    """The cost model records str(KernelChoice); the study's later jobs parse it and load the model on exactly those
    kernels, untimed (study.load_lm with costs_path), instead of letting `auto` choose again at load."""
    import lede.drafters.loading as loading
    import lede.study as study
    from lede.core.costs import CostModel
    from lede.core.kernels import KernelChoice

    choice = KernelChoice("lede", "onednn")
    assert KernelChoice.parse(str(choice)) == choice
    for bad in ("one token fast, several lede", "lede"):
        with pytest.raises(ValueError, match="is not a kernel choice"):
            KernelChoice.parse(bad)
    monkeypatch.setattr(loading, "available_kernels", lambda: ("lede", "torch"))
    with pytest.raises(ModelError, match=r"\['onednn'\] not available"):
        load_model("smollm2-135m", kernels=choice)
    seen = {}
    monkeypatch.setattr(loading, "load_model", lambda spec, **kw: seen.update(kw))
    costs = CostModel(model="m", dtype="float32", device="cpu", threads=2, context_len=8, draft_ms={}, verify_ms={1: 1.0},
                      kernels=str(choice))
    costs.save(tmp_path / "costs.json")

    class Params(dict):
        model, dtype, device, kernels = "smollm2-135m", "float32", "cpu", "auto"

    study.load_lm(Params(), costs_path=tmp_path / "costs.json")
    assert seen["kernels"] == choice
    study.load_lm(Params(), kernels="torch", costs_path=tmp_path / "costs.json")  # training's explicit choice wins
    assert seen["kernels"] == "torch"
    study.load_lm(Params())  # no cost model yet (the cost model's own job): auto times them
    assert seen["kernels"] == "auto"
    assert seen["compiled"] is False and tuple(seen["compile_cuts"]) == ()  # a job that does not time decoding
    study.load_lm(Params(compile=True, compile_cuts=[2, 6]))  # timed_params (workflow/rules/common.smk)
    assert seen["compiled"] is True and list(seen["compile_cuts"]) == [2, 6]
