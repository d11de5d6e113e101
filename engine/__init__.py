"""pdserve engine: the model runtime shared by prefill and decode workers."""

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine, StepOutput
from pdserve.engine.errors import CapacityError, EngineError, InvalidRequestError, RequestNotFoundError
from pdserve.engine.kv_cache import LayoutFingerprint
from pdserve.engine.llm import LLM, RequestOutput
from pdserve.engine.sampling_params import SamplingParams

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
