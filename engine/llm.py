"""Offline API in the style of vLLM: ``LLM(model=...).generate(prompts, SamplingParams)``.

A ``RequestOutput`` has vLLM's shape (``outputs[i].text``, ``.token_ids``, ``.finish_reason``, ``prompt``,
``prompt_token_ids``, ``finished``) and, for the first completion, the same fields at its top level. Prompts are
strings, token-id lists, or vLLM's dicts ``{"prompt": ...}`` / ``{"prompt_token_ids": [...]}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.models import DEFAULT_MODEL
from pdserve.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)

    @property
    def cumulative_logprob(self) -> float | None:
        """The sum of the sampled tokens' logprobs (None without logprobs), as vLLM reports it."""
        if not self.logprobs:
            return None
        return sum(lp[t] for t, lp in zip(self.token_ids, self.logprobs, strict=False))


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # the first completion's (outputs[0])
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    num_cached_tokens: int = 0
    prompt: str | None = None
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


def _prompt_of(prompt) -> str | list[int]:
    """A string or token ids, from any form ``generate`` takes (vLLM's dicts included)."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt["prompt_token_ids"]
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError(f"prompts: a dict prompt needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
    return prompt


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
        prompts: str | list[str] | list[int] | list[list[int]] | dict | list[dict],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        priorities: list[int] | None = None,
        lora_name: str | None | list[str | None] = None,
        use_tqdm: bool = False,  # vLLM's; there is no progress bar here
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched together; outputs keep the input order. ``lora_name``: one
        adapter for every prompt, or one per prompt (None: the base model)."""
        if not isinstance(prompts, str | list | tuple | dict):
            raise ValueError(f"prompts: expected a string, token ids or a list of them, got {prompts!r:.80}")
        if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = [_prompt_of(p) for p in prompts]
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
        results: list[RequestOutput] = []
        completions: dict[str, CompletionOutput] = {}  # engine request id -> its completion
        owners: dict[str, RequestOutput] = {}  # engine request id -> the prompt's output
        try:
            for i, prompt in enumerate(prompts):
                p = per[i]
                rid = f"offline-{self._next_id}"
                self._next_id += 1
                for j in range(p.n):
                    seed = p.seed if p.seed is None or j == 0 else p.seed + j
                    seq = self.engine.add_request(
                        f"{rid}-{j}" if j else rid, prompt, replace(p, seed=seed, n=1),
                        priority=(priorities or [0] * len(prompts))[i], lora_name=loras[i],
                    )
                    if j == 0:
                        results.append(RequestOutput(rid, list(seq.prompt_token_ids),
                                                     prompt=prompt if isinstance(prompt, str) else None))
                    completions[seq.request_id] = CompletionOutput(j)
                    owners[seq.request_id] = results[-1]
                    results[-1].outputs.append(completions[seq.request_id])
            while self.engine.has_unfinished():
                for step in self.engine.step():
                    out = completions.get(step.request_id)
                    if out is None:
                        continue
                    out.token_ids += step.new_token_ids
                    out.text += step.text_delta
                    out.logprobs += step.logprobs
                    if step.finished:
                        out.finish_reason = step.finish_reason.value if step.finish_reason else None
                    if out.index == 0:
                        owners[step.request_id].num_cached_tokens = step.num_cached_tokens
        except BaseException:
            for rid in completions:
                self.engine.abort(rid)
            raise
        for r in results:
            first = r.outputs[0]
            r.token_ids, r.text, r.finish_reason, r.logprobs = (first.token_ids, first.text, first.finish_reason,
                                                                first.logprobs)
        return results
