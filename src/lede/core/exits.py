"""Exit heads: map a layer-L hidden state to draft logits.

An exit head is ``lm_head(final_norm(adapter(h_L)))``: the model's own final norm and LM head,
optionally preceded by a small per-layer adapter trained to make early layers draftable (trained by
``lede.drafters.adapters``; the base model stays frozen, so verification keeps the output exactly the model's).

Three adapter designs, of increasing cost per draft token:

* ``linear``: h + W h (full rank, zero-initialised): a per-position map, ~D² multiply-adds;
* ``lowrank``: h + B A h (rank r);
* ``decoder`` (Kangaroo-style, :class:`ContextLayer`): one extra decoder layer, initialised from one of the
  model's layers (layer L, the one that reads h_L, by default; Kangaroo's last layer as an option), that
  *attends* over the layer-L states of the whole context through its own KV cache. It costs
  about one layer per draft token (plus feeding it the verified positions, see ``lede.core.engine``), and it is
  the only design that can look back at the context (copying from the prompt, the running topic).
Adapters are saved as one ``torch.save`` file with their metadata and are checked on load: an adapter
for another model, layer or hidden size is a clear error, never a silent mismatch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lede.core.io import atomic_path, load_artefact

ADAPTER_FORMAT = "lede-exit-adapter/1"


class AdapterError(ValueError):
    """An adapter file that does not fit the model or layer it is loaded for."""


class LinearResidual(nn.Module):
    """h + W h, W zero-initialised (so an untrained adapter is the plain exit head)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.proj(h)


