"""Tiny randomly initialised models for tests and smoke runs (no download, seconds to build).

    from lede.testing import tiny_model
    lm = tiny_model("llama", dtype=torch.float64)
"""

from __future__ import annotations

import torch

from lede.core.model import LoadedModel, check_supported


class ByteTokenizer:
    """Token id i <-> character chr(32 + i % 95): enough to decode tiny-model output."""

    chat_template = None
    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + int(i) % 95) for i in ids)

    def __call__(self, text: str):
        return {"input_ids": [(ord(c) - 32) % 95 for c in text]}


def tiny_model(
    model_type: str = "llama",
    num_layers: int = 6,
    vocab_size: int = 96,
    hidden_size: int = 64,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    init_std: float = 0.2,
) -> LoadedModel:
    """A random LLaMA-family model. A larger ``init_std`` than the default 0.02 gives peaked, varied
    next-token distributions, so drafts are sometimes accepted and sometimes not."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=init_std,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    check_supported(config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=ByteTokenizer(), name=f"tiny-{model_type}-s{seed}")
