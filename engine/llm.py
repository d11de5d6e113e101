"""Offline API in the style of vLLM: ``LLM(model=...).generate(prompts, SamplingParams)``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.models import DEFAULT_MODEL
from pdserve.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    num_cached_tokens: int = 0


def _lora_modules(modules) -> tuple[tuple[str, str], ...]:
    """``lora_modules`` as EngineConfig takes it, from a dict {name: path} or any sequence of pairs."""
    if isinstance(modules, dict):
        modules = modules.items()
    try:
        return tuple(tuple(pair) for pair in modules)
    except TypeError:
        raise ValueError(f"lora_modules: must be (name, path) pairs or a dict, got {modules!r}") from None


class LLM:
    """``LLM(model, enable_lora=True, lora_modules={"name": "/peft/dir"})`` serves LoRA adapters too."""

    def __init__(self, model: str = DEFAULT_MODEL, **kwargs):
        if "lora_modules" in kwargs:
            kwargs["lora_modules"] = _lora_modules(kwargs["lora_modules"])
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._next_id = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[int] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        priorities: list[int] | None = None,
        lora_name: str | None | list[str | None] = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched together; outputs keep the input order. ``lora_name``: one
        adapter for every prompt, or one per prompt (None: the base model)."""
        if not isinstance(prompts, str | list | tuple):
            raise ValueError(f"prompts: expected a string, token ids or a list of them, got {prompts!r:.80}")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        per = params if isinstance(params, list) else [params] * len(prompts)
        if len(per) != len(prompts):
            raise ValueError("sampling_params: list length must match prompts")
        if priorities is not None and (not isinstance(priorities, list) or len(priorities) != len(prompts) or not all(
                isinstance(p, int) and not isinstance(p, bool) for p in priorities)):
            raise ValueError("priorities: expected one integer per prompt")
        loras = lora_name if isinstance(lora_name, list) else [lora_name] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError("lora_name: list length must match prompts")
        outputs: dict[str, RequestOutput] = {}
        order: list[str] = []
        try:
            for i, prompt in enumerate(prompts):
                rid = f"offline-{self._next_id}"
                self._next_id += 1
                seq = self.engine.add_request(
                    rid, prompt, replace(per[i]), priority=(priorities or [0] * len(prompts))[i],
                    lora_name=loras[i],
                )
                outputs[rid] = RequestOutput(rid, list(seq.prompt_token_ids))
                order.append(rid)
            while self.engine.has_unfinished():
                for step in self.engine.step():
                    out = outputs.get(step.request_id)
                    if out is None:
                        continue
                    out.token_ids += step.new_token_ids
                    out.text += step.text_delta
                    out.logprobs += step.logprobs
                    out.num_cached_tokens = step.num_cached_tokens
                    if step.finished:
                        out.finish_reason = step.finish_reason.value if step.finish_reason else None
        except BaseException:
            for rid in order:
                self.engine.abort(rid)
            raise
        return [outputs[rid] for rid in order]
