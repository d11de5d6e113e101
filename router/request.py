"""The public request, parsed once at the router's edge into a frozen domain object.

The router checks only what it needs to route and to protect itself: sizes, tokenization, sampling (converted
once; the validated params are what is forwarded), and, once a pair is chosen, that the token ids fit that
pair's model. The engine on the workers stays the one place that validates against the model for real.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.engine.errors import InvalidRequestError, RequestNotFoundError
from pdserve.engine.sampling_params import SamplingParams
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.chat import ChatTemplate, encode_chat
from pdserve.router.load import WorkerLoad
from pdserve.serving.convert import sampling_from_proto

MAX_PROMPT_CHARS = 4 * 1024 * 1024
MAX_REQUEST_ID_LEN = 256
SAMPLING_CACHE_SIZE = 1024  # distinct sampling settings kept validated (most traffic shares a handful)


@dataclass(frozen=True, slots=True)
class ClientRequest:
    request_id: str
    token_ids: tuple[int, ...]
    sampling: SamplingParams
    priority: int = 0
    tenant: str = ""
    session_id: str = ""

    @property
    def session_key(self) -> str:
        """What session-affinity routing hashes: the session id, else the tenant."""
        return self.session_id or self.tenant


class RequestParser:
    """``pb.GenerateRequest`` -> ClientRequest; raises InvalidRequestError naming the bad field.

    ``chat`` is the model's chat template (None: the model has none, and ``messages`` is refused); ``model``
    is the served model's name, which a request's ``model`` must match when set (else NOT_FOUND)."""

    def __init__(self, tokenizer, seed: int | None = None, chat: ChatTemplate | None = None, model: str = ""):
        self.tokenizer = tokenizer
        self.chat = chat
        self.model = model
        self._rid_rng = random.Random(seed)  # seeded from os.urandom; no syscall per request id
        self._sampling: dict[bytes, SamplingParams] = {}  # serialized SamplingParams -> validated

    def parse(self, msg: pb.GenerateRequest) -> ClientRequest:
        if len(msg.request_id) > MAX_REQUEST_ID_LEN:
            raise InvalidRequestError(f"request_id: at most {MAX_REQUEST_ID_LEN} characters")
        if msg.model and self.model and msg.model != self.model:
            raise RequestNotFoundError(f"model: {msg.model[:200]!r} is not served here (this router serves "
                                       f"{self.model!r})")
        return ClientRequest(
            request_id=msg.request_id or f"req-{self._rid_rng.getrandbits(48):012x}",
            token_ids=self.token_ids(msg),
            sampling=self.sampling(msg.sampling),
            priority=msg.priority,
            tenant=msg.tenant,
            session_id=msg.session_id,
        )

    def token_ids(self, msg: pb.GenerateRequest) -> tuple[int, ...]:
        given = [name for name in ("prompt", "token_ids", "messages") if getattr(msg, name)]
        if len(given) != 1:
            what = (" and ".join(given) + " are all set" if len(given) == 3 else " and ".join(given) + " are both set"
                    ) if given else "prompt is empty, and no token_ids or messages were given"
            field = "prompt" if "prompt" in given or not given else given[-1]
            raise InvalidRequestError(f"{field}: set exactly one of prompt, token_ids or messages ({what})")
        if given[0] == "token_ids":
            return tuple(msg.token_ids)
        if given[0] == "messages":
            return encode_chat(self.chat, msg.messages, self.tokenizer, self.model)
        if len(msg.prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequestError(f"prompt: longer than {MAX_PROMPT_CHARS} characters")
        token_ids = tuple(self.tokenizer.encode(msg.prompt, add_special_tokens=True))
        if not token_ids:
            raise InvalidRequestError("prompt: tokenizes to no tokens")
        return token_ids

    def sampling(self, msg: pb.SamplingParams) -> SamplingParams:
        """sampling_from_proto, validated once per distinct setting (SamplingParams is frozen, so shared)."""
        key = msg.SerializeToString()
        params = self._sampling.get(key)
        if params is None:
            try:
                params = sampling_from_proto(msg)  # failures are not cached
            except ValueError as e:
                raise InvalidRequestError(str(e)) from None
            if len(self._sampling) >= SAMPLING_CACHE_SIZE:
                self._sampling.clear()
            self._sampling[key] = params
        return params


def check_model_limits(token_ids: Sequence[int], load: WorkerLoad) -> None:
    """The prompt against the vocabulary and context of the model ``load`` reports (skipped until it has
    reported one). Raises InvalidRequestError naming the field."""
    vocab, max_len = load.vocab_size, load.max_model_len
    if vocab and (min(token_ids) < 0 or max(token_ids) >= vocab):  # C-speed check; find the culprit on failure
        bad = next(t for t in token_ids if not 0 <= t < vocab)
        raise InvalidRequestError(f"token_ids: {bad} is outside the vocabulary [0, {vocab})")
    if max_len and len(token_ids) >= max_len:
        raise InvalidRequestError(f"prompt: {len(token_ids)} tokens exceeds the context limit of {max_len - 1}")
