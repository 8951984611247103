"""lede.core.compiled: decoder layers compiled by TorchInductor compute what the eager lean forward computes, keep
speculative output equal to plain decoding, compile once per segment and pass width (no recompilation as the
context grows or the cache changes size), and fall back to the eager forward with one warning (tiny float32 models;
each compilation takes seconds)."""

from __future__ import annotations

import logging

import pytest
import torch

from lede import Autoregressive, Static
from lede.core.compiled import CompiledLayers, LinearGraph, compiler_problem, graphs_compiled
from lede.core.engine import Decoder
from lede.core.fastpath import FastLayers
from lede.core.model import ModelError
from lede.core.policy import LOOKUP
from lede.drafters.loading import _compile_layers
from test_fastpath import fast_tiny

needs_compiler = pytest.mark.skipif(compiler_problem() is not None, reason=str(compiler_problem()))


@needs_compiler
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_compiled_layers_compute_the_eager_forward_and_never_recompile(model_type):
    lm = fast_tiny(model_type, seed=2, layers=6)
    eager = lm.fast_layers
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    dec = Decoder(lm, max_draft_len=8)
    out = {}
    before = graphs_compiled()
    compiled = CompiledLayers(eager, cuts=[3], head=lm.model.lm_head)
    assert compiled.cuts == [0, 3, 6] and len(compiled.segments) == 2
    assert compiled.warm(lm.config.hidden_size, torch.float32, "cpu") > 0
    # (two segments and all layers as one) x (one token, several tokens), and the LM head's one-row and several-row
    assert graphs_compiled() - before == compiled.graphs == 8
    assert compiled.recompilations == 0
    with torch.inference_mode():
        for name, layers in (("eager", eager), ("compiled", compiled)):
            lm.fast_layers = layers
            cache = dec.new_cache(48)
            dec.prefill(ids[:30], cache)  # an empty cache: eager in both
            # widths 1 and 2 through the compiled head (HEAD_ROWS), 7 through the model's own
            logits = [dec.verify(ids[30:31], None, cache), dec.verify(ids[31:33], None, cache),
                      dec.verify(ids[33:40], None, cache)]
            # drafting from the cut (compiled) and from an exit off the cuts (eager), then the verification's crop
            draft = [dec.draft_step(ids[0], 3, cache), dec.draft_step(ids[1], 2, cache)]
            out[name] = torch.cat([*logits, torch.stack(draft)])
            assert cache.lengths == [42, 42, 41, 40, 40, 40]  # each draft appended to layers [0, L)
    torch.testing.assert_close(out["compiled"], out["eager"], rtol=1e-4, atol=1e-4)
    assert compiled.head.calls == 4  # verification at widths 1 and 2, both drafts (the plain head: every token)
    assert compiled.whole_calls == 3  # the verifications (the drafts ran the first segment, or eager off the cuts)

    lm.fast_layers = eager
    prompts = ([5, 17, 33, 2, 9], [40, 41, 42, 43, 40, 41, 42, 43, 40], [7])  # [7]: a pass over one cached token
    refs = [dec.generate(p, Autoregressive(), max_new_tokens=40).token_ids for p in prompts]
    lm.fast_layers = compiled
    warmed = graphs_compiled()
    for prompt, ref in zip(prompts, refs):  # each generation makes a cache of another length
        for policy in (Autoregressive(), Static(3, 5), Static(1, 3), Static(LOOKUP, 4)):
            assert dec.generate(prompt, policy, max_new_tokens=40).token_ids == ref, (prompt, policy.name)
    assert graphs_compiled() == warmed, "a generation recompiled a segment"
    assert compiled.recompilations == 0
    assert compiled.eager_calls > 0  # the prefills and the L1 drafts (off the cuts)


@needs_compiler
def test_the_compiled_lm_head_takes_few_rows_in_inference_mode_and_refuses_a_changed_weight():
    lm = fast_tiny(seed=4, layers=2)
    head = lm.model.lm_head
    graph = LinearGraph(head, rows=2)
    graph.warm()
    x = torch.randn(3, lm.config.hidden_size)
    with torch.inference_mode():
        assert graph.takes(x[:1]) and graph.takes(x[:2]) and not graph.takes(x)  # 3 rows > rows=2
        torch.testing.assert_close(graph(x[:2]), head(x[:2]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(graph(x[0]), head(x[0]), rtol=1e-4, atol=1e-5)  # one vector, [D] -> [V]
    assert not graph.takes(x[:1])  # outside inference mode: the model's own kernel (training, autograd)
    with torch.no_grad():
        head.weight.mul_(2)  # the graph holds a copy of the old weight
    with torch.inference_mode():
        assert not graph.takes(x[:1])
    with pytest.raises(ValueError, match="rows=0"):
        LinearGraph(head, rows=0)


def test_without_a_compiler_the_layers_stay_eager_with_one_warning(monkeypatch, caplog):
    lm = fast_tiny(seed=3)
    monkeypatch.setattr("lede.core.compiled.compiler_problem", lambda: "no C++ compiler for TorchInductor (test)")
    with caplog.at_level(logging.WARNING, logger="lede.drafters.loading"):
        _compile_layers(lm, ())
    assert isinstance(lm.fast_layers, FastLayers)
    assert [r.getMessage() for r in caplog.records] == [
        "compiled=True: the decoder layers stay eager: no C++ compiler for TorchInductor (test)"]
    monkeypatch.setattr("lede.core.compiled.compiler_problem", lambda: None)
    with pytest.raises(ModelError, match=r"compile_cuts \[4\]: exit layers must lie in 1..3"):
        _compile_layers(lm, (2, 4))
