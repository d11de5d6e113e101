"""Proto <-> domain conversions used by the servicers (the only place they happen)."""

from __future__ import annotations

import math
import socket

from pdserve.engine import structured_outputs
from pdserve.engine.layout import LayoutFingerprint
from pdserve.engine.sampling_params import MAX_TOKEN_LIST, SamplingParams
from pdserve.engine.stats import LoadStats
from pdserve.engine.structured_outputs import StructuredOutputsParams
from pdserve.protos import pdserve_pb2 as pb

DEFAULT_MAX_TOKENS = 16
MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256
MAX_STOP_TOKEN_IDS = 256
_FLOATS = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_p": 0.0}  # unset


def check_sampling_sizes(msg: pb.SamplingParams) -> None:
    """The repeated fields' limits (cheap: lengths only); raises ValueError naming the field and its limit."""
    if len(msg.stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(msg.stop)}")
    for s in msg.stop:
        if len(s) > MAX_STOP_LEN:
            raise ValueError(f"stop: stop strings must be at most {MAX_STOP_LEN} characters")
    if len(msg.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, got {len(msg.stop_token_ids)}")
    for name in ("logit_bias", "allowed_token_ids"):
        if len(getattr(msg, name)) > MAX_TOKEN_LIST:
            raise ValueError(f"{name}: at most {MAX_TOKEN_LIST} token ids, got {len(getattr(msg, name))}")
    so = msg.structured_outputs
    kind = so.WhichOneof("kind") if msg.HasField("structured_outputs") else None
    if kind == "choice" and len(so.choice.values) > structured_outputs.MAX_CHOICES:
        raise ValueError(f"structured_outputs.choice: at most {structured_outputs.MAX_CHOICES} choices")
    if kind in ("json", "regex", "grammar") and len(getattr(so, kind)) > structured_outputs.MAX_SPEC_CHARS:
        raise ValueError(f"structured_outputs.{kind}: at most {structured_outputs.MAX_SPEC_CHARS} characters")


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Build validated SamplingParams; raises ValueError naming the bad field."""
    max_tokens = msg.max_tokens if msg.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    temperature = msg.temperature if msg.HasField("temperature") else 1.0
    top_p = msg.top_p if msg.HasField("top_p") else 1.0
    if math.isnan(temperature):
        raise ValueError("temperature: must be a number >= 0, got nan")
    check_sampling_sizes(msg)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=msg.top_k if msg.HasField("top_k") else 0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        **{name: float(getattr(msg, name)) if msg.HasField(name) else default for name, default in _FLOATS.items()},
        min_tokens=msg.min_tokens if msg.HasField("min_tokens") else 0,
        structured_outputs=structured_from_proto(msg.structured_outputs) if msg.HasField("structured_outputs")
        else None,
        logit_bias=dict(msg.logit_bias) or None,
        allowed_token_ids=tuple(msg.allowed_token_ids) or None,
        include_stop_str_in_output=msg.include_stop_str_in_output,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
    )


def structured_from_proto(msg: pb.StructuredOutputs) -> StructuredOutputsParams:
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured_outputs: set one of json, json_object, regex, choice, grammar")
    value = getattr(msg, kind)
    return StructuredOutputsParams(**{kind: list(value.values) if kind == "choice" else value})


def structured_to_proto(params: StructuredOutputsParams) -> pb.StructuredOutputs:
    kind = params.kind
    if kind == "choice":
        return pb.StructuredOutputs(choice=pb.Choices(values=params.choice))
    return pb.StructuredOutputs(**{kind: getattr(params, kind)})


def sampling_to_proto(params: SamplingParams, num_sent: int = 0) -> pb.SamplingParams:
    """Validated SamplingParams as the proto forwarded to workers, every default made explicit, so that
    ``sampling_from_proto(sampling_to_proto(p)) == p``. ``num_sent``: tokens already streamed (a migration), taken
    off ``max_tokens`` and ``min_tokens``, which a worker counts over its own output."""
    msg = pb.SamplingParams(
        max_tokens=params.max_tokens - num_sent,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        stop=params.stop,
        stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos,
        include_stop_str_in_output=params.include_stop_str_in_output,
        min_tokens=max(0, params.min_tokens - num_sent),
        **{name: getattr(params, name) for name in _FLOATS},
    )
    if params.structured_outputs is not None:
        msg.structured_outputs.CopyFrom(structured_to_proto(params.structured_outputs))
    if params.logit_bias:
        msg.logit_bias.update(dict(params.logit_bias))
    if params.allowed_token_ids:
        msg.allowed_token_ids.extend(params.allowed_token_ids)
    if params.prompt_logprobs is not None and not num_sent:  # a migration: the client has them already
        msg.prompt_logprobs = params.prompt_logprobs
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def prompt_logprobs_to_proto(entries) -> list[pb.PromptLogprob]:
    """engine.prompt_logprobs entries (duck-typed: this module stays torch-free) -> their messages."""
    return [pb.PromptLogprob(token_id=e.token_id, logprob=e.logprob, rank=e.rank, top_ids=e.top_ids,
                             top_logprobs=e.top_logprobs) for e in entries]


def set_stop_reason(msg, reason: int | str | None) -> None:
    """vLLM's ``stop_reason`` (the stop string or stop token id that ended a request; None: anything else) onto a
    ``DecodeChunk`` or ``GenerateResponse``."""
    if isinstance(reason, str):
        msg.stop_string = reason
    elif isinstance(reason, int):
        msg.stop_token_id = reason


def stop_reason_of(msg) -> int | str | None:
    """``set_stop_reason``'s inverse (stop strings are never empty)."""
    return msg.stop_string or (msg.stop_token_id if msg.HasField("stop_token_id") else None)


def fingerprint_to_proto(fp: LayoutFingerprint) -> pb.LayoutFingerprint:
    return pb.LayoutFingerprint(
        model_id=fp.model_id, revision=fp.revision, num_layers=fp.num_layers, num_kv_heads=fp.num_kv_heads,
        head_dim=fp.head_dim, block_size=fp.block_size, dtype=fp.dtype, hash_seed=fp.hash_seed,
    )


def fingerprint_from_proto(msg: pb.LayoutFingerprint) -> LayoutFingerprint:
    """Raises ValueError naming the field when the message cannot describe a KV layout."""
    for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
        if getattr(msg, name) <= 0:
            raise ValueError(f"fingerprint: {name} must be > 0, got {getattr(msg, name)}")
    if not msg.dtype:
        raise ValueError("fingerprint: dtype is empty")
    return LayoutFingerprint(
        model_id=msg.model_id, revision=msg.revision, num_layers=msg.num_layers, num_kv_heads=msg.num_kv_heads,
        head_dim=msg.head_dim, block_size=msg.block_size, dtype=msg.dtype, hash_seed=msg.hash_seed,
    )


def logprob_to_proto(token_id: int, lp: dict[int, float] | None) -> pb.TokenLogprob | None:
    if lp is None:
        return None
    return pb.TokenLogprob(token_id=token_id, logprob=lp.get(token_id, 0.0), top=dict(lp))


def logprob_from_proto(msg: pb.TokenLogprob) -> dict[int, float]:
    out = {msg.token_id: msg.logprob}
    out.update(dict(msg.top))
    return out


def kv_batch_to_proto(worker_id: str, seq: int, is_snapshot: bool, payload: list) -> pb.KVEventBatch:
    """``payload`` is a list of block hashes for a snapshot, else a list of engine KVEvents."""
    batch = pb.KVEventBatch(worker_id=worker_id, snapshot=is_snapshot, seq=seq)
    if is_snapshot:
        batch.stored.extend(payload)
        return batch
    for ev in payload:
        if ev.kind == "stored":
            batch.stored.extend(ev.block_hashes)
        elif ev.kind == "evicted":
            batch.evicted.extend(ev.block_hashes)
        elif ev.kind == "cleared":
            batch.cleared = True
            batch.stored[:] = []
            batch.evicted[:] = []
    return batch


async def kv_event_stream(loop, worker_id: str):
    """The KVEvents RPC body shared by prefill and decode servicers."""
    seq = 0
    async for is_snapshot, payload in loop.kv_events():
        seq += 1
        yield kv_batch_to_proto(worker_id, seq, is_snapshot, payload)


def load_to_proto(stats: LoadStats, fingerprint: LayoutFingerprint | None = None, **fields) -> pb.WorkerLoad:
    if fingerprint is not None:
        fields["fingerprint"] = fingerprint_to_proto(fingerprint)
    return pb.WorkerLoad(
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        num_queued_tokens=stats.num_queued_tokens,
        num_free_blocks=stats.num_free_blocks,
        num_total_blocks=stats.num_total_blocks,
        num_reserved=stats.num_reserved,
        step_s=stats.step_s,
        num_steps=stats.num_steps,
        num_preemptions=stats.num_preemptions,
        prefix_hit_tokens=stats.prefix_hit_tokens,
        prompt_tokens=stats.prompt_tokens,
        host=socket.gethostname(),
        **fields,
    )


def integrity(engine) -> tuple[str, int]:
    """Run on the engine thread: (error or "", number of blocks held by live requests)."""
    try:
        engine.check_integrity()
    except AssertionError as e:
        return str(e) or "integrity check failed", 0
    return "", len(engine.live_block_refs())
