"""The early-exit-trained variant (lede.drafters.early_exit) on tiny random models: training moves the exits toward
the teacher, the saved deltas merge into exactly the trained model, the variant decodes exactly, and a
foreign or missing artefact is a clear error."""

from __future__ import annotations

import copy

import pytest
import torch

from lede import Autoregressive, Decoder, Static
from lede.drafters.distill import Sequence
from lede.drafters.early_exit import (
    EarlyExitError, LoRALinear, Recipe, attach_lora, detach_lora, merge_early_exit, read_early_exit,
    save_early_exit, train_early_exit,
)
from lede.core.model import ModelError
from lede.drafters.loading import load_model
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
    assert set(result.loss_curve[0]) == {"step", "lr", "loss", "L2", "L3", "final"}


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


class FakeClock:
    """One second per reading: a budget then buys a known number of steps, whatever the machine's speed."""

    def __init__(self, kill_at: float = float("inf")):
        self.t, self.kill_at = 0.0, kill_at

    def __call__(self) -> float:
        self.t += 1.0
        if self.t >= self.kill_at:
            raise KeyboardInterrupt("killed")
        return self.t


def test_budget_fits_the_schedule_and_resume_keeps_it(tmp_path, caplog):
    lm, recipe = fresh(), Recipe(**{**RECIPE, "steps": 200})
    seqs = greedy_sequences(lm, n=3, length=12)
    ckpt = tmp_path / "train.ckpt"
    result = train_early_exit(lm, seqs, recipe, data_hash="h", checkpoint=ckpt, checkpoint_every=5, budget_s=100.0,
                              progress=False, clock=FakeClock())
    # ~2 clock readings a step: the 100 s budget buys ~43 of the 200 steps, and the run ends at the horizon it
    # fitted (not by the hard stop), with the learning rate decayed from its peak to ~0 over exactly those steps
    assert 30 < result.horizon < 48 and result.steps_done == result.horizon and result.stopped_by_budget
    lrs = [row["lr"] for row in result.loss_curve]
    assert max(lrs) == pytest.approx(recipe.lr, rel=0.05) and lrs[-1] < 0.02 * recipe.lr
    # killed after a fit, the rerun resumes from the last checkpoint (its curve kept) and refits the horizon to
    # what is left of the budget (the killed run's time up to its checkpoint counts), again decaying to ~0
    half = tmp_path / "half.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_early_exit(fresh(), seqs, recipe, data_hash="h", checkpoint=half, checkpoint_every=5, budget_s=100.0,
                         progress=False, clock=FakeClock(kill_at=60))
    blob = torch.load(half, weights_only=False)
    assert blob["plan"]["fitted"] and blob["step"] >= 20
    with caplog.at_level("INFO", logger="lede.drafters.early_exit"):
        again = train_early_exit(fresh(), seqs, recipe, data_hash="h", checkpoint=half, budget_s=100.0, progress=False,
                                 clock=FakeClock())
    assert "resumed early-exit training" in caplog.text
    assert again.loss_curve[:blob["step"]] == blob["curve"] and again.steps_done == again.horizon
    assert 30 < again.horizon < 50 and again.loss_curve[-1]["lr"] < 0.02 * recipe.lr
    # another budget is another schedule: the checkpoint is not resumed
    other = train_early_exit(fresh(), seqs, recipe, data_hash="h", checkpoint=half, budget_s=50.0, progress=False,
                             clock=FakeClock())
    assert other.horizon < result.horizon and "for another recipe, data or budget" in caplog.text
    # without a budget the schedule is the recipe's
    unbudgeted = train_early_exit(fresh(), seqs, Recipe(**{**RECIPE, "steps": 6}), progress=False)
    assert unbudgeted.horizon == 6 and not unbudgeted.stopped_by_budget


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
