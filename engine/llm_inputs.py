"""What ``LLM`` takes, in vLLM's forms too: dict prompts, chat messages, vLLM's engine arguments, ``LoRARequest``s,
and the default sampling parameters (from the model's generation config) that vLLM's examples assign to."""

from __future__ import annotations

import logging
from dataclasses import fields, replace

from pdserve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


_PROMPT_KEYS = ("prompt", "prompt_token_ids")  # vLLM's others (cache_salt, multi_modal_data...) are refused


def prompt_of(prompt) -> str | list[int]:
    """A string or token ids, from any form ``generate`` takes (vLLM's dicts included)."""
    if isinstance(prompt, dict):
        extra = sorted(k for k, v in prompt.items() if k not in _PROMPT_KEYS and v is not None)
        if extra:  # multi_modal_data, mm_processor_kwargs...: refused, not silently dropped
            raise ValueError("prompts: a dict prompt needs 'prompt' or 'prompt_token_ids' (text and token ids only); "
                             f"{', '.join(map(repr, extra))} is not supported")
        if "prompt_token_ids" in prompt:
            return prompt["prompt_token_ids"]
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError(f"prompts: a dict prompt needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
    return prompt


def conversations(messages) -> list[list[dict[str, str]]]:
    """``LLM.chat``'s messages (one conversation, a list of {role, content}, or a list of them) -> conversations of
    plain {role, content} dicts, as the gateway hands them to the router: text content parts joined, a None
    content empty, ``developer`` read as ``system``."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError("messages: expected a non-empty list of {role, content} dicts, or a list of such lists")
    convs = [messages] if isinstance(messages[0], dict) else list(messages)
    out = []
    for c, conv in enumerate(convs):
        if not isinstance(conv, list | tuple) or not conv:
            raise ValueError(f"messages[{c}]: expected a non-empty list of {{role, content}} dicts")
        plain = []
        for i, m in enumerate(conv):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError(f"messages: message {i} of conversation {c}: expected a dict with a string role")
            content = m.get("content")
            if isinstance(content, list):  # OpenAI's content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise ValueError(f"messages: message {i} of conversation {c}: only text content parts are "
                                     "supported")
                content = "".join(p["text"] for p in content)
            elif content is None:
                content = ""
            elif not isinstance(content, str):
                raise ValueError(f"messages: message {i} of conversation {c}: content must be a string or text "
                                 f"parts, got {type(content).__name__}")
            plain.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        out.append(plain)
    return out


_VLLM_DTYPES = {"half": "float16", "float": "float32"}  # vLLM's other names for them


def vllm_engine_args(kwargs: dict) -> dict:
    """vLLM's ``LLM(...)`` arguments that mean something here -> EngineConfig's: ``tensor_parallel_size`` /
    ``pipeline_parallel_size`` 1 (one engine per process; anything else is a ValueError), ``enforce_eager`` (no
    CUDA graphs), ``trust_remote_code`` (accepted; no model code is ever loaded from the hub), ``dtype`` ``half`` /
    ``float``, ``gpu_memory_utilization`` (checked, then ignored with a warning: the KV cache is sized by
    ``kv_cache_bytes`` or ``num_blocks``)."""
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        size = kwargs.pop(name, 1)
        if size != 1 or isinstance(size, bool):
            raise ValueError(f"{name}: only 1 is supported (one engine per process; scale out with pdserve up), "
                             f"got {size!r}")
    for name in ("enforce_eager", "trust_remote_code"):
        if not isinstance(kwargs.get(name, False), bool):
            raise ValueError(f"{name}: must be True or False, got {kwargs[name]!r}")
    kwargs.pop("trust_remote_code", None)
    if "gpu_memory_utilization" in kwargs:  # vLLM sizes its KV cache by it; here kv_cache_bytes / num_blocks do
        util = kwargs.pop("gpu_memory_utilization")
        if not isinstance(util, int | float) or isinstance(util, bool) or not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {util!r}")
        logger.warning("gpu_memory_utilization=%s is ignored: the KV cache is sized by kv_cache_bytes (or num_blocks)",
                       util)
    if kwargs.pop("enforce_eager", False):
        kwargs.setdefault("cuda_graphs", False)
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = _VLLM_DTYPES.get(kwargs["dtype"], kwargs["dtype"])
    return kwargs


# the model's generation_config.json fields vLLM takes as default sampling parameters -> ours
_GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "max_new_tokens": "max_tokens",
                        "repetition_penalty": "repetition_penalty", "min_p": "min_p"}


class _DefaultSamplingParams(SamplingParams):
    """What ``LLM.get_default_sampling_params`` returns. vLLM's example scripts set its fields
    (``params.max_tokens = 64``), so this one takes assignments, each checked as the constructor checks it."""

    __slots__ = ()

    def __setattr__(self, name: str, value) -> None:
        checked = replace(self, **{name: value})  # a TypeError for an unknown field, a ValueError for a bad value
        object.__setattr__(self, name, getattr(checked, name))

    def __eq__(self, other) -> bool:  # equal to a plain SamplingParams with the same fields
        if not isinstance(other, SamplingParams):
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in fields(SamplingParams))

    __hash__ = None  # it changes

    def __repr__(self) -> str:
        return "SamplingParams" + super().__repr__()[len(type(self).__qualname__):]


def lora_names(engine, lora_request) -> str | None | list[str | None]:
    """vLLM's ``lora_request`` (a ``LoRARequest``, or one per prompt) -> adapter names, loading an adapter named
    for the first time from its ``lora_path`` (as vLLM does on first use)."""
    out = []
    for req in lora_request if isinstance(lora_request, list) else [lora_request]:
        if req is None:
            out.append(None)
            continue
        name, path = getattr(req, "lora_name", None), getattr(req, "lora_path", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"lora_request: expected vLLM's LoRARequest (lora_name, lora_path), got {req!r:.80}")
        if name not in engine.adapters():
            if not path:
                raise ValueError(f"lora_request: adapter {name!r} is not loaded and has no lora_path")
            engine.load_adapter(name, path)
        out.append(name)
    return out if isinstance(lora_request, list) else out[0]


def lora_modules(modules) -> tuple[tuple[str, str], ...]:
    """``lora_modules`` as EngineConfig takes it, from a dict {name: path} or any sequence of pairs."""
    if isinstance(modules, dict):
        modules = modules.items()
    try:
        return tuple(tuple(pair) for pair in modules)
    except TypeError:
        raise ValueError(f"lora_modules: must be (name, path) pairs or a dict, got {modules!r}") from None


def default_sampling_params(model) -> SamplingParams:
    """``SamplingParams()`` with the temperature, top_p, top_k, max_new_tokens (as max_tokens), repetition_penalty
    and min_p that the model's generation_config.json sets, as vLLM's ``get_default_sampling_params``."""
    gen = getattr(model, "generation_config", None)
    diff = gen.to_diff_dict() if hasattr(gen, "to_diff_dict") else {}
    kwargs = {ours: diff[theirs] for theirs, ours in _GENERATION_DEFAULTS.items() if diff.get(theirs) is not None}
    return _DefaultSamplingParams(**kwargs)
