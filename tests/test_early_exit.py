"""The early-exit-trained variant (lede.early_exit) on tiny random models: training moves the exits toward
the teacher, the saved deltas merge into exactly the trained model, the variant decodes exactly, and a
foreign or missing artefact is a clear error."""

from __future__ import annotations

import copy

import pytest
import torch

from lede import Autoregressive, Decoder, Static
from lede.distill import Sequence
from lede.early_exit import (
    EarlyExitError, LoRALinear, Recipe, attach_lora, detach_lora, merge_early_exit, read_early_exit,
    save_early_exit, train_early_exit,
)
from lede.model import ModelError, load_model
from lede.testing import tiny_model


def fresh(seed: int = 0):
    return tiny_model("llama", num_layers=6, vocab_size=96, seed=seed)


def greedy_sequences(lm, n: int = 6, length: int = 24) -> list[Sequence]:
    dec = Decoder(lm)
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 96, (8,), generator=gen).tolist()
        cont = dec.generate(prompt, Autoregressive(), max_new_tokens=length, stop_at_eos=False).token_ids
        out.append(Sequence(prompt, cont, "c", f"u{i}"))
    return out


@torch.no_grad()
def exit_kl(lm, seqs, layer: int) -> float:
    """Mean KL(full model ‖ plain exit head at ``layer``) over the sequences' positions."""
    total, n = 0.0, 0
    for s in seqs:
        out = lm.model(torch.tensor([s.prompt_ids + s.continuation]), output_hidden_states=True)
        p = torch.log_softmax(out.logits[0], -1)
        q = torch.log_softmax(lm.model.lm_head(lm.model.model.norm(out.hidden_states[layer][0])), -1)
        total += float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum"))
        n += p.shape[0]
    return total / n


RECIPE = dict(exit_layers=[2, 3], rank=4, alpha=8.0, lr=5e-3, steps=30, batch=2, max_context=64, vocab_size=0)


@pytest.fixture(scope="module")
def trained():
    lm = fresh()
    seqs = greedy_sequences(lm)
    result = train_early_exit(lm, seqs, Recipe(**RECIPE), data_hash="h", progress=False)
    return lm, seqs, result


def test_untrained_lora_is_the_base_model_and_detaches_cleanly():
    lm = fresh()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = lm.model(ids).logits
    wrapped = attach_lora(lm.model, Recipe(exit_layers=[2], rank=4))
    assert len(wrapped) == 6 * 7 and all(isinstance(m, LoRALinear) for m in wrapped.values())
    torch.testing.assert_close(lm.model(ids).logits, before, rtol=0, atol=0)  # B = 0
    detach_lora(lm.model)
    assert not any(isinstance(m, LoRALinear) for m in lm.model.modules())


def test_training_moves_exits_toward_the_teacher_and_leaves_the_base_untouched(trained):
    lm, seqs, result = trained
    untouched = fresh()
    for a, b in zip(lm.model.parameters(), untouched.model.parameters()):
        assert torch.equal(a, b)  # the deltas live in the result, not in the base model
    variant = copy.deepcopy(untouched)
    merge_early_exit(variant.model, lm.name, {"meta": {"base_model": lm.name, "num_layers": 6}, "deltas": result.deltas})
    for layer in (2, 3):
        assert exit_kl(variant, seqs, layer) < 0.8 * exit_kl(untouched, seqs, layer), layer
    assert result.steps_done == 30 and not result.stopped_by_budget
    assert set(result.loss_curve[0]) == {"step", "loss", "L2", "L3", "final"}


def test_merged_weights_equal_the_trained_lora_forward(trained, tmp_path):
    lm, seqs, result = trained
    path = tmp_path / "ee.pt"
    save_early_exit(path, result, metrics={"x": 1})
    blob = read_early_exit(path)
    assert blob["meta"]["recipe"]["rank"] == 4 and blob["meta"]["metrics"] == {"x": 1}
    # LoRA forward with the trained factors ...
    ref = fresh()
    wrapped = attach_lora(ref.model, Recipe(**RECIPE))
    for name, m in wrapped.items():
        m.A.data.copy_(result.deltas[name]["A"])
        m.B.data.copy_(result.deltas[name]["B"])
    ids = torch.tensor([seqs[0].prompt_ids + seqs[0].continuation])
    with torch.no_grad():
        want = ref.model(ids).logits
    # ... equals the merged model
    variant = fresh()
    merge_early_exit(variant.model, lm.name, blob, str(path))
    with torch.no_grad():
        torch.testing.assert_close(variant.model(ids).logits, want, rtol=1e-9, atol=1e-9)


