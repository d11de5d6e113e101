"""pdserve engine: the model runtime shared by prefill and decode workers."""

from engine.config import EngineConfig
from engine.engine import LLMEngine, StepOutput
from engine.errors import CapacityError, EngineError, InvalidRequestError, RequestNotFoundError
from engine.kv_cache import LayoutFingerprint
from engine.llm import LLM, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CapacityError",
    "EngineConfig",
    "EngineError",
    "InvalidRequestError",
    "LLMEngine",
    "LayoutFingerprint",
    "RequestNotFoundError",
    "RequestOutput",
    "SamplingParams",
    "StepOutput",
]
