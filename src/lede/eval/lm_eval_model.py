"""``lede`` as an lm-evaluation-harness model (lm-eval 0.4.13).

Importing this module registers the model name ``lede`` with ``lm_eval.api.registry``:

    import lede.eval.lm_eval_model                      # registers "lede"
    from lede.eval.tasks import task_manager
    import lm_eval
    out = lm_eval.simple_evaluate(
        model="lede", model_args="model=smollm2-135m,policy=static:8:4",
        tasks=["lede_gsm8k"], task_manager=task_manager("data"),
        apply_chat_template=True, limit=5, log_samples=True)

Command line. lm-eval 0.4.13 has no plugin discovery for models, so a bare ``lm-eval run --model lede``
does not know the name; ``python -m lede.eval.lm_eval_model`` is lm-eval's own CLI with ``lede`` registered
(the same arguments; ``run`` may be left out as with ``lm-eval``)::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lede.eval.lm_eval_model run --model lede \\
        --model_args model=smollm2-135m,policy=static:8:4,speed_log=out/speed.jsonl \\
        --include_path src/lede/eval/tasks --metadata data_dir=data \\
        --tasks lede_gsm8k --apply_chat_template --limit 5 --log_samples --output_path out

Model arguments (``--model_args key=value,...``):

``model``        alias, local path or hub id for :func:`lede.drafters.loading.load_model` (default ``smollm2-135m``)
``policy``       a policy in the project's grammar (``lede.rl.spec``): ``plain`` | ``static:L:K`` | ``lookup:K`` | ``file:PATH`` | ...
``early_exit_weights``  an early-exit artefact (:mod:`lede.drafters.early_exit`) merged into ``model`` (the -ee variant)
``exit_heads``   path to an exit-head selection JSON (:func:`lede.core.exits.heads_from_selection`)
``dtype``, ``device``   as for ``load_model``
``model_cache``  folder where the GGUF alias is converted once (``load_model``'s ``cache_dir``; default none)
``max_gen_toks`` default generation budget when a task does not set one (256)
``max_length``   context window in tokens (default: the model's ``max_position_embeddings``)
``on_overflow``  ``truncate`` (default): a prompt that does not fit ``max_length - max_gen_toks`` is
                 cut from the left and the request is recorded as truncated (counted in
                 :attr:`LedeLM.truncations` and in each speed record); ``error``: raise
                 :class:`ContextWindowError` instead
``seed``         base seed for sampled generation (requests get ``seed + request number``)
``speed_log``    JSONL file: one speed record per generated request (appended as they finish)
``prefix_token_id``  token used as the context of an empty-context / rolling loglikelihood request
                 (default: the tokenizer's BOS, else EOS)

``generate_until`` runs the engine with the chosen policy and honours ``until`` stop strings (the
generation ends once its text contains one; the returned text is cut before it, as with lm-eval's HF
model), ``max_gen_toks``, ``temperature``/``do_sample``/``top_p``. ``loglikelihood`` and
``loglikelihood_rolling`` always use the full model (one exact forward pass), so multiple-choice tasks
score the same under every policy.

Each ``generate_until`` request appends a record to :attr:`LedeLM.records` (task, doc_id, policy,
prompt and generated token ids, text, finish reason, tokens/s, rounds, per-round accepted drafts,
mean accepted length, truncation); ``lede.eval.parity`` joins them with lm-eval's sample logs. The per-task
speed summary also lands in lm-eval's results file (``config.lede_speed``, via ``get_model_info``), and
with ``speed_log=<file>`` every record is written as it finishes (the command line's way to keep them).

A bare ``lm-eval run --model lede`` (the console script) fails with "no model for this name found":
nothing imports lede there. Use ``python -m lede.eval.lm_eval_model`` as above, or import this module before
calling ``lm_eval.simple_evaluate``/``lm_eval.evaluator`` in Python.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from lede.core.engine import Decoder, Generation, Sampling
from lede.core.model import LoadedModel
from lede.drafters.loading import load_model
from lede.core.policy import Policy
from lede.rl.spec import PolicyContext, PolicySpec, parse_policy

log = logging.getLogger(__name__)

__all__ = [
    "ContextWindowError",
    "LedeLM",
    "make_policy",
]


class ContextWindowError(ValueError):
    """A request does not fit the model's context window (and ``on_overflow="error"``)."""