def test_variant_decodes_exactly_its_own_greedy_output(trained):
    lm, seqs, result = trained
    variant = fresh()
    merge_early_exit(variant.model, lm.name, {"meta": {"base_model": lm.name, "num_layers": 6}, "deltas": result.deltas})
    dec = Decoder(variant)
    prompt = seqs[0].prompt_ids
    ref = dec.generate(prompt, Autoregressive(), max_new_tokens=40, stop_at_eos=False).token_ids
    accepted = 0
    for layer in (2, 3):
        for k in (1, 4):
            out = dec.generate(prompt, Static(layer, k), max_new_tokens=40, stop_at_eos=False)
            assert out.token_ids == ref, (layer, k)
            accepted += sum(r.accepted for r in out.rounds)
    assert accepted > 0
    variant.draft_vocab = list(range(0, 96, 2))  # as load_model sets it from the artefact
    dec = Decoder(variant)
    assert dec.head(2).vocab is not None
    assert dec.generate(prompt, Static(2, 3), max_new_tokens=40, stop_at_eos=False).token_ids == ref


def test_checkpoint_resumes_and_budget_stops(tmp_path):
    lm, recipe = fresh(), Recipe(**{**RECIPE, "steps": 4})
    seqs = greedy_sequences(lm, n=3, length=12)
    ckpt = tmp_path / "train.ckpt"
    first = train_early_exit(lm, seqs, recipe, data_hash="h", checkpoint=ckpt, checkpoint_every=2, progress=False)
    again = train_early_exit(lm, seqs, recipe, data_hash="h", checkpoint=ckpt, progress=False)  # resumes at step 4
    assert again.steps_done == 4 and again.loss_curve == first.loss_curve
    for name in first.deltas:
        assert torch.equal(first.deltas[name]["B"], again.deltas[name]["B"])
    stopped = train_early_exit(lm, seqs, recipe, data_hash="other", checkpoint=tmp_path / "b.ckpt", budget_s=0.0,
                               progress=False)
    assert stopped.stopped_by_budget and stopped.steps_done == 0


def test_full_fine_tuning_option_restores_the_base(tmp_path):
    lm = fresh()
    before = [p.clone() for p in lm.model.parameters()]
    seqs = greedy_sequences(lm, n=2, length=12)
    result = train_early_exit(lm, seqs, Recipe(**{**RECIPE, "rank": 0, "steps": 3}), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, lm.model.parameters()))
    assert any(float(d["delta"].abs().max()) > 0 for d in result.deltas.values())
    merge_early_exit(fresh().model, lm.name, {"meta": {"base_model": lm.name, "num_layers": 6}, "deltas": result.deltas})


def test_bad_inputs_are_clear_errors(trained, tmp_path):
    lm, seqs, result = trained
    with pytest.raises(EarlyExitError, match="exit_layers"):
        Recipe(exit_layers=[6]).validate(6)
    with pytest.raises(EarlyExitError, match="one weight per exit"):
        Recipe(exit_layers=[2, 3], exit_weights=[1.0]).validate(6)
    with pytest.raises(EarlyExitError, match="no training sequence"):
        train_early_exit(fresh(), [Sequence([1], [], "c")], Recipe(exit_layers=[2]), progress=False)
    path = tmp_path / "ee.pt"
    save_early_exit(path, result)
    with pytest.raises(EarlyExitError, match="trained for base model"):
        merge_early_exit(fresh().model, "another-model", read_early_exit(path), str(path))
    with pytest.raises(EarlyExitError, match="early-exit weights not found at .*: train them first"):
        read_early_exit(tmp_path / "missing.pt")
    torch.save({"something": 1}, tmp_path / "foreign.pt")
    with pytest.raises(EarlyExitError, match="not a lede artefact of format lede-early-exit/1 \\(early-exit weights\\)"):
        read_early_exit(tmp_path / "foreign.pt")
    with pytest.raises(ModelError, match="early-exit-trained variant"):
        load_model("smollm2-135m-ee")  # the variant needs its weights
