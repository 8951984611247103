"""The cost model: how long a draft step and a verification pass take *on this machine*.

    from lede.costs import measure_costs
    costs = measure_costs(decoder, exit_layers=[4, 8, 12], max_draft_len=8)
    costs.save("results/costs.json")
    costs.round_ms(layer=8, drafted=3)    # 3 draft steps at L = 8 + verifying 4 tokens

``draft_ms[L]``: one token through layers [0, L) and layer L's exit head (adapter and reduced
vocabulary included, as the decoder is configured). ``verify_ms[T]``: T tokens through all layers and
the full LM head (T = K + 1: the pending token and K drafts; T = 1 is a plain decoding step).
Each is the median of ``repeats`` runs after warm-up, measured round-robin over all items so that
drift of a shared machine spreads evenly, at a fixed context length (attention cost grows with it).

Derived quantities (units of one plain step, c = draft_ms[L] / verify_ms[1], v_T = verify_ms[T] / verify_ms[1]):
a round that drafts K tokens costs K·c + v_{K+1} plain steps and emits A + 1 tokens (A accepted), so
its speedup over plain decoding is (A + 1) / (K·c + v_{K+1}).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lede.engine import Decoder


@dataclass
class CostModel:
    model: str
    dtype: str
    device: str
    threads: int
    context_len: int
    draft_ms: dict[int, float]  # with the decoder's configured exit heads
    verify_ms: dict[int, float]
    draft_plain_ms: dict[int, float] = field(default_factory=dict)  # plain head: final norm + full LM head
    spread: dict[str, float] = field(default_factory=dict)  # (q75 - q25) / median per item

    @property
    def plain_ms(self) -> float:
        return self.verify_ms[1]

    def round_ms(self, layer: int | None, drafted: int, plain_head: bool = False) -> float:
        if layer is None or drafted == 0:
            return self.verify_ms[1]
        draft_ms = self.draft_plain_ms if plain_head else self.draft_ms
        if layer not in draft_ms:
            raise KeyError(f"exit layer {layer} was not measured by the cost model (measured: {sorted(self.draft_ms)})")
        if drafted + 1 not in self.verify_ms:
            raise KeyError(f"verification of {drafted + 1} tokens was not measured (max {max(self.verify_ms)})")
        return drafted * draft_ms[layer] + self.verify_ms[drafted + 1]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        blob = json.loads(Path(path).read_text())
        blob["draft_ms"] = {int(k): v for k, v in blob["draft_ms"].items()}
        blob["verify_ms"] = {int(k): v for k, v in blob["verify_ms"].items()}
        blob["draft_plain_ms"] = {int(k): v for k, v in blob.get("draft_plain_ms", {}).items()}
        return cls(**blob)


@torch.inference_mode()
def measure_costs(
    decoder: Decoder,
    exit_layers: list[int],
    max_draft_len: int,
    context_len: int = 256,
    repeats: int = 15,
    warmup: int = 3,
) -> CostModel:
    for layer in exit_layers:
        decoder._check_exit(layer)
    if max_draft_len < 1:
        raise ValueError(f"max_draft_len={max_draft_len} must be >= 1")
    cache = decoder.new_cache(context_len + max_draft_len + 2)
    vocab = decoder.lm.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (context_len,), generator=gen).tolist()
    decoder._verify(prefix, None, cache)  # fill the cache to the context length

    def draft(layer, head=None):
        h = decoder.embed(torch.tensor([[7]], device=decoder.lm.device))
        h = decoder._layers(h, 0, layer, cache)
        (head or decoder.head(layer))(h[0, -1])
        cache.crop(context_len)

    def verify(t):
        decoder._verify([7] * t, None, cache)
        cache.crop(context_len)

    items = [(f"draft_{l}", lambda l=l: draft(l)) for l in exit_layers]
    items += [(f"draftplain_{l}", lambda l=l: draft(l, decoder.plain_head)) for l in exit_layers]
    items += [(f"verify_{t}", lambda t=t: verify(t)) for t in range(1, max_draft_len + 2)]
    times: dict[str, list[float]] = {name: [] for name, _ in items}
    sync = torch.cuda.synchronize if decoder.lm.device.type == "cuda" else (lambda: None)
    for rep in range(warmup + repeats):
        for name, fn in items:
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if rep >= warmup:
                times[name].append((time.perf_counter() - t) * 1000)

    def med(xs):
        return statistics.median(xs)

    def spread(xs):
        q = statistics.quantiles(xs, n=4)
        return (q[2] - q[0]) / med(xs)

    return CostModel(
        model=decoder.lm.name, dtype=str(decoder.lm.dtype).removeprefix("torch."), device=str(decoder.lm.device),
        threads=torch.get_num_threads(), context_len=context_len,
        draft_ms={l: med(times[f"draft_{l}"]) for l in exit_layers},
        verify_ms={t: med(times[f"verify_{t}"]) for t in range(1, max_draft_len + 2)},
        draft_plain_ms={l: med(times[f"draftplain_{l}"]) for l in exit_layers},
        spread={name: spread(xs) for name, xs in times.items()},
    )
