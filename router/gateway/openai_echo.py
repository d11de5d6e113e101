"""Completions' ``echo`` (OpenAI) and ``prompt_logprobs`` (vLLM) from the router's prompt logprobs.

``echo: true`` puts the prompt before the completion's text, and with ``logprobs`` the prompt's tokens before the
completion's in the logprobs object (the first token has none, as OpenAI's). With ``max_tokens: 0`` the answer is
the prompt alone: how evaluation harnesses (lm-evaluation-harness's ``local-completions``) score a text. The
router's first message carries one ``PromptLogprob`` per prompt token (the first with rank 0: no logprob) with the
texts of their ids, so the gateway needs no tokenizer. A text prompt is echoed as sent; a token-id prompt as its
tokens' texts joined.
"""

from __future__ import annotations

from pdserve.protos import pdserve_pb2 as pb


def echo_text(req: pb.GenerateRequest, entries) -> str:
    """The prompt as the completion's text starts with it."""
    if req.prompt:
        return req.prompt
    return "".join(e.token_text.get(e.token_id, "") for e in entries)


def echo_logprobs(entries, k: int) -> tuple[dict, int]:
    """OpenAI's legacy logprobs object for the prompt's tokens, and the text offset after them."""
    tokens, values, tops, offsets, offset = [], [], [], [], 0
    for e in entries:
        text = e.token_text.get(e.token_id, "")
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if e.rank == 0:  # the first token: nothing before it to predict it from
            values.append(None)
            tops.append(None)
            continue
        values.append(e.logprob)
        top = {e.token_text.get(t, ""): v for t, v in list(zip(e.top_ids, e.top_logprobs, strict=True))[:k]}
        top.setdefault(text, e.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset


def joined(prompt_part: dict, completion_part: dict) -> dict:
    return {key: prompt_part[key] + completion_part[key] for key in prompt_part}


def prompt_logprobs_json(entries) -> list:
    """vLLM's ``prompt_logprobs``: None for the first token, then {token id: {logprob, rank, decoded_token}} with
    the prompt token first and its alternatives after it."""
    out: list = []
    for e in entries:
        if e.rank == 0:
            out.append(None)
            continue
        entry = {str(e.token_id): {"logprob": e.logprob, "rank": e.rank,
                                   "decoded_token": e.token_text.get(e.token_id, "")}}
        for rank, (t, v) in enumerate(zip(e.top_ids, e.top_logprobs, strict=True), start=1):
            entry.setdefault(str(t), {"logprob": v, "rank": rank, "decoded_token": e.token_text.get(t, "")})
        out.append(entry)
    return out


def without_generated(resp: pb.GenerateResponse) -> pb.GenerateResponse:
    """``max_tokens: 0`` with echo: the router generated one token (it needs one); the answer drops it."""
    out = pb.GenerateResponse()
    out.CopyFrom(resp)
    del out.token_ids[:]
    del out.logprobs[:]
    out.text = ""
    if out.finish_reason:
        out.finish_reason = "length"
        out.usage.completion_tokens = 0
        out.ClearField("stop_string")
        out.ClearField("stop_token_id")
    return out