class LowRankResidual(nn.Module):
    """h + B A h with rank r; B zero-initialised."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=True)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.down(h))


class ContextLayer(nn.Module):
    """Kangaroo-style adapter: one decoder layer of the model's architecture over the layer-L hidden states,
    attending to every earlier position's layer-L state through its own one-layer KV cache (cache layer 0).

    Called like a decoder layer (``h [B, T, D]``, ``attention_mask``, ``position_embeddings``, ``cache``) ->
    [B, T, D]; the decoder owns the cache and the positions. Unlike the per-position designs it needs the whole
    context, so the training data, the agreement report, the replay tables and the oracle compute it over full
    sequences (``lede.drafters.adapters.context_rows``).
    """

    def __init__(self, layer: nn.Module, zero_output: bool = False):
        super().__init__()
        self.layer = layer
        self.layer.self_attn.layer_idx = 0  # its own cache, not the model's layer (N-1)
        if zero_output:  # start as the identity (the plain exit head), as the other designs do
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                nn.init.zeros_(proj.weight)
                if getattr(proj, "bias", None) is not None:
                    nn.init.zeros_(proj.bias)

    def forward(self, hidden_states: torch.Tensor, **layer_kwargs) -> torch.Tensor:
        return self.layer(hidden_states, **layer_kwargs)


DESIGNS = ("linear", "lowrank", "decoder")


def build_adapter(design: str, hidden_size: int, template: nn.Module | None = None, **options) -> nn.Module:
    """A fresh adapter. ``template``: for ``decoder``, the decoder layer to copy (any of the model's layers:
    training picks which, loading only needs the architecture)."""
    import copy

    if design == "linear":
        return LinearResidual(hidden_size)
    if design == "lowrank":
        return LowRankResidual(hidden_size, int(options.get("rank", 64)))
    if design == "decoder":
        if template is None:
            raise AdapterError("a 'decoder' adapter is built from a decoder layer of its model: pass "
                               "template=lm.model.model.layers[-1]")
        # the template's weights, except its two output projections: zero, so that training starts from the
        # plain head (the last layer applied as is to a shallow state is far worse: KL ~14 nats at L = 2)
        return ContextLayer(copy.deepcopy(template), zero_output=bool(options.get("zero_output", True)))
    raise AdapterError(f"unknown adapter design {design!r}: use one of {', '.join(DESIGNS)}")


@dataclass
class AdapterFile:
    """What an adapter file holds besides its weights."""

    model: str
    layer: int
    hidden_size: int
    design: str
    options: dict = field(default_factory=dict)
    data_hash: str = ""
    metrics: dict = field(default_factory=dict)


def save_adapter(path: str | Path, adapter: nn.Module, meta: AdapterFile, vocab: torch.Tensor | None = None) -> None:
    """Write atomically: a crash leaves the old file or none, never half of one. ``vocab``: the draft
    vocabulary the adapter was trained for (None = full)."""
    state = {k: v.detach().cpu() for k, v in adapter.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"format": ADAPTER_FORMAT, "meta": meta.__dict__, "state_dict": state, "vocab": vocab}, tmp)


def load_adapter(path: str | Path, model_name: str, layer: int, hidden_size: int,
                 template: nn.Module | None = None) -> nn.Module:
    """Load an adapter and check it was trained for this model and exit layer (its draft vocabulary,
    if any, is ``adapter.vocab``). ``template``: the model's last decoder layer, needed by ``decoder``
    adapters (their file holds the weights, the architecture comes from the model)."""
    blob = load_artefact(path, ADAPTER_FORMAT, AdapterError, "exit adapter",
                         "train it first (lede adapters) or fix the path")
    meta = AdapterFile(**blob["meta"])
    problems = []
    if meta.model != model_name:
        problems.append(f"model {meta.model!r} (loading for {model_name!r})")
    if meta.layer != layer:
        problems.append(f"layer {meta.layer} (loading for layer {layer})")
    if meta.hidden_size != hidden_size:
        problems.append(f"hidden size {meta.hidden_size} (model has {hidden_size})")
    if problems:
        raise AdapterError(f"adapter {path} was trained for " + ", ".join(problems) + ": retrain it for this model/layer")
    if meta.design == "decoder" and template is None:
        raise AdapterError(f"{path} is a 'decoder' (Kangaroo-style) adapter: load it with "
                           "template=lm.model.model.layers[-1] (lede.core.exits.load_exit_heads does)")
    adapter = build_adapter(meta.design, meta.hidden_size, template=template, **meta.options)
    try:
        adapter.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise AdapterError(f"adapter {path} does not fit this model's layers ({e}): retrain it for this model") from e
    adapter.vocab = blob.get("vocab")
    return adapter


class ExitHead(nn.Module):
    """Draft logits from a layer-L hidden state: lm_head(norm(adapter(h))).

    With ``vocab`` (token ids), only those rows of the LM head are computed (a reduced-vocabulary
    draft head: the full 49k-row head of a small model costs as much as several layers); the other
    logits are -inf, so drafts come from the set and the draft distribution q is zero outside it.
    Verification always uses the full head.

    A :class:`ContextLayer` adapter is kept as ``context``, not applied by ``forward``: it needs a KV cache
    and positions, which the caller owns (the engine's draft step; ``lede.drafters.adapters.head_input``), so
    ``forward`` takes the context layer's output.
    """

    def __init__(self, norm: nn.Module, lm_head: nn.Module, adapter: nn.Module | None = None,
                 vocab: torch.Tensor | None = None):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head
        self.context = adapter if isinstance(adapter, ContextLayer) else None
        self.adapter = None if self.context is not None else adapter
        self.vocab = vocab
        self._sub = None  # the head's rows of ``vocab`` as a CpuLinear on the model's kernels, where it has them
        if vocab is not None:
            if hasattr(lm_head, "rows"):  # lede.core.kernels.CpuLinear (duck-typed: exits sit beside kernels)
                self.__dict__["_sub"] = lm_head.rows(vocab)  # not a submodule: the LM head belongs to the model
            else:  # transformers' own linear: the rows as a plain matrix
                self.register_buffer("sub_weight", lm_head.weight[vocab].detach().clone(), persistent=False)

    def forward(self, h: torch.Tensor, lm_head=None) -> torch.Tensor:  # [..., D] -> [..., V]
        """``lm_head``: computes this head's LM head where the whole vocabulary is drafted (the engine passes its
        route to a compiled head, ``Decoder._lm_head``)."""
        if self.adapter is not None:
            h = self.adapter(h)
        h = self.norm(h)
        if self.vocab is None:
            return (lm_head or self.lm_head)(h)
        sub = self._sub(h) if self._sub is not None else h @ self.sub_weight.T  # [..., |vocab|]
        full = sub.new_full((*sub.shape[:-1], self.lm_head.weight.shape[0]), float("-inf"))
        return full.index_copy_(-1, self.vocab, sub)


def build_exit_heads(
    lm, adapters: dict[int, nn.Module | None], vocab: torch.Tensor | None = None
) -> dict[int, ExitHead]:
    """One ExitHead per exit layer, sharing the model's norm and LM head; adapters are cast to the
    model's dtype and device. ``adapters`` may map a layer to None (plain head, maybe reduced vocab)."""
    heads = {}
    for layer, adapter in adapters.items():
        if adapter is not None:
            adapter = adapter.to(device=lm.device, dtype=lm.dtype).eval().requires_grad_(False)
        v = vocab.to(lm.device) if vocab is not None else None
        heads[layer] = ExitHead(lm.model.model.norm, lm.model.lm_head, adapter, v)
    return heads


