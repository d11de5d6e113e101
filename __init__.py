"""pdserve: a disaggregated prefill/decode LLM serving cluster.

The offline API loads torch lazily, so ``import pdserve`` (and the router, the protos and the CLI client)
stays torch-free::

    from pdserve import LLM, SamplingParams
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from pdserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pdserve.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "StructuredOutputsParams":
        from pdserve.engine.structured_outputs import StructuredOutputsParams

        return StructuredOutputsParams
    raise AttributeError(f"module 'pdserve' has no attribute {name!r}")
