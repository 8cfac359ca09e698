"""The serving engine: continuous batching over a paged, prefix-cached KV pool (pure PyTorch)."""

from serve.engine.engine import Completion, EngineStats, LLMEngine
from serve.engine.request import EngineInputError, RequestOutput
from serve.engine.sampling_params import SamplingParams

__all__ = ["Completion", "EngineInputError", "EngineStats", "LLMEngine", "RequestOutput", "SamplingParams"]
