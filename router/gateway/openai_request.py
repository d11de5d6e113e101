"""An OpenAI request body -> a ``Plan``: one router ``GenerateRequest`` per choice, or a 400 naming the field.

Checked here: JSON types and shapes, and fields the router does not have (``n``, ``stream``, the chat
``logprobs`` flag). Value ranges the router checks (``temperature``, ``top_p``, ``max_tokens``, a role, the
model name) are forwarded and refused there, so both APIs refuse the same things with the same words.

- ``n`` and a list of prompts fan out: choice ``i * n + j`` is prompt ``i``'s ``j``-th sample. With a
  ``seed``, sample ``j`` uses ``seed + j``, so the choices differ yet the request stays reproducible.
- ``user`` is the router's tenant (with API keys, it must be the key's own tenant, else 403).
- OpenAI's ``presence_penalty``, ``frequency_penalty`` and ``logit_bias``, as OpenAI defines them
  (``engine.penalties``); vLLM's ``allowed_token_ids``.
- Extensions (as vLLM names them): ``top_k``, ``min_p``, ``min_tokens``, ``repetition_penalty``, ``ignore_eos``,
  ``include_stop_str_in_output``, ``stop_token_ids``, ``return_token_ids``; and pdserve's ``cache``: ``"use"``
  (default), ``"bypass"`` or ``"refresh"``, the router's response cache mode.
- Structured outputs: OpenAI's ``response_format`` (json_object, json_schema), vLLM's ``structured_outputs`` and
  ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` (``openai_structured``).
- Completions' ``echo`` (also with ``max_tokens: 0``, to score a prompt) and vLLM's ``prompt_logprobs``
  (``openai_echo``).
- Fields with no equivalent are refused when set to anything but their default (``suffix``, ``best_of``, tools,
  and vLLM's other extensions: ``bad_words``, a custom ``chat_template``...); unknown fields are ignored.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass

from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.gateway.errors import GatewayError, bad_field
from pdserve.router.gateway.openai_structured import structured_of

MAX_N = 64
MAX_CHOICES = 256  # prompts x n
MAX_LOGPROBS = 20
MAX_TENANT_LEN = 256
CHAT_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
CACHE_MODES = {"use": pb.CACHE_USE, "bypass": pb.CACHE_BYPASS, "refresh": pb.CACHE_REFRESH}


@dataclass(frozen=True, slots=True)
class Plan:
    kind: str  # "completion" | "chat"
    id: str  # cmpl-... / chatcmpl-...; the router request ids are f"{id}-{choice}"
    model: str
    requests: tuple[pb.GenerateRequest, ...]  # one per choice, in choice order
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token; None: no logprobs
    return_token_ids: bool
    echo: bool = False  # completions: the prompt before the text (router.gateway.openai_echo)
    prompt_logprobs: int | None = None  # vLLM's: return the prompt's logprobs with this many alternatives
    drop_generated: bool = False  # echo with max_tokens 0: the prompt alone


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v):
        raise bad_field(name, f"expected an integer, got {v!r}")
    if lo is None and hi is None and not INT32_MIN <= v <= INT32_MAX:
        raise bad_field(name, f"{v} is out of range")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad_field(name, f"must be {bounds}, got {v}")
    return v


def _number(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise bad_field(name, f"expected a number, got {v!r}")
    return float(v)


def _bool(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad_field(name, f"expected true or false, got {v!r}")
    return v


def _token_ids(v) -> bool:
    return isinstance(v, list) and bool(v) and all(_is_int(t) and INT32_MIN <= t <= INT32_MAX for t in v)


def prompts_of(body: dict) -> list[str | list[int]]:
    """``prompt``: a string, a list of strings, token ids, or a list of token-id lists."""
    p = body.get("prompt")
    if isinstance(p, str):
        return [p]
    if _token_ids(p):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return p
    if isinstance(p, list) and p and all(_token_ids(x) for x in p):
        return p
    if p is None:
        raise bad_field("prompt", "is required")
    raise bad_field("prompt", "expected a string, a list of strings, a list of token ids or a list of token-id lists")


def _content(i: int, m: dict) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: text only
        parts = []
        for k, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_field(f"messages[{i}].content[{k}]", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_field(f"messages[{i}].content", "expected a string or a list of text parts")


def messages_of(body: dict) -> list[pb.ChatMessage]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_field("messages", "expected a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_field(f"messages[{i}]", "expected an object with a string role")
        role = CHAT_ROLE_ALIASES.get(m["role"], m["role"])
        out.append(pb.ChatMessage(role=role, content=_content(i, m)))
    return out


_UNSUPPORTED = {  # field -> is its value the default (so it may be sent)?
    "suffix": lambda v: v in (None, ""),
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    # vLLM's extensions beyond the ones served (top_k, min_p, min_tokens, repetition_penalty, ignore_eos,
    # stop_token_ids, return_token_ids): a vLLM
    # client sending them must hear they are not honoured, not get an unpenalized / unguided answer
    "length_penalty": lambda v: v in (None, 1),
    "use_beam_search": lambda v: v in (None, False),
    "skip_special_tokens": lambda v: v in (None, True),  # the text never holds special tokens
    "spaces_between_special_tokens": lambda v: v in (None, True),
    "return_tokens_as_token_ids": lambda v: v in (None, False),
    "truncate_prompt_tokens": lambda v: v is None,
    "bad_words": lambda v: not v,
    "logits_processors": lambda v: not v,
    "add_generation_prompt": lambda v: v in (None, True),  # chat: the router's template rendering adds it
    "continue_final_message": lambda v: v in (None, False),
    "chat_template": lambda v: v is None,  # chat: the model's own template is the one rendered
    "chat_template_kwargs": lambda v: not v,  # e.g. Qwen3's enable_thinking: the router renders without them
    "mm_processor_kwargs": lambda v: not v,
    "priority": lambda v: v in (None, 0),  # vLLM's (lower first); the router's classes are not open to HTTP
}


def _sampling(body: dict, kind: str, default_max_tokens: int | None) -> tuple[pb.SamplingParams, int | None]:
    s = pb.SamplingParams()
    max_tokens = _int(body, "max_tokens")
    if kind == "chat":
        max_tokens = _int(body, "max_completion_tokens") if body.get("max_completion_tokens") is not None \
            else max_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens is not None:
        s.max_tokens = max_tokens
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
        v = _number(body, name)  # ranges: the router's (pdserve.engine.sampling_params), relayed as a 400
        if v is not None:
            setattr(s, name, v)
    for name in ("top_k", "min_tokens"):
        v = _int(body, name)
        if v is not None:
            setattr(s, name, v)
    seed = _int(body, "seed", -(1 << 63), (1 << 63) - 1 - MAX_CHOICES)
    if seed is not None:
        s.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        s.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(x, str) for x in stop):
        s.stop.extend(stop)
    elif stop is not None:
        raise bad_field("stop", "expected a string or a list of strings")
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not (not ids or _token_ids(ids)):
            raise bad_field("stop_token_ids", "expected a list of token ids")
        s.stop_token_ids.extend(ids)
    s.ignore_eos = _bool(body, "ignore_eos")
    s.include_stop_str_in_output = _bool(body, "include_stop_str_in_output")
    bias = body.get("logit_bias")
    if bias is not None:  # OpenAI's: {"token id": bias}; ids and ranges are the router's to check
        if not isinstance(bias, dict) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                 and math.isfinite(v) for v in bias.values()):
            raise bad_field("logit_bias", "expected an object of token id -> number")
        try:
            s.logit_bias.update({int(k): float(v) for k, v in bias.items()})
        except (ValueError, OverflowError):
            raise bad_field("logit_bias", "keys must be token ids") from None
    allowed = body.get("allowed_token_ids")
    if allowed is not None:
        if not isinstance(allowed, list) or not allowed or not _token_ids(allowed):
            raise bad_field("allowed_token_ids", "expected a non-empty list of token ids")
        s.allowed_token_ids.extend(allowed)
    constraint = structured_of(body)
    if constraint is not None:
        s.structured_outputs.CopyFrom(constraint)
    if kind == "chat":
        wants = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
        if top is not None and not wants:
            raise bad_field("top_logprobs", "needs logprobs: true")
        logprobs = (top or 0) if wants else None
    else:
        logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS)
    if logprobs is not None:
        s.logprobs = logprobs
    return s, logprobs


def load_body(raw: bytes):
    """The request's JSON, or a 400 (``invalid_json``): not JSON, not UTF-8, or nested past the parser's depth
    (``[[[[...`` raised RecursionError, a 500)."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise GatewayError(400, f"body: not valid JSON: {e}", param="body", code="invalid_json") from None
    except RecursionError:
        raise GatewayError(400, "body: not valid JSON: nested too deeply", param="body", code="invalid_json") from None


def _not_unicode(v, path: str) -> str | None:
    """The path of the first string in ``v`` that is not valid Unicode (JSON allows a lone ``\\ud800``
    escape; protobuf strings must be UTF-8), or None."""
    if isinstance(v, str):
        try:
            v.encode()
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
        found = _not_unicode(x, f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


def parse(body, kind: str, default_chat_max_tokens: int | None = None) -> Plan:
    """Raises GatewayError (400) naming the field."""
    try:
        return _parse(body, kind, default_chat_max_tokens)
    except UnicodeEncodeError:  # a lone surrogate reached a protobuf string: a bad field, not a 500
        try:
            param = _not_unicode(body, "") or "body"
        except RecursionError:
            param = "body"
        raise bad_field(param, "is not valid Unicode (a lone UTF-16 surrogate)") from None


def _parse(body, kind: str, default_chat_max_tokens: int | None) -> Plan:
    if not isinstance(body, dict):
        raise bad_field("body", "expected a JSON object")
    for name, is_default in _UNSUPPORTED.items():
        if not is_default(body.get(name)):
            raise bad_field(name, "is not supported by this server")
    special = body.get("add_special_tokens")  # vLLM's: the router adds them to a prompt, never to a rendered chat
    if special is not None and special != (kind == "completion"):
        raise bad_field("add_special_tokens", f"is not supported by this server (only {kind == 'completion'} for "
                        f"{kind}s)")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_field("model", f"expected a string, got {model!r}")
    n = _int(body, "n", 1, MAX_N) or 1
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise bad_field("best_of", "is not supported by this server (only best_of = n)")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_field("stream_options", "is only allowed with stream: true")
        if not isinstance(options, dict):
            raise bad_field("stream_options", "expected an object")
        include_usage = _bool(options, "include_usage")
        if options.get("continuous_usage_stats") not in (None, False):  # vLLM's usage in every chunk
            raise bad_field("stream_options.continuous_usage_stats", "is not supported by this server")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > MAX_TENANT_LEN):
        raise bad_field("user", f"expected a string of at most {MAX_TENANT_LEN} characters")
    cache = body.get("cache", "use")
    if not isinstance(cache, str) or cache not in CACHE_MODES:
        raise bad_field("cache", f"expected one of {', '.join(map(repr, CACHE_MODES))}, got {cache!r}")
    echo = _bool(body, "echo")
    if echo and kind == "chat":
        raise bad_field("echo", "is only supported on completions")
    asked = _int(body, "prompt_logprobs", 0, MAX_LOGPROBS)
    drop = echo and body.get("max_tokens") == 0  # score the prompt alone (the router still generates one token)
    sampling, logprobs = _sampling({**body, "max_tokens": 1} if drop else body, kind,
                                   default_chat_max_tokens if kind == "chat" else None)
    if echo or asked is not None:  # echo reads the prompt's token texts (and logprobs) from prompt logprobs
        sampling.prompt_logprobs = max(asked or 0, logprobs or 0 if echo else 0)
    inputs: list = [messages_of(body)] if kind == "chat" else prompts_of(body)
    if len(inputs) * n > MAX_CHOICES:
        raise bad_field("n" if n > 1 else "prompt", f"prompts x n is at most {MAX_CHOICES}, got {len(inputs) * n}")
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    requests = []
    for i, source in enumerate(inputs):
        for j in range(n):
            req = pb.GenerateRequest(request_id=f"{rid}-{i * n + j}", model=model or "", tenant=user or "",
                                     cache=CACHE_MODES[cache])
            req.sampling.CopyFrom(sampling)
            if j and sampling.HasField("seed"):
                req.sampling.seed = sampling.seed + j
            if kind == "chat":
                req.messages.extend(source)
            elif isinstance(source, str):
                req.prompt = source
            else:
                req.token_ids.extend(source)
            requests.append(req)
    return Plan(kind, rid, model or "", tuple(requests), n, stream, include_usage, logprobs,
                _bool(body, "return_token_ids"), echo, asked, drop)
