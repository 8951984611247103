"""lede: self-speculative decoding with a learned, per-round choice of exit layer and draft length."""

from lede.core.engine import Decoder, Generation, Sampling
from lede.core.model import LoadedModel
from lede.drafters.loading import load_model
from lede.core.policy import Autoregressive, DecodeState, Policy, RandomSchedule, RoundRecord, Static

__all__ = [
    "Autoregressive",
    "DecodeState",
    "Decoder",
    "Generation",
    "LoadedModel",
    "Policy",
    "RandomSchedule",
    "RoundRecord",
    "Sampling",
    "Static",
    "load_model",
]
__version__ = "0.1.0"
