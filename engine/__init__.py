"""pdserve engine: the model runtime shared by prefill and decode workers.

Importing this package loads nothing heavy. The torch-free leaves (``errors``, ``hashing``, ``layout``,
``sampling_params``, ``tokenizer``, ``models``' preset names) are what the router and clients use; the
engine proper (``LLMEngine``, ``LLM``) loads torch when first touched.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "EngineConfig": "pdserve.engine.config",
    "LLMEngine": "pdserve.engine.engine",
    "StepOutput": "pdserve.engine.outputs",
    "AdapterNotFoundError": "pdserve.engine.errors",
    "CapacityError": "pdserve.engine.errors",
    "EngineError": "pdserve.engine.errors",
    "InvalidRequestError": "pdserve.engine.errors",
    "RequestNotFoundError": "pdserve.engine.errors",
    "LayoutFingerprint": "pdserve.engine.layout",
    "LLM": "pdserve.engine.llm",
    "RequestOutput": "pdserve.engine.llm",
    "SamplingParams": "pdserve.engine.sampling_params",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pdserve.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