def heads_from_selection(lm, selection: dict, base_dir: str | Path = ".") -> dict[int, ExitHead]:
    """Exit heads from a selection file's content: {"vocab": [ids] | null, "layers": {"L": adapter path | null}};
    relative adapter paths are resolved against ``base_dir`` (the selection file's folder, see :func:`load_exit_heads`)."""
    vocab = torch.tensor(selection["vocab"], dtype=torch.long) if selection.get("vocab") else None
    adapters = {}
    for layer, path in selection["layers"].items():
        adapters[int(layer)] = (load_adapter(Path(base_dir) / path, lm.name, int(layer), lm.hidden_size,
                                             template=lm.model.model.layers[-1]) if path else None)
    return build_exit_heads(lm, adapters, vocab)


def load_exit_heads(lm, selection_file: str | Path) -> dict[int, ExitHead]:
    """Exit heads from a selection file (the workflow's ``exits/selected.json``). Its adapter paths are relative
    to the file itself, so a results folder can be moved or copied whole."""
    path = Path(selection_file)
    return heads_from_selection(lm, read_selection(path), base_dir=path.parent)


def read_selection(selection_file: str | Path, check_adapters: bool = False) -> dict:
    """A selection file's content, checked: valid JSON with a "layers" mapping (and, with ``check_adapters``,
    every adapter file it names a readable lede adapter), or :class:`AdapterError` naming the file and the fix."""
    path = Path(selection_file)
    fix = "run the workflow's exit_report rule (snakemake <results>/exits/selected.json) or pass the right path"
    if not path.is_file():
        raise AdapterError(f"exit-head selection file {path} does not exist: {fix}")
    try:
        sel = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"exit-head selection file {path} is not valid JSON ({err}): {fix}") from None
    if not isinstance(sel, dict) or not isinstance(sel.get("layers"), dict):
        raise AdapterError(f"exit-head selection file {path} has no \"layers\" mapping: {fix}")
    if check_adapters:
        for layer, rel in sel["layers"].items():
            if rel:
                load_artefact(path.parent / rel, ADAPTER_FORMAT, AdapterError, f"exit adapter of layer {layer}",
                              "train it (snakemake exits) or fix the selection file")
    return sel


def selected_costs(costs_path: str | Path, selection_file: str | Path):
    """The measured cost model (``lede.core.costs.CostModel``) with each layer's draft priced as the exit head that the
    selection file (``exits/selected.json``) chose for it: what every reward, replay and oracle is timed by."""
    from lede.core.costs import CostModel

    heads = json.loads(Path(selection_file).read_text()).get("heads", {})
    return CostModel.load(costs_path).with_heads({int(l): h for l, h in heads.items()})
