"""Offline API in the style of vLLM: ``LLM(model=...).generate(prompts, SamplingParams)``.

A ``RequestOutput`` has vLLM's shape (``outputs[i].text``, ``.token_ids``, ``.finish_reason``, ``prompt``,
``prompt_token_ids``, ``finished``) and, for the first completion, the same fields at its top level. Prompts are
strings, token-id lists, or vLLM's dicts ``{"prompt": ...}`` / ``{"prompt_token_ids": [...]}``. ``logprobs`` are
one dict per token, {token id: ``Logprob``} (the sampled token and the top ``SamplingParams.logprobs``), as vLLM's;
``LLM.chat`` renders conversations with the tokenizer's chat template, as vLLM's does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.llm_inputs import (
    conversations,
    default_sampling_params,
    lora_modules,
    lora_names,
    prompt_of,
    vllm_engine_args,
)
from pdserve.engine.models import DEFAULT_MODEL
from pdserve.engine.sampling_params import SamplingParams


class Logprob(float):
    """A token's logprob: a float (as before), with vLLM's ``.logprob``, ``.rank`` (1 = most likely; None where the
    engine did not compute it: a sampled token outside the top ``logprobs``) and ``.decoded_token``."""

    __slots__ = ("rank", "decoded_token")

    def __new__(cls, logprob: float, rank: int | None = None, decoded_token: str | None = None):
        self = super().__new__(cls, logprob)
        self.rank, self.decoded_token = rank, decoded_token
        return self

    @property
    def logprob(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"Logprob(logprob={float(self)!r}, rank={self.rank!r}, decoded_token={self.decoded_token!r})"


def _ranked(step: dict[int, float], num_top: int, greedy: bool, tokenizer) -> dict[int, Logprob]:
    """One token's {id: logprob} as the sampler gives it (the sampled token first, then the top ``num_top`` in
    descending order without it) -> {id: Logprob} with ranks and decoded text, in the same order."""
    sampled, *top = step
    sampled_in_top = len(top) < num_top  # the sampler put it first instead of among the top
    ranks: dict[int, int | None] = {t: r for r, t in enumerate(top, start=1)}
    if sampled_in_top:
        above = sum(1 for t in top if step[t] > step[sampled])
        ranks = {t: r + (r > above) for t, r in ranks.items()}
        ranks[sampled] = above + 1
    else:
        ranks[sampled] = 1 if greedy else None  # greedy takes the most likely; otherwise not computed
    return {t: Logprob(v, ranks[t], tokenizer.decode([t])) for t, v in step.items()}


def _prompt_entry(e, tokenizer) -> dict[int, Logprob]:
    """An engine.prompt_logprobs entry as vLLM gives it: the prompt token first, then the top alternatives."""
    out = {e.token_id: Logprob(e.logprob, e.rank, tokenizer.decode([e.token_id]))}
    for rank, (t, v) in enumerate(zip(e.top_ids, e.top_logprobs, strict=True), start=1):
        out.setdefault(t, Logprob(v, rank, tokenizer.decode([t])))
    return out


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    stop_reason: int | str | None = None  # vLLM's: the stop string or stop token id that ended it; EOS, length: None

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
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    num_cached_tokens: int = 0
    prompt: str | None = None
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # vLLM's: None first, then one per prompt token

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class LLM:
    """``LLM(model, enable_lora=True, lora_modules={"name": "/peft/dir"})`` serves LoRA adapters too. Takes
    EngineConfig's fields, and vLLM's ``tensor_parallel_size=1``, ``enforce_eager``, ``trust_remote_code``,
    ``dtype="half"`` and ``gpu_memory_utilization`` (``vllm_engine_args``)."""

    def __init__(self, model: str = DEFAULT_MODEL, **kwargs):
        kwargs = vllm_engine_args(kwargs)
        if "lora_modules" in kwargs:
            kwargs["lora_modules"] = lora_modules(kwargs["lora_modules"])
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._next_id = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        """vLLM's name for ``tokenizer``."""
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """As vLLM's: ``SamplingParams()`` with the temperature, top_p, top_k, max_new_tokens (as max_tokens),
        repetition_penalty and min_p that the model's generation_config.json sets; what ``generate`` uses when given none. Its fields may be assigned
        (vLLM's examples do), each assignment checked."""
        return default_sampling_params(self.engine.runner.model)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora_request=None,
        chat_template: str | None = None,
        *,
        lora_name: str | None | list[str | None] = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """vLLM's ``LLM.chat``: each conversation rendered with the tokenizer's chat template (or ``chat_template``),
        tokenized without added special tokens (the template writes its own, as the router does for the
        gateway's chat), then ``generate``. Each output's ``prompt`` is the rendered text. The first five parameters
        are vLLM's, in its order."""
        convs = conversations(messages)
        tok = self.engine.tokenizer
        if chat_template is None and not getattr(tok, "chat_template", None):
            raise ValueError("chat_template: the model's tokenizer has none; pass chat_template=... or use generate")
        rendered = [tok.apply_chat_template(conv, chat_template=chat_template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt,
                                            continue_final_message=continue_final_message,
                                            **(chat_template_kwargs or {})) for conv in convs]
        outs = self.generate([{"prompt_token_ids": tok.encode(text, add_special_tokens=False)} for text in rendered],
                             sampling_params, lora_name=lora_name, use_tqdm=use_tqdm, lora_request=lora_request)
        for out, text in zip(outs, rendered, strict=True):
            out.prompt = text
        return outs

    def generate(
        self,
        prompts: str | list[str] | list[int] | list[list[int]] | dict | list[dict],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        priorities: list[int] | None = None,
        lora_name: str | None | list[str | None] = None,
        use_tqdm: bool = False,  # vLLM's; there is no progress bar here
        lora_request=None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched together; outputs keep the input order. ``lora_name``: one
        adapter for every prompt, or one per prompt (None: the base model); or vLLM's ``lora_request``
        (``LoRARequest(name, id, path)`` or anything with ``lora_name`` / ``lora_path``; loaded on first use).
        ``priorities``: higher first (vLLM's ``priority`` is lower first, so it is not taken under that name)."""
        if lora_request is not None:
            if lora_name is not None:
                raise ValueError("lora_request: give lora_name or lora_request, not both")
            lora_name = lora_names(self.engine, lora_request)
        if not isinstance(prompts, str | list | tuple | dict):
            raise ValueError(f"prompts: expected a string, token ids or a list of them, got {prompts!r:.80}")
        if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = [prompt_of(p) for p in prompts]
        params = self.get_default_sampling_params() if sampling_params is None else sampling_params
        per = list(params) if isinstance(params, list | tuple) else [params] * len(prompts)
        if len(per) != len(prompts):
            raise ValueError("sampling_params: list length must match prompts")
        if not all(isinstance(p, SamplingParams) for p in per):
            raise ValueError(f"sampling_params: expected a SamplingParams or a list of them, got {params!r:.80}")
        if priorities is not None and (not isinstance(priorities, list) or len(priorities) != len(prompts) or not all(
                isinstance(p, int) and not isinstance(p, bool) for p in priorities)):
            raise ValueError("priorities: expected one integer per prompt")
        loras = lora_name if isinstance(lora_name, list) else [lora_name] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError("lora_name: list length must match prompts")
        results: list[RequestOutput] = []
        completions: dict[str, CompletionOutput] = {}  # engine request id -> its completion
        owners: dict[str, RequestOutput] = {}  # engine request id -> the prompt's output
        firsts: list = []  # each prompt's first sequence (its prompt logprobs)
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
                        firsts.append(seq)
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
                        out.stop_reason = step.stop_reason
                    if out.index == 0:
                        owners[step.request_id].num_cached_tokens = step.num_cached_tokens
        except BaseException:
            for rid in completions:
                self.engine.abort(rid)
            raise
        tok = self.engine.tokenizer
        for r, p, seq in zip(results, per, firsts, strict=True):
            if p.prompt_logprobs is not None:
                r.prompt_logprobs = [None] + [_prompt_entry(e, tok) for e in seq.prompt_logprobs or ()]
            if p.logprobs is not None:
                for o in r.outputs:
                    o.logprobs = [_ranked(step, p.logprobs, p.greedy, tok) for step in o.logprobs]
            first = r.outputs[0]
            r.token_ids, r.text, r.finish_reason, r.logprobs = (first.token_ids, first.text, first.finish_reason,
                                                                first.logprobs)
        return results
