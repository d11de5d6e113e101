"""The public request, parsed once at the router's edge into a frozen domain object.

The router checks only what it needs to route and to protect itself: sizes, tokenization, sampling (converted
once; the validated params are what is forwarded), and, once a pair is chosen, that the token ids fit that
pair's model. The engine on the workers stays the one place that validates against the model for real.

Limits (past one: INVALID_ARGUMENT naming the field and the limit; the whole message is capped at
``MAX_MESSAGE_BYTES`` by gRPC itself, RESOURCE_EXHAUSTED): ``prompt`` characters, ``token_ids``, ``messages``
(count and characters, router.chat), ``stop`` / ``stop_token_ids`` (serving.convert), and the lengths of
``request_id``, ``tenant``, ``session_id`` and ``model``. A prompt longer than the pool's context is refused
while it is being tokenized, as soon as a prefix of it is known to be too long (``encode_bounded``).

Request ids: the client's ``request_id`` is echoed in every response, but inside the cluster a request is
known by an id the router assigns (``cluster_id``: the client's id plus a random suffix), so two clients, or
two requests of one client, that use the same id never meet on a worker.

Parsing never stalls the event loop (``parse_async``): a request with more than ``INLINE_CHARS`` of prompt or
chat (or ``INLINE_CHARS / 4`` token ids) is parsed on a thread (router.offload), one with more than
``LARGE_CHARS`` in the bounded lane for huge requests.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.engine.errors import InvalidRequestError, RequestNotFoundError
from pdserve.engine.sampling_params import SamplingParams
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.chat import MAX_MESSAGES, ChatTemplate, check_messages
from pdserve.router.load import WorkerLoad
from pdserve.router.offload import Offload
from pdserve.router.sampling_defaults import with_defaults
from pdserve.serving.convert import check_sampling_sizes, sampling_from_proto

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the router's public gRPC receive limit
MAX_PROMPT_CHARS = 4 * 1024 * 1024
MAX_TOKEN_IDS = 1024 * 1024
MAX_REQUEST_ID_LEN = 256
MAX_NAME_LEN = 256  # tenant, session_id, model
INLINE_CHARS = 2048  # requests up to this size are parsed on the event loop (tokenizing takes ~1 ms at most)
LARGE_CHARS = 256 * 1024  # larger ones are "huge": parsed in router.offload's bounded lane
MIN_PIECE_CHARS, MAX_PIECE_CHARS = 4096, 64 * 1024  # a long prompt is counted in pieces (encode_bounded)
SAMPLING_CACHE_SIZE = 1024  # distinct sampling settings kept validated (most traffic shares a handful)


@dataclass(frozen=True, slots=True)
class ClientRequest:
    request_id: str  # the client's (or a generated one), echoed in responses
    token_ids: tuple[int, ...]
    sampling: SamplingParams
    priority: int = 0
    tenant: str = ""
    session_id: str = ""
    cluster_id: str = ""  # the id workers know it by ("" : request_id)
    model: str = ""  # what serves it, a base model or an adapter (router.models: a route resolved); "": the default
    base_model: str = ""  # whose worker pools serve it ("": the one pool of a single-model router)
    lora_name: str = ""  # the adapter it runs under ("": the base model)

    @property
    def session_key(self) -> str:
        """What session-affinity routing hashes: the session id, else the tenant."""
        return self.session_id or self.tenant


class RequestParser:
    """``pb.GenerateRequest`` -> ClientRequest; raises InvalidRequestError naming the bad field.

    ``chat`` is the model's chat template (None: the model has none, and ``messages`` is refused); ``defaults``
    its sampling defaults for the fields a request leaves unset (router.sampling_defaults); ``model``
    is the served model's name, which a request's ``model`` must match when set (else NOT_FOUND) unless
    ``match_model`` is off (the router's catalog resolves names first, router.models).
    ``context_limit()`` is the longest context a worker of the pool serves (0: not known yet)."""

    def __init__(self, tokenizer, seed: int | None = None, chat: ChatTemplate | None = None, model: str = "",
                 context_limit: Callable[[], int] = lambda: 0, offload: Offload | None = None,
                 match_model: bool = True, defaults: pb.SamplingParams | None = None):
        self.tokenizer = tokenizer
        self.defaults = defaults  # the model's sampling defaults for unset fields (router.sampling_defaults)
        self.chat = chat
        self.model = model
        self.match_model = match_model
        self.context_limit = context_limit
        self.offload = offload or Offload()
        self._rid_rng = random.Random(seed)  # seeded from os.urandom; no syscall per request id
        self._sampling: dict[bytes, SamplingParams] = {}  # serialized SamplingParams -> validated

    def parse(self, msg: pb.GenerateRequest, prompt: str | None = None) -> ClientRequest:
        """Parse on the calling thread (small requests, tests); ``parse_async`` moves heavy work off the loop.
        ``prompt``: ``msg.prompt`` if the caller has it (each read of a proto string field makes a new copy)."""
        prompt = msg.prompt if prompt is None else prompt
        self.check_sizes(msg, prompt)
        return self._request(msg, self.token_ids(msg, prompt))

    async def parse_async(self, msg: pb.GenerateRequest) -> ClientRequest:
        """``parse``, on a thread when ``msg`` is large (its size from field lengths: the prompt is read once, ~1 ms
        for 4 MB; ``ByteSize`` takes several)."""
        prompt = msg.prompt
        size = len(prompt) + 4 * len(msg.token_ids)
        if msg.messages:
            size += LARGE_CHARS + 1 if len(msg.messages) > 64 else sum(len(m.content) for m in msg.messages)
        if size <= INLINE_CHARS:
            return self.parse(msg, prompt)
        return await self.offload.run(self.parse, msg, prompt, large=size > LARGE_CHARS)

    @staticmethod
    def check_sizes(msg: pb.GenerateRequest, prompt: str | None = None) -> None:
        """Every size limit, from lengths alone (nothing is copied or tokenized yet)."""
        for name, limit in (("request_id", MAX_REQUEST_ID_LEN), ("tenant", MAX_NAME_LEN),
                            ("session_id", MAX_NAME_LEN), ("model", MAX_NAME_LEN)):
            if len(getattr(msg, name)) > limit:
                raise InvalidRequestError(f"{name}: at most {limit} characters")
        if len(msg.prompt if prompt is None else prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequestError(f"prompt: longer than {MAX_PROMPT_CHARS} characters")
        if len(msg.token_ids) > MAX_TOKEN_IDS:
            raise InvalidRequestError(f"token_ids: at most {MAX_TOKEN_IDS} ids, got {len(msg.token_ids)}")
        if len(msg.messages) > MAX_MESSAGES:
            raise InvalidRequestError(f"messages: at most {MAX_MESSAGES} messages, got {len(msg.messages)}")
        try:
            check_sampling_sizes(msg.sampling)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None

    def _request(self, msg: pb.GenerateRequest, token_ids: tuple[int, ...]) -> ClientRequest:
        if self.match_model and msg.model and self.model and msg.model != self.model:
            raise RequestNotFoundError(f"model: {msg.model[:200]!r} is not served here (this router serves "
                                       f"{self.model!r})")
        suffix = f"{self._rid_rng.getrandbits(48):012x}"
        rid = msg.request_id or f"req-{suffix}"
        return ClientRequest(
            request_id=rid,
            token_ids=token_ids,
            sampling=self.sampling(msg.sampling),
            priority=msg.priority,
            tenant=msg.tenant,
            session_id=msg.session_id,
            cluster_id=f"{rid}~{suffix}" if msg.request_id else rid,
        )

    def token_ids(self, msg: pb.GenerateRequest, prompt: str | None = None) -> tuple[int, ...]:
        prompt = msg.prompt if prompt is None else prompt
        given = [name for name, value in (("prompt", prompt), ("token_ids", msg.token_ids), ("messages", msg.messages))
                 if value]
        if len(given) != 1:
            what = (" and ".join(given) + " are all set" if len(given) == 3 else " and ".join(given) + " are both set"
                    ) if given else "prompt is empty, and no token_ids or messages were given"
            field = "prompt" if "prompt" in given or not given else given[-1]
            raise InvalidRequestError(f"{field}: set exactly one of prompt, token_ids or messages ({what})")
        limit = self.context_limit()
        if given[0] == "token_ids":
            if limit and len(msg.token_ids) >= limit:
                raise InvalidRequestError(f"prompt: {len(msg.token_ids)} tokens exceeds the context limit of "
                                          f"{limit - 1}")
            return tuple(msg.token_ids)
        if given[0] == "messages":
            if self.chat is None:
                name = f"model {self.model!r}" if self.model else "the model"
                raise InvalidRequestError(f"messages: {name} has no chat template; send prompt or token_ids instead")
            text = self.chat.render(check_messages(msg.messages))
            token_ids = encode_bounded(self.tokenizer, text, limit, add_special_tokens=False, field="messages")
            if not token_ids:
                raise InvalidRequestError("messages: the chat template renders them to no tokens")
            return token_ids
        token_ids = encode_bounded(self.tokenizer, prompt, limit, add_special_tokens=True)
        if not token_ids:
            raise InvalidRequestError("prompt: tokenizes to no tokens")
        return token_ids

    def sampling(self, msg: pb.SamplingParams) -> SamplingParams:
        """sampling_from_proto, validated once per distinct setting (SamplingParams is frozen, so shared)."""
        key = msg.SerializeToString()  # bounded: check_sizes ran first
        params = self._sampling.get(key)
        if params is None:
            try:
                params = sampling_from_proto(with_defaults(msg, self.defaults))  # failures are not cached
                if params.structured_outputs is not None:  # a bad schema or grammar is refused here, not by a worker
                    params.structured_outputs.grammar_text()
            except ValueError as e:
                raise InvalidRequestError(str(e)) from None
            if len(self._sampling) >= SAMPLING_CACHE_SIZE:
                self._sampling.clear()
            self._sampling[key] = params
        return params


def encode_bounded(tokenizer, text: str, limit: int, add_special_tokens: bool = True, field: str = "prompt"
                   ) -> tuple[int, ...]:
    """``text``'s token ids, refused as soon as they are known to reach ``limit`` (0: no limit).

    A text longer than two pieces (``2 * limit`` characters, within [MIN_PIECE_CHARS, MAX_PIECE_CHARS]) is first
    counted piece by piece, cut at whitespace (a boundary no common pre-tokenizer merges across), and refused
    once the count passes the limit by more than a margin for the cuts: a 4 MB prompt costs about the work of a
    context's worth of text, not seconds, and never builds a Python list of millions of ids (whose allocation
    and release hold the GIL). The exact ids come from one encode of the whole text."""
    piece = min(MAX_PIECE_CHARS, max(MIN_PIECE_CHARS, 2 * limit))
    if limit and len(text) > 2 * piece:
        num_tokens, start, num_pieces = 0, 0, 0
        while start < len(text):
            end = len(text) if len(text) - start <= piece else _cut(text, start + piece)
            num_tokens += len(tokenizer.encode(text[start:end], add_special_tokens=False))
            start, num_pieces = end, num_pieces + 1
            if num_tokens >= limit + 8 * num_pieces:
                raise InvalidRequestError(f"{field}: more than {limit - 1} tokens (the context limit) after "
                                          f"{start} of its {len(text)} characters")
    token_ids = tuple(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    if limit and len(token_ids) >= limit:
        raise InvalidRequestError(f"{field}: {len(token_ids)} tokens exceeds the context limit of {limit - 1}")
    return token_ids


def _cut(text: str, at: int) -> int:
    """A cut near ``at``: before the last whitespace in the preceding 1024 characters, else at ``at``."""
    space = max(text.rfind(" ", at - 1024, at), text.rfind("\n", at - 1024, at))
    return space if space > at - 1024 else at


def check_model_limits(token_ids: Sequence[int], load: WorkerLoad) -> None:
    """The prompt against the vocabulary and context of the model ``load`` reports (skipped until it has
    reported one). Raises InvalidRequestError naming the field. The length first: it costs nothing."""
    vocab, max_len = load.vocab_size, load.max_model_len
    if max_len and len(token_ids) >= max_len:
        raise InvalidRequestError(f"prompt: {len(token_ids)} tokens exceeds the context limit of {max_len - 1}")
    if vocab and (min(token_ids) < 0 or max(token_ids) >= vocab):  # C-speed check; find the culprit on failure
        bad = next(t for t in token_ids if not 0 <= t < vocab)
        raise InvalidRequestError(f"token_ids: {bad} is outside the vocabulary [0, {vocab})")
