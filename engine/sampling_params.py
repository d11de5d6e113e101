"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.engine.structured_outputs import StructuredOutputsParams


def _as_tuple(name: str, value) -> tuple:
    if value is None:
        return ()
    try:
        return tuple(value)
    except TypeError:
        raise ValueError(f"{name}: must be a list, got {value!r:.80}") from None


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """temperature 0 means greedy. top_k 0 or -1 means off. seed makes sampling reproducible per request.
    n: completions per prompt in ``LLM.generate`` (as vLLM's; completion i of a seeded request uses seed + i).

    Penalties and filters as vLLM and OpenAI define them (``engine.penalties``): ``presence_penalty`` and
    ``frequency_penalty`` in [-2, 2] are subtracted from the logits of tokens already generated (once, or once per
    occurrence); ``repetition_penalty`` > 0 divides a positive logit (multiplies a negative one) of every token in
    the prompt or the output; ``min_p`` in [0, 1] drops tokens less likely than ``min_p`` times the likeliest;
    ``min_tokens`` holds back EOS, ``stop_token_ids`` and stop strings until that many tokens were generated.
    ``structured_outputs``: what the text must match (``engine.structured_outputs``; a dict of its fields works).
    ``logit_bias`` (OpenAI's): {token id: bias in [-100, 100]} added to the logits; ``allowed_token_ids`` (vLLM's):
    only these may be drawn. Both are kept as sorted tuples. ``include_stop_str_in_output``: the stop string that
    ended the request stays at the end of its text. ``prompt_logprobs`` k: each prompt token's logprob (with its
    rank) and the k likeliest alternatives, as vLLM's (``engine.prompt_logprobs``; the offline API only: the
    cluster's proto does not carry them)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: tuple[tuple[int, float], ...] | dict | None = None
    allowed_token_ids: tuple[int, ...] | None = None
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= 128:
            raise ValueError(f"n: must be an integer in [1, 128], got {self.n!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens: must be a positive integer, got {self.max_tokens!r}")
        if (
            not isinstance(self.temperature, int | float)
            or math.isnan(self.temperature)
            or self.temperature < 0
        ):
            raise ValueError(f"temperature: must be a number >= 0, got {self.temperature!r}")
        if math.isinf(self.temperature):
            raise ValueError("temperature: must be finite")
        if not isinstance(self.top_p, int | float) or math.isnan(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k: must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed: must be an integer, got {self.seed!r}")
        for flag in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}: must be True or False, got {getattr(self, flag)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 20):
                raise ValueError(f"{name}: must be an integer in [0, 20], got {v!r}")
        self._check_penalties()
        self._check_token_lists()
        so = self.structured_outputs
        if isinstance(so, dict):
            try:
                so = StructuredOutputsParams(**so)
            except TypeError as e:
                raise ValueError(f"structured_outputs: {e}") from None
            object.__setattr__(self, "structured_outputs", so)
        elif so is not None and not isinstance(so, StructuredOutputsParams):
            raise ValueError(f"structured_outputs: expected StructuredOutputsParams, got {type(so).__name__}")
        # one string is one stop string (as in vLLM), not one per character; None is none (as in vLLM)
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else _as_tuple("stop", self.stop))
        object.__setattr__(self, "stop_token_ids", _as_tuple("stop_token_ids", self.stop_token_ids))
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop: stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0:
                raise ValueError(f"stop_token_ids: must be non-negative integers, got {t!r}")

    def _check_penalties(self) -> None:
        for name, lo, hi in (("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0), ("min_p", 0.0, 1.0)):
            v = getattr(self, name)
            if not _is_number(v) or not lo <= v <= hi:
                raise ValueError(f"{name}: must be a number in [{lo:g}, {hi:g}], got {v!r}")
        r = self.repetition_penalty
        if not _is_number(r) or not 0 < r < math.inf:
            raise ValueError(f"repetition_penalty: must be a finite number > 0, got {r!r}")
        m = self.min_tokens
        if not isinstance(m, int) or isinstance(m, bool) or not 0 <= m <= self.max_tokens:
            raise ValueError(f"min_tokens: must be an integer in [0, max_tokens={self.max_tokens}], got {m!r}")

    def _check_token_lists(self) -> None:
        bias = self.logit_bias
        if bias is not None:
            try:
                items = [(t, v) for t, v in (bias.items() if isinstance(bias, dict) else bias)]
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias: expected {{token id: bias}}, got {bias!r:.60}") from None
            pairs = tuple(sorted((_token_id(t, "logit_bias"), _bias(v)) for t, v in items))
            if len(pairs) > MAX_TOKEN_LIST:
                raise ValueError(f"logit_bias: at most {MAX_TOKEN_LIST} tokens, got {len(pairs)}")
            for t, v in pairs:
                if not -100 <= v <= 100:  # NaN fails too
                    raise ValueError(f"logit_bias: the bias of token {t} must be in [-100, 100], got {v}")
            object.__setattr__(self, "logit_bias", pairs or None)
        allowed = self.allowed_token_ids
        if allowed is not None:
            ids = tuple(sorted({_token_id(t, "allowed_token_ids") for t in _as_tuple("allowed_token_ids", allowed)}))
            if not ids or len(ids) > MAX_TOKEN_LIST:
                raise ValueError(f"allowed_token_ids: 1 to {MAX_TOKEN_LIST} token ids, got {len(ids)}")
            object.__setattr__(self, "allowed_token_ids", ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether a penalty changes this request's logits (``engine.penalties``)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def token_ids_used(self) -> tuple[int, ...]:
        """The token ids ``logit_bias`` and ``allowed_token_ids`` name (the engine checks them against its vocabulary,
        as vLLM does; a stop token id outside it can never be generated, so it is harmless and accepted)."""
        return (*(t for t, _ in self.logit_bias or ()), *(self.allowed_token_ids or ()))


MAX_TOKEN_LIST = 4096  # logit_bias entries, allowed_token_ids


def _token_id(t, field: str) -> int:
    """A token id from an int or its decimal string (OpenAI's logit_bias keys are strings)."""
    if isinstance(t, str) and t.strip().lstrip("-").isdigit():
        t = int(t)
    if not isinstance(t, int) or isinstance(t, bool) or t < 0:
        raise ValueError(f"{field}: token ids must be non-negative integers, got {t!r:.40}")
    return t


def _bias(v) -> float:
    if not _is_number(v):
        raise ValueError(f"logit_bias: biases must be numbers, got {v!r:.40}")
    return float(v)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)
