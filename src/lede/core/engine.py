"""Self-speculative decoding with a per-round choice of exit layer and draft length.

    from lede.drafters.loading import load_model
    from lede.core.engine import Decoder, Sampling
    from lede.core.policy import Static
    lm = load_model("smollm2-135m")
    out = Decoder(lm).generate(lm.encode_chat("Hi!"), Static(exit_layer=8, draft_len=4), max_new_tokens=64)
    print(out.text, out.tokens_per_s, out.mean_accepted)

One round (the whole algorithm; the loop is ``lede.core.rounds.run_round``, shared with the replays, and the model's
side of it is ``_ModelSource`` below: ``draft_step`` forwards the first L layers, ``verify`` the full model):

1. the policy picks an exit layer L (or None: a plain step, K = 0; or LOOKUP: copy, see 2);
2. **draft**: feed the pending token x0 through layers [0, L) and the exit head, pick d1; feed d1, pick
   d2; ... while the policy says "keep drafting" (K tokens d1..dK). At LOOKUP the drafts are the prompt-lookup
   candidates (``lede.core.lookup``; no layer runs, the draft distribution is a point mass on each);
3. **verify**: crop layers [0, L) back to the round's start and run [x0, d1..dK] (K+1 tokens) through
   all N layers in one pass -> full-model logits p_0..p_K (p_i predicts the token after position i);
4. **accept** (greedy): a = length of the longest prefix with d_i == argmax p_{i-1}; emit d1..da and
   then argmax p_a (the full model's own next token), so every emitted token is the full model's greedy
   token. (Sampling: accept d_i with prob min(1, p(d_i)/q(d_i)); at the first rejection draw from
   norm(max(0, p - q)); if all K are accepted draw from p_K. The output is distributed exactly as p.)
5. crop every layer's cache to the accepted length: the cache then holds x0, d1..da and the next
   pending token is the emitted bonus token.

Invariant between rounds: every layer's cache holds exactly ``prompt + tokens[:-1]`` (the last
emitted token is pending), whatever exit layers earlier rounds used.

Verification *recomputes* layers [0, L) for the drafted positions instead of reusing the draft's KV
entries (LayerSkip's forward_remainder). Measured on a 2-core CPU the reuse gained under 2%; the
choice lives in ``verify`` alone.

**Context adapters** (``decoder`` design, Kangaroo-style: an extra decoder layer after layer L with its
own KV cache, ``lede.core.exits.ContextLayer``). Its cache must hold the layer-L state of every position before
the one it drafts from. The prefill and every verification pass hand each context layer the layer-L states
of the positions they settle (the prompt; x0 and the accepted drafts); the context layer consumes this
backlog lazily, in one pass, the next time a round drafts at its layer, so a layer that is not drafted at
costs nothing but keeping references. In a round that drafts at L, the context layer's entries for x0 and
the accepted drafts are kept (the drafted tokens are the verified ones) and the rejected ones are cropped.
Invariant between rounds: context cache length + backlog length = the main cache's length.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lede.core.exits import ExitHead
from lede.core.model import LoadedModel
from lede.core.lookup import MAX_NGRAM, MIN_NGRAM, NgramIndex
from lede.core.policy import LOOKUP, Confidence, DecodeState, Policy, RoundRecord
from lede.core.rounds import Draft, Verdict, accepted_prefix, emit, run_round


class _StopStrings:
    """Finds the first token whose addition makes the text contain a stop string, decoding only a
    window of recent tokens (special tokens kept, so "<|im_end|>" can be a stop string)."""

    def __init__(self, tokenizer, strings: Sequence[str]):
        self.tok, self.strings = tokenizer, [s for s in strings if s]

    def hit(self, tokens: list[int], start: int) -> int | None:
        """The length of the shortest prefix of ``tokens`` longer than ``start`` that holds a stop string."""
        if not self.strings:
            return None
        back = max(start - 32, 0)  # context before the new tokens, for strings spanning tokens
        for end in range(max(start, 0) + 1, len(tokens) + 1):
            text = self.tok.decode(tokens[back:end], skip_special_tokens=False)
            if any(s in text for s in self.strings):
                return end
        return None


class KVCache:
    """Preallocated K/V buffers, one write pointer per layer; cropping moves the pointer.

    Duck-types the one method transformers' attention calls: ``update(k, v, layer_idx)``.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_len: int, dtype, device):
        shape = (num_layers, 1, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * num_layers
        self.max_len = max_len
        self.context: dict[int, ContextCache] = {}  # exit layer -> its context adapter's cache

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        n = self.append(layer_idx, key_states[None], value_states[None])
        return self.k[layer_idx, :, :, :n], self.v[layer_idx, :, :, :n]

    def append(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Write keys/values [L, 1, KV, T, hd] of layers start .. start+L-1 after their cached positions (one copy
        for all L: the compiled segments' path) and advance those layers; returns their new length. The layers must
        hold the same number of positions."""
        layers, t = range(start, start + keys.shape[0]), keys.shape[-2]
        n = self.lengths[start]
        if any(self.lengths[i] != n for i in layers):
            raise RuntimeError(f"KV cache layers {layers.start}..{layers.stop - 1} hold different lengths "
                               f"{self.lengths[layers.start:layers.stop]}")
        if n + t > self.max_len:
            raise RuntimeError(f"KV cache overflow at layer {start}: {n}+{t} > {self.max_len}")
        self.k[layers.start : layers.stop, :, :, n : n + t] = keys
        self.v[layers.start : layers.stop, :, :, n : n + t] = values
        for i in layers:
            self.lengths[i] = n + t
        return n + t

    def crop(self, length: int, layers: range | None = None) -> None:
        """Crop the given layers (default: every layer and every context adapter's cache) to ``length``."""
        for i in layers if layers is not None else range(len(self.lengths)):
            if self.lengths[i] > length:
                self.lengths[i] = length
        if layers is None:
            for ctx in self.context.values():
                ctx.kv.crop(length)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]


@dataclass
class ContextCache:
    """A context adapter's one-layer KV cache, and the layer-L states [1, t, D] of settled positions that it
    has not consumed yet (in position order)."""

    kv: KVCache
    backlog: list[torch.Tensor]

    @property
    def settled(self) -> int:
        return self.kv.lengths[0] + sum(h.shape[1] for h in self.backlog)


@dataclass
class Sampling:
    """temperature == 0 is greedy; otherwise temperature + nucleus (top_p) sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution sampled from: softmax(logits / T), restricted to the top-p nucleus."""
        x = logits if logits.dtype == torch.float64 else logits.float()
        p = torch.softmax(x / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_p, idx = torch.sort(p, dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the top token always stays)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= self.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            p = torch.zeros_like(p).scatter_(-1, idx, sorted_p)
            p = p / p.sum(-1, keepdim=True)
        return p


@dataclass
class Generation:
    """The result of one generation: tokens, text, and one record per round."""

    prompt_len: int
    token_ids: list[int]
    text: str
    rounds: list[RoundRecord]
    prefill_s: float
    decode_s: float  # wall time of all rounds (after prefill)
    finish_reason: str  # "length" or "eos"
    policy: str = ""

    def text_until(self, tokenizer, stop_strings: Sequence[str]) -> str:
        """The text cut before the first stop string (what lm-eval's ``until`` expects)."""
        raw = tokenizer.decode(self.token_ids, skip_special_tokens=False)
        cut = min((i for i in (raw.find(s) for s in stop_strings if s) if i >= 0), default=None)
        if cut is None:
            return self.text
        text = raw[:cut]
        for special in getattr(tokenizer, "all_special_tokens", []):
            text = text.replace(special, "")
        return text

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def wall_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def mean_accepted(self) -> float:
        """Mean tokens emitted per round (accepted drafts + 1); 1.0 for plain decoding."""
        return sum(r.emitted for r in self.rounds) / len(self.rounds) if self.rounds else float("nan")

    @property
    def overhead_s(self) -> float:
        """Decode wall time spent outside model forwards and policy calls (the loop's own cost)."""
        return self.decode_s - sum(r.draft_s + r.verify_s + r.policy_s for r in self.rounds)


class Decoder:
    """Drives a ``LoadedModel`` layer by layer. ``exit_heads`` maps an exit layer to its head; layers
    without an entry use the plain head (final norm + LM head, no adapter), over the model's draft
    vocabulary when it has one (an early-exit variant's exits were trained on it)."""

    def __init__(self, lm: LoadedModel, exit_heads: dict[int, ExitHead] | None = None, max_draft_len: int = 16,
                 lookup_ngram: tuple[int, int] = (MIN_NGRAM, MAX_NGRAM)):
        self.lm = lm
        self.lookup_ngram = lookup_ngram  # (min, max) n-gram sizes of the LOOKUP drafter
        inner = lm.model.model
        self.embed: nn.Module = inner.embed_tokens
        self.layers: nn.ModuleList = inner.layers
        self.rotary: nn.Module = inner.rotary_emb
        self.norm: nn.Module = inner.norm
        self.lm_head: nn.Module = lm.model.lm_head
        self.n_layers = len(self.layers)
        vocab = torch.tensor(lm.draft_vocab, device=lm.device) if lm.draft_vocab else None
        self.plain_head = ExitHead(self.norm, self.lm_head, vocab=vocab)
        self.exit_heads = dict(exit_heads or {})
        for layer in self.exit_heads:
            self.check_exit(layer)
        self.max_draft_len = max_draft_len
        cfg = lm.config
        self._kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self._head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._max_positions = getattr(cfg, "max_position_embeddings", None)
        self._eos = lm.eos_token_ids

    # ---- model pieces ---------------------------------------------------------------------------
    def check_exit(self, layer: int) -> None:
        """Raise ValueError unless ``layer`` is an exit layer of this model (1..N-1)."""
        if not isinstance(layer, int) or not 1 <= layer <= self.n_layers - 1:
            raise ValueError(
                f"exit layer {layer!r} is outside 1..{self.n_layers - 1} for {self.lm.name} "
                f"({self.n_layers} layers): choose an exit layer in that range"
            )

    def head(self, layer: int) -> ExitHead:
        return self.exit_heads.get(layer, self.plain_head)

    def _pass_inputs(self, t: int, pos0: int, device) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The mask and rotary tables of T tokens at positions pos0 .. pos0+T-1: (mask [1, 1, T, pos0+T] or None for
        T = 1, cos [1, T, hd], sin [1, T, hd])."""
        cos, sin = self._rope
        mask = None
        if t > 1:  # explicit bottom-right-aligned causal mask: sdpa's is_causal is top-left aligned
            q_pos = torch.arange(pos0, pos0 + t, device=device)[:, None]
            mask = (torch.arange(pos0 + t, device=device)[None, :] <= q_pos)[None, None]  # [1,1,T,pos0+T]
        return mask, cos[:, pos0 : pos0 + t], sin[:, pos0 : pos0 + t]

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head on normed states x [..., D] -> logits [..., V]: through the layer stack's compiled head where
        it takes the call (``LayerStack.head``: a compiled stack, few rows), else the model's own."""
        graph = getattr(self.lm.fast_layers, "head", None)
        return graph(x) if graph is not None and graph.takes(x) else self.lm_head(x)

    def _run(self, blocks, h: torch.Tensor, cache: KVCache, pos0: int) -> torch.Tensor:
        """Run decoder layers ``blocks`` (modules) on h [1, T, D] at positions pos0 .. pos0+T-1 of ``cache``."""
        mask, cos, sin = self._pass_inputs(h.shape[1], pos0, h.device)
        for layer in blocks:
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), cache=cache, use_cache=True)
        return h

    def _layers(self, h: torch.Tensor, start: int, end: int, cache: KVCache) -> torch.Tensor:
        """Run layers [start, end) on h [1, T, D], at positions cache.lengths[start] .. +T-1 (through the model's
        ``fast_layers``, ``lede.core.fastpath`` or ``lede.core.compiled``, where it has them)."""
        fast = self.lm.fast_layers
        if fast is None:
            return self._run(self.layers[start:end], h, cache, cache.lengths[start])
        mask, cos, sin = self._pass_inputs(h.shape[1], cache.lengths[start], h.device)
        return fast.run_range(start, end, h, cache, mask, cos, sin)

    def _context(self, context: nn.Module, ctx: ContextCache, h: torch.Tensor) -> torch.Tensor:
        """A context adapter on h [1, T, D] (the next positions), consuming its backlog in the same pass (one
        call instead of two: the backlog is often one token, the last round's bonus)."""
        t = h.shape[1]
        if ctx.backlog:
            h = torch.cat([*ctx.backlog, h], dim=1)  # [1, backlog + T, D]
            ctx.backlog.clear()
        return self._run([context], h, ctx.kv, ctx.kv.lengths[0])[:, -t:]

    def draft_step(self, token: int, layer: int, cache: KVCache, head: ExitHead | None = None) -> torch.Tensor:
        """Forward the first L layers: one token through layers [0, L) (and L's context adapter, if any) and the
        exit head (``head``, else the layer's own) -> draft logits [V]. Appends the token to layers [0, L) of
        ``cache`` (``verify`` crops them back)."""
        head = head or self.head(layer)
        h = self.embed(torch.tensor([[token]], device=self._device))
        h = self._layers(h, 0, layer, cache)
        if head.context is not None:
            h = self._context(head.context, cache.context[layer], h)
        return head(h[0, -1], lm_head=self._lm_head if head.lm_head is self.lm_head else None)

    def _all_layers(self, h: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """All N layers on h [1, T, D]; also returns the state after L layers for every context adapter's L."""
        states, at = {}, 0
        for layer in sorted(cache.context):
            h = self._layers(h, at, layer, cache)
            states[layer], at = h, layer
        return self._layers(h, at, self.n_layers, cache), states

    def prefill(self, prompt_ids: list[int], cache: KVCache) -> torch.Tensor:
        """The prompt through all N layers into an empty ``cache`` -> final hidden states [1, T, D]; every context
        adapter gets the prompt's layer-L states as its backlog."""
        h, states = self._all_layers(self.embed(torch.tensor([prompt_ids], device=self._device)), cache)
        for layer, ctx in cache.context.items():
            ctx.backlog.append(states[layer])
        return h

    def verify(self, tokens: list[int], exit_layer: int | None, cache: KVCache,
               states: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Forward the full model: logits [T, V] for ``tokens`` (pending token + drafts) in one pass over all N
        layers, appended to ``cache``; fills ``states`` with the context adapters' layer-L states of these positions.

        Recomputes layers [0, L) (``exit_layer``, where the drafts were made): they are cropped back to the round's
        start first, so every layer's cache holds the full model's states."""
        start = cache.lengths[-1]
        if exit_layer is not None:
            cache.crop(start, range(exit_layer))
        h = self.embed(torch.tensor([tokens], device=self._device))
        h, captured = self._all_layers(h, cache)
        if states is not None:
            states.update(captured)
        return self._lm_head(self.norm(h[0]))

    def new_cache(self, max_len: int) -> KVCache:
        """An empty cache for sequences up to ``max_len`` tokens (also sets up the rotary table), with a
        context cache for every exit layer whose head has a context adapter."""
        self._device = self.lm.device
        positions = torch.arange(max_len, device=self._device)[None]
        self._rope = self.rotary(self.embed.weight[:1][None], positions)  # cos, sin: [1, max_len, hd]
        cache = KVCache(self.n_layers, self._kv_heads, self._head_dim, max_len, self.lm.dtype, self._device)
        for layer, head in self.exit_heads.items():
            if head.context is not None:
                kv = KVCache(1, self._kv_heads, self._head_dim, max_len, self.lm.dtype, self._device)
                cache.context[layer] = ContextCache(kv, [])
        return cache

    # ---- the loop -------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        policy: Policy,
        max_new_tokens: int = 128,
        sampling: Sampling | None = None,
        stop_at_eos: bool = True,
        stop_strings: Sequence[str] = (),
    ) -> Generation:
        """Generate up to ``max_new_tokens``; stops at EOS (``stop_at_eos``) and once the text holds one of
        ``stop_strings`` (the tokens end with the one completing it; ``finish_reason`` "stop"; the text
        is not cut, see ``Generation.text_until``)."""
        if not prompt_ids:
            raise ValueError("empty prompt: pass at least one prompt token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        sampling = sampling or Sampling()
        if self._max_positions and len(prompt_ids) + max_new_tokens > self._max_positions:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"context of {self._max_positions} positions: shorten the prompt or lower max_new_tokens"
            )
        cache = self.new_cache(len(prompt_ids) + max_new_tokens + self.max_draft_len + 1)
        gen = torch.Generator(device=self._device).manual_seed(sampling.seed) if not sampling.greedy else None
        policy.reset()

        t0 = time.perf_counter()
        h = self.prefill(prompt_ids, cache)
        first_logits = self._lm_head(self.norm(h[0, -1]))
        first = self._pick(first_logits, sampling, gen)
        state = DecodeState(self.n_layers, len(prompt_ids), max_new_tokens, tokens=[first], prompt_ids=list(prompt_ids),
                            lookup=NgramIndex(*self.lookup_ngram))
        state.last_verify = Confidence(first_logits)
        prefill_s = time.perf_counter() - t0

        stops = _StopStrings(self.lm.tokenizer, stop_strings)
        finish = "eos" if stop_at_eos and first in self._eos else "stop" if stops.hit(state.tokens, 0) else "length"
        source = _ModelSource(self, cache, sampling, gen)
        eos = self._eos if stop_at_eos else ()
        t1 = time.perf_counter()
        while finish == "length" and len(state.tokens) < max_new_tokens:
            start = state.position - 1  # the cache holds prompt + tokens[:-1]; tokens[-1] is pending
            # cheap, always on: a broken cache is silent garbage
            if any(n != start for n in cache.lengths) or any(c.settled != start for c in cache.context.values()):
                raise RuntimeError(f"KV cache out of sync: layer lengths {cache.lengths}, context adapters "
                                   f"{ {l: c.settled for l, c in cache.context.items()} }, expected {start} each")
            before = len(state.tokens)
            finish = emit(state, run_round(state, policy, source, self.max_draft_len).emitted, eos) or "length"
            cut = stops.hit(state.tokens, before)
            if cut is not None:
                del state.tokens[cut:]
                finish = "stop"
        decode_s = time.perf_counter() - t1

        text = self.lm.tokenizer.decode(state.tokens, skip_special_tokens=True)
        return Generation(len(prompt_ids), state.tokens, text, state.rounds, prefill_s, decode_s, finish, policy.name)

    @staticmethod
    def _pick(logits: torch.Tensor, sampling: Sampling, gen) -> int:
        if sampling.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(sampling.probs(logits), 1, generator=gen))

    @staticmethod
    def _accept_sampled(drafts, q_rows, logits, sampling: Sampling, gen) -> tuple[int, list[int]]:
        """Speculative sampling (Leviathan et al., Chen et al.): accept d_i w.p. min(1, p(d_i)/q(d_i));
        on rejection draw from norm(max(0, p - q)); if all accepted, draw the bonus token from p_K."""
        p = sampling.probs(logits)  # [K+1, V]
        for i, d in enumerate(drafts):
            u = torch.rand((), generator=gen, device=p.device)
            if u * q_rows[i][d] <= p[i, d]:  # u < p/q without dividing by a tiny q
                continue
            residual = (p[i] - q_rows[i]).clamp_min(0)
            tok = int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
            return i, drafts[:i] + [tok]
        k = len(drafts)
        return k, drafts + [int(torch.multinomial(p[k], 1, generator=gen))]


class _ModelSource:
    """The engine's :class:`lede.core.rounds.RoundSource`: drafts by forwarding the first L layers, verdicts by one
    full-model pass (greedy: :func:`accepted_prefix`; sampling: the speculative sampling rule), then crops the cache
    to the accepted prefix and settles the context adapters' caches."""

    def __init__(self, dec: Decoder, cache: KVCache, sampling: Sampling, gen):
        self.dec, self.cache, self.sampling, self.gen = dec, cache, sampling, gen

    def begin(self, state: DecodeState, layer: int | None) -> None:
        if layer is not None and layer != LOOKUP:
            self.dec.check_exit(layer)
        self.x = state.tokens[-1]  # the token the next draft step reads
        self.q_rows: list[torch.Tensor] = []  # draft distributions, for the sampling acceptance rule
        self.support = getattr(self.dec.head(layer), "vocab", None) if layer else None  # reduced draft vocabulary

    def draft(self, state: DecodeState, layer: int, copied: int | None) -> Draft:
        if copied is not None:  # a lookup draft: q = a point mass on it
            if not self.sampling.greedy:
                self.q_rows.append(torch.zeros(self.dec.lm_head.weight.shape[0], device=self.dec._device))  # [V]
                self.q_rows[-1][copied] = 1.0
            self.x = copied
            return Draft(copied)
        logits = self.dec.draft_step(self.x, layer, self.cache)  # [V]
        if self.sampling.greedy:
            self.x = int(logits.argmax())
        else:
            q = self.sampling.probs(logits)
            self.x = int(torch.multinomial(q, 1, generator=self.gen))
            self.q_rows.append(q)
        return Draft(self.x, Confidence(logits, self.support))

    def verify(self, state: DecodeState, layer: int | None, drafts: list[int]) -> Verdict:
        start, cache = state.position - 1, self.cache
        states: dict[int, torch.Tensor] = {}  # layer-L states of these positions, for the context adapters
        logits = self.dec.verify([state.tokens[-1], *drafts], layer, cache, states)  # [K+1, V]
        if self.sampling.greedy:
            target = logits.argmax(-1)  # [K+1]
            a = accepted_prefix(target, drafts)
            emitted = drafts[:a] + [int(target[a])]
        else:
            a, emitted = Decoder._accept_sampled(drafts, self.q_rows, logits, self.sampling, self.gen)
        cache.crop(start + a + 1)  # keep the pending token and the accepted drafts
        for l, ctx in cache.context.items():  # settle x0 + the accepted drafts in every context cache
            have = ctx.settled - start  # the layer drafted at fed x0, d1..d(K-1) itself (cropped to a + 1 above)
            if have < a + 1:
                ctx.backlog.append(states[l][:, have : a + 1])
        return Verdict(a, emitted, Confidence(logits[a]))
