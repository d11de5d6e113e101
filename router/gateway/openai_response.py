"""Router responses -> OpenAI objects: ``text_completion`` / ``chat.completion`` and their stream chunks.

Token texts in logprobs come from the router (``TokenLogprob.token_text``), so the gateway holds no
tokenizer. Usage counts each prompt once (not once per sample) and every choice's completion tokens.
"""

from __future__ import annotations

from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.gateway.openai_echo import (
    echo_logprobs,
    echo_text,
    joined,
    prompt_logprobs_json,
    without_generated,
)
from pdserve.router.gateway.openai_request import Plan


def _top(lp: pb.TokenLogprob, k: int) -> list[tuple[str, float]]:
    ranked = sorted(lp.top.items(), key=lambda kv: -kv[1])[:k]
    return [(lp.token_text.get(t, ""), v) for t, v in ranked]


def completion_logprobs(lps, k: int, offset: int) -> tuple[dict, int]:
    """OpenAI's legacy logprobs object for these tokens; ``offset`` is where they start in the choice's text.
    Each ``top_logprobs`` entry always holds the sampled token, so it has up to ``k + 1`` entries (OpenAI, vLLM)."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        text = lp.token_text.get(lp.token_id, "")
        tokens.append(text)
        values.append(lp.logprob)
        top = dict(_top(lp, k)) if k else {}
        top.setdefault(text, lp.logprob)  # a sampled token outside the top k (temperature > 0) is still listed
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset


def chat_logprobs(lps, k: int) -> dict:
    content = []
    for lp in lps:
        text = lp.token_text.get(lp.token_id, "")
        content.append({
            "token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in _top(lp, k)],
        })
    return {"content": content}


def usage(plan: Plan, finals: dict[int, pb.Usage]) -> dict:
    prompt = sum(u.prompt_tokens for i, u in finals.items() if i % plan.n == 0)
    completion = sum(u.completion_tokens for u in finals.values())
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    cached = sum(u.cached_prompt_tokens for i, u in finals.items() if i % plan.n == 0)
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def _object(plan: Plan, chunk: bool) -> str:
    if plan.kind == "chat":
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"


def full_response(plan: Plan, results: list[pb.GenerateResponse], created: int) -> dict:
    """Non-streamed answer from each choice's Complete result."""
    choices = []
    if plan.drop_generated:
        results = [without_generated(r) for r in results]
    for i, r in enumerate(results):
        choice: dict = {"index": i, "finish_reason": r.finish_reason or None, "stop_reason": _stop_reason(r)}
        if plan.kind == "chat":
            choice["message"] = {"role": "assistant", "content": r.text}
            choice["logprobs"] = chat_logprobs(r.logprobs, plan.logprobs) if plan.logprobs is not None else None
        else:
            _completion_text(plan, choice, plan.requests[i], r, True)
        if plan.return_token_ids:
            choice["token_ids"] = list(r.token_ids)
        _cache_note(choice, r)
        choices.append(choice)
    served = next((r.model for r in results if r.model), plan.model)  # after any route: what really served it
    return {"id": plan.id, "object": _object(plan, False), "created": created, "model": served,
            "choices": choices, "usage": usage(plan, {i: r.usage for i, r in enumerate(results)})}


def _stop_reason(resp: pb.GenerateResponse) -> int | str | None:
    """vLLM's ``stop_reason``: the stop string or stop token id that ended the choice (EOS, length: null)."""
    return resp.stop_string or (resp.stop_token_id if resp.HasField("stop_token_id") else None)


def _completion_text(plan: Plan, choice: dict, req: pb.GenerateRequest, resp: pb.GenerateResponse, first: bool,
                     offset: int = 0) -> int:
    """A completion choice's text and logprobs (the prompt's first with echo, in the first message); vLLM's
    prompt_logprobs when asked. Returns the text offset after this message."""
    text, prompt_lp = resp.text, None
    if first and plan.echo:
        text = echo_text(req, resp.prompt_logprobs) + text
        if plan.logprobs is not None:
            prompt_lp, offset = echo_logprobs(resp.prompt_logprobs, plan.logprobs)
    choice["text"] = text
    choice["logprobs"] = None
    if plan.logprobs is not None:
        part, offset = completion_logprobs(resp.logprobs, plan.logprobs, offset)
        choice["logprobs"] = joined(prompt_lp, part) if prompt_lp is not None else part
    if first and plan.prompt_logprobs is not None:
        choice["prompt_logprobs"] = prompt_logprobs_json(resp.prompt_logprobs)
    return offset


def _cache_note(choice: dict, resp: pb.GenerateResponse) -> None:
    """pdserve's extension on a choice answered from the router's response cache: ``"pdserve_cache":
    {"similarity": s}`` (1.0 exact; less: the semantic cache matched another prompt)."""
    if resp.cached:
        choice["pdserve_cache"] = {"similarity": round(resp.cache_similarity, 4)}


class StreamChunks:
    """Builds the stream's chunks: one per router response, then (include_usage) the usage chunk."""

    def __init__(self, plan: Plan, created: int, model: str | None = None):
        self.plan = plan
        self.head = {"id": plan.id, "object": _object(plan, True), "created": created,
                     "model": model or plan.model}
        self.started: set[int] = set()
        self.offsets: dict[int, int] = {}
        self.finals: dict[int, pb.Usage] = {}

    def chunk(self, index: int, resp: pb.GenerateResponse) -> dict:
        plan = self.plan
        if plan.drop_generated:
            resp = without_generated(resp)
        choice: dict = {"index": index, "finish_reason": resp.finish_reason or None,
                        "stop_reason": _stop_reason(resp)}
        if plan.kind == "chat":
            delta: dict = {"content": resp.text}
            if index not in self.started:
                self.started.add(index)
                delta = {"role": "assistant", "content": resp.text}
            choice["delta"] = delta
            choice["logprobs"] = chat_logprobs(resp.logprobs, plan.logprobs) if plan.logprobs is not None else None
        else:
            first = index not in self.started
            self.started.add(index)
            self.offsets[index] = _completion_text(plan, choice, plan.requests[index], resp, first,
                                                   self.offsets.get(index, 0))
        if plan.return_token_ids:
            choice["token_ids"] = list(resp.token_ids)
        _cache_note(choice, resp)
        if resp.finish_reason:
            self.finals[index] = resp.usage
            if resp.model:  # the last message names the model that served it (after any route)
                self.head["model"] = resp.model
        out = {**self.head, "choices": [choice]}
        if plan.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self) -> dict:
        return {**self.head, "choices": [], "usage": usage(self.plan, self.finals)}
