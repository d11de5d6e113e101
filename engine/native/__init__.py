"""Native model implementations (Llama, Qwen2, Qwen3, Mistral) and the executor that runs them over the
paged KV cache. ``model_impl`` picks between them and transformers' own modules (see ``resolve_model_impl``)."""

from __future__ import annotations

import logging

import torch

from pdserve.engine.native.rope import SUPPORTED_ROPE_TYPES, rope_parameters
from pdserve.engine.native.spec import NATIVE_ARCHITECTURES, NativeSpec, family_of

logger = logging.getLogger(__name__)

MODEL_IMPLS = ("auto", "native", "hf")


def native_unsupported(hf_config) -> str:
    """Why no native implementation runs this config ("" when one does)."""
    if family_of(hf_config) is None:
        return f"architecture {getattr(hf_config, 'architectures', None)} has no native implementation"
    kind = rope_parameters(hf_config)["rope_type"]
    if kind not in SUPPORTED_ROPE_TYPES:
        return f"rope scaling type {kind!r} is not supported natively"
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        return f"hidden_act {hf_config.hidden_act!r} is not supported natively"
    return ""


def resolve_model_impl(name: str, hf_config) -> str:
    """``native`` or ``hf``: auto is native for the four families, else transformers' modules."""
    why = native_unsupported(hf_config)
    if name == "native" and why:
        raise ValueError(f"model_impl: 'native' cannot run this model: {why}")
    if name == "auto":
        return "hf" if why else "native"
    return name


def load_native(hf_config, path: str, dummy: bool, seed: int, dtype: torch.dtype, device, max_len: int):
    from pdserve.engine.native.model import NativeCausalLM
    from pdserve.engine.native.weights import init_random, load_checkpoint

    spec = NativeSpec.from_hf(hf_config)
    model = NativeCausalLM(spec, hf_config, max_len, dtype, device)
    if dummy:
        init_random(model, seed)
    else:
        load_checkpoint(model, path)
    model.generation_config = _generation_config(path, hf_config)
    return model.eval()


def _generation_config(path: str, hf_config):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        return GenerationConfig.from_model_config(hf_config)


__all__ = ["MODEL_IMPLS", "NATIVE_ARCHITECTURES", "load_native", "native_unsupported", "resolve_model_impl"]