# --------------------------------------------------------------------------- policies

def make_policy(spec: str | Policy, lm: LoadedModel, max_draft_len: int = 16) -> Policy:
    """A policy from its text in the project's one grammar (``lede.rl.spec``: ``plain``, ``static:8:4``,
    ``lookup:4``, ``file:PATH``, ...) or as it is."""
    return parse_policy(spec, PolicyContext(lm.num_layers, max_draft_len, lm_name=lm.name))


# --------------------------------------------------------------------------- stop strings


# --------------------------------------------------------------------------- the lm-eval model

_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "seed"}


class LedeLM(TemplateLM):
    """lm-eval model backed by the lede engine; see the module doc for the arguments."""

    backend = "causal"

    def __init__(
        self,
        model: str = "smollm2-135m",
        policy: str | Policy = "autoregressive",
        exit_heads: str | None = None,
        early_exit_weights: str | None = None,
        model_cache: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        max_gen_toks: int = 256,
        max_length: int | None = None,
        on_overflow: str = "truncate",
        seed: int = 1234,
        speed_log: str | None = None,
        prefix_token_id: int | None = None,
        add_special_tokens: bool | None = None,
        loaded: LoadedModel | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise TypeError(
                f"unknown model_args for lede: {', '.join(sorted(unknown))}. Accepted: model, policy, exit_heads, early_exit_weights, "
                "model_cache, dtype, device, max_gen_toks, max_length, on_overflow, seed, speed_log, prefix_token_id, "
                "add_special_tokens"
            )
        if on_overflow not in ("truncate", "error"):
            raise ValueError(f"on_overflow={on_overflow!r}: use 'truncate' or 'error'")
        if str(batch_size) not in ("1", "None", "auto"):
            log.warning("lede decodes one request at a time (batch size 1); batch_size=%s is ignored", batch_size)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes --device (default cuda:0) to every model; like its HF model, use the CPU
            log.warning("lede: device %s requested but CUDA is not available; using the CPU", device)
            device = "cpu"
        if isinstance(policy, str):
            PolicySpec.parse(policy)  # a malformed spec fails before the model loads
        self.lm = loaded if loaded is not None else load_model(str(model), dtype=dtype, device=device,
                                                                       early_exit_weights=early_exit_weights,
                                                                       cache_dir=model_cache)
        self.tokenizer = self.lm.tokenizer
        self.policy_spec = policy if isinstance(policy, str) else getattr(policy, "name", str(policy))
        self.policy = make_policy(policy, self.lm)
        heads = None
        self.exit_heads_path = exit_heads
        if exit_heads:
            from lede.core.exits import load_exit_heads

            heads = load_exit_heads(self.lm, exit_heads)  # FileNotFoundError naming the file if it is missing
        draft = getattr(self.policy, "draft_len", 0) or 0
        self.decoder = Decoder(self.lm, exit_heads=heads, max_draft_len=max(16, int(draft)))
        cfg_len = getattr(self.lm.config, "max_position_embeddings", None)
        self._max_length = int(max_length) if max_length is not None else (int(cfg_len) if cfg_len else 2048)
        if cfg_len and self._max_length > int(cfg_len):
            raise ValueError(f"max_length={self._max_length} exceeds the model's context of {cfg_len} positions")
        self.max_gen_toks = int(max_gen_toks)
        self.on_overflow = on_overflow
        self.seed = int(seed)
        self.speed_log = Path(speed_log) if speed_log else None
        if self.speed_log:
            self.speed_log.parent.mkdir(parents=True, exist_ok=True)
        self._prefix_token_id = prefix_token_id
        self.add_special_tokens = add_special_tokens
        self.records: list[dict] = []
        self.truncations = {"generate_until": 0, "loglikelihood": 0}
        self._n_generated = 0
        self._warned_keys: set[str] = set()

    # ---- identity -------------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self.lm.device

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self):
        if self._prefix_token_id is not None:
            return int(self._prefix_token_id)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        tok = bos if bos is not None else self.eot_token_id
        if tok is None:
            raise ValueError(
                "the tokenizer has neither BOS nor EOS: an empty-context or rolling loglikelihood request "
                "needs a prefix token; pass model_args prefix_token_id=<id>"
            )
        return int(tok)

    @property
    def tokenizer_name(self) -> str:
        return self.lm.name.replace("/", "__")

    def get_model_info(self) -> dict:
        """lm-eval adds this to its results' ``config`` after the run: the model, the policy, and the
        speed summary per task (tokens/s, mean accepted length, truncation counts)."""
        tasks = sorted({r["task"] for r in self.records if r["task"] is not None})
        return {
            "lede_model": self.lm.name,
            "lede_policy": self.policy_spec,
            "lede_exit_heads": self.exit_heads_path,
            "lede_dtype": str(self.lm.dtype),
            "lede_device": str(self.lm.device),
            "lede_max_length": self.max_length,
            "lede_truncations": dict(self.truncations),
            "lede_speed": {t: self.speed_summary(t) for t in tasks},
        }

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.lm.name} has no chat template: run without apply_chat_template")
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # ---- tokens ---------------------------------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        flag = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        if flag is None:
            return [int(i) for i in self.tokenizer(string)["input_ids"]]
        return [int(i) for i in self.tokenizer(string, add_special_tokens=flag)["input_ids"]]

    @torch.inference_mode()
    def _logprobs(self, tokens: list[int]) -> torch.Tensor:
        """Full-model log-probabilities [T, V] for every position of ``tokens`` (one exact forward)."""
        ids = torch.tensor([tokens], device=self.lm.device)
        logits = self.lm.model(input_ids=ids).logits[0]
        return torch.log_softmax(logits.double(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for key, context_enc, continuation_enc in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            if not continuation_enc:
                raise ValueError(f"empty continuation in loglikelihood request {key!r}")
            if len(continuation_enc) > self.max_length:
                raise ContextWindowError(
                    f"continuation of {len(continuation_enc)} tokens exceeds max_length={self.max_length}"
                )
            whole = list(context_enc) + list(continuation_enc)
            inp = whole[-(self.max_length + 1):][:-1]
            if len(whole) - 1 > self.max_length:
                if self.on_overflow == "error":
                    raise ContextWindowError(
                        f"loglikelihood request of {len(whole) - 1} input tokens exceeds max_length={self.max_length}"
                    )
                self.truncations["loglikelihood"] += 1
            lp = self._logprobs(inp)[-len(continuation_enc):]  # rows predicting the continuation
            cont = torch.tensor(continuation_enc, device=lp.device)
            ll = float(lp.gather(-1, cont[:, None]).sum())
            greedy = bool((lp.argmax(-1) == cont).all())
            out.append((ll, greedy))
            self.cache_hook.add_partial("loglikelihood", key, (ll, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        out = []
        for (string,) in tqdm([r.args for r in requests], desc="loglikelihood_rolling", disable=disable_tqdm):
            windows = [
                (None, *utils.make_disjoint_window(w))
                for w in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                )
            ]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    # ---- generation -----------------------------------------------------------------------------
    def _sampling(self, kwargs: dict, seed: int) -> Sampling:
        do_sample = kwargs.get("do_sample")
        temperature = float(kwargs.get("temperature") or 0.0)
        if do_sample is False:
            temperature = 0.0
        elif do_sample is True and temperature == 0.0:
            temperature = 1.0
        top_p = float(kwargs.get("top_p") if kwargs.get("top_p") is not None else 1.0)
        return Sampling(temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                        seed=int(kwargs.get("seed", seed)))

    def _fit(self, prompt: list[int], max_gen: int) -> tuple[list[int], int]:
        """The prompt cut to fit ``max_length`` with ``max_gen`` new tokens; and how many tokens were cut."""
        if max_gen >= self.max_length:
            raise ContextWindowError(
                f"max_gen_toks={max_gen} leaves no room for a prompt in max_length={self.max_length}: lower it"
            )
        room = self.max_length - max_gen
        if len(prompt) <= room:
            return prompt, 0
        if self.on_overflow == "error":
            raise ContextWindowError(
                f"prompt of {len(prompt)} tokens + max_gen_toks={max_gen} exceeds the context window of "
                f"{self.max_length} tokens: shorten the prompt (fewer few-shot examples), lower max_gen_toks, "
                "or pass on_overflow=truncate"
            )
        cut = len(prompt) - room
        return prompt[cut:], cut

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for req in tqdm(requests, desc=f"generate_until [{self.policy_spec}]", disable=disable_tqdm):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            extra = sorted(set(kwargs) - _GEN_KEYS)
            for key in extra:
                if key not in self._warned_keys:
                    self._warned_keys.add(key)
                    log.warning("lede: generation kwarg %r is not supported and is ignored", key)
            until = kwargs.get("until") or []
            if isinstance(until, str):
                until = [until]
            max_gen = int(kwargs.get("max_gen_toks") or self.max_gen_toks)
            sampling = self._sampling(kwargs, self.seed + self._n_generated)
            self._n_generated += 1
            prompt, cut = self._fit(self.tok_encode(context), max_gen)
            if not prompt:
                raise ValueError(f"empty prompt for request {req.task_name}/{req.doc_id}")
            if cut:
                self.truncations["generate_until"] += 1
                log.warning("lede: %s doc %s: prompt cut by %d tokens to fit max_length=%d", req.task_name,
                            req.doc_id, cut, self.max_length)
            gen = self.decoder.generate(prompt, self.policy, max_gen, sampling, stop_strings=until)
            gen.text = gen.text_until(self.lm.tokenizer, until)
            self._record(req, prompt, gen, cut, max_gen, sampling, extra)
            results.append(gen.text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), gen.text)
        return results

    def _record(self, req, prompt, gen: Generation, cut: int, max_gen: int, sampling: Sampling, ignored) -> None:
        rec = {
            "task": req.task_name,
            "doc_id": req.doc_id,
            "idx": req.idx,
            "policy": self.policy_spec,
            "model": self.lm.name,
            "prompt_ids": list(prompt),
            "token_ids": list(gen.token_ids),
            "text": gen.text,
            "finish_reason": gen.finish_reason,
            "new_tokens": gen.new_tokens,
            "max_gen_toks": max_gen,
            "context_truncated": cut,
            "temperature": sampling.temperature,
            "prefill_s": gen.prefill_s,
            "decode_s": gen.decode_s,
            "wall_s": gen.wall_s,
            "tokens_per_s": gen.tokens_per_s,
            "rounds": len(gen.rounds),
            "mean_accepted": gen.mean_accepted,
            "accepted": [r.accepted for r in gen.rounds],
            "drafted": [r.drafted for r in gen.rounds],
            "ignored_gen_kwargs": list(ignored),
        }
        self.records.append(rec)
        if self.speed_log:
            with self.speed_log.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")

    def speed_summary(self, task: str | None = None) -> dict:
        """Totals over the generated requests so far (of one task, or all): tokens/s (total tokens / total
        wall time), mean tokens per round (accepted drafts + 1), request and truncation counts."""
        recs = [r for r in self.records if task is None or r["task"] == task]
        tokens = sum(r["new_tokens"] for r in recs)
        wall = sum(r["wall_s"] for r in recs)
        rounds = sum(r["rounds"] for r in recs)
        emitted = sum(sum(a + 1 for a in r["accepted"]) for r in recs)
        return {
            "policy": self.policy_spec,
            "requests": len(recs),
            "new_tokens": tokens,
            "tokens_per_s": tokens / wall if wall > 0 else float("nan"),
            "mean_accepted": emitted / rounds if rounds else float("nan"),
            "context_truncated": sum(1 for r in recs if r["context_truncated"]),
            "length_capped": sum(1 for r in recs if r["finish_reason"] == "length"),
        }


# Registered at import; not when this file runs as ``__main__`` (main() imports the real module, so
# "lede" is registered once, to one class).
if __name__ != "__main__":
    register_model("lede")(LedeLM)


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with the ``lede`` model registered (``python -m lede.eval.lm_eval_model ...``).

    Adds ``--include_path <lede task folder>`` unless one is given, so the ``lede_*`` tasks are found.
    """
    import sys

    from lm_eval.__main__ import cli_evaluate

    from lede.eval.tasks import TASK_DIR

    args = list(sys.argv[1:] if argv is None else argv)
    if args and "--include_path" not in args:
        args += ["--include_path", str(TASK_DIR)]
    sys.argv = [sys.argv[0], *args]
    cli_evaluate()


if __name__ == "__main__":
    from lede.eval.lm_eval_model import main as _main  # the registered copy of this module

    _main()
