"""``pdserve generate``: stream a completion from a running cluster. Never imports torch."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TextIO

from pdserve.engine import env

DEFAULT_ROUTER_PORT = 50051
DEFAULT_ROUTER = f"127.0.0.1:{DEFAULT_ROUTER_PORT}"


@dataclass(slots=True)
class Sampling:
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Completion:
    text: str
    request_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    ttft_s: float  # client-side: request sent -> first text received
    total_s: float
    prefill_worker: str
    decode_worker: str
    model: str = ""  # what served it (a base model or an adapter, after any route)
    cached: bool = False  # answered from the router's response cache

    def summary(self) -> str:
        workers = (f"prefill {self.prefill_worker} -> decode {self.decode_worker}" if self.prefill_worker
                   else f"decode {self.decode_worker} (prefilled locally)")
        return (f"[{self.completion_tokens} tokens, finish {self.finish_reason or '?'}, "
                f"TTFT {self.ttft_s * 1e3:.0f} ms, total {self.total_s:.2f} s, "
                f"prompt {self.prompt_tokens} tokens ({self.cached_prompt_tokens} cached), {workers}"
                + (f", model {self.model}" if self.model else "") + (", from the response cache]" if self.cached else "]"))


_INT_FLAGS = (("--max-tokens", "max_tokens", 31), ("--top-k", "top_k", 31), ("--seed", "seed", 63))


def check_request(prompt: str, sampling: Sampling) -> None:
    """ValueError naming the flag for what protobuf would refuse with a bare "Value out of range" or a
    UnicodeEncodeError: an integer past its field's width, text that is not UTF-8 (argv bytes)."""
    for flag, name, bits in _INT_FLAGS:
        v = getattr(sampling, name)
        if v is not None and not -(1 << bits) <= v < (1 << bits):
            raise ValueError(f"{flag}: {v} is out of range ({bits + 1}-bit integer)")
    for flag, text in [("prompt", prompt), *(("--stop", t) for t in sampling.stop)]:
        try:
            text.encode()
        except UnicodeEncodeError:
            raise ValueError(f"{flag}: {text!r} is not valid UTF-8") from None


async def generate(address: str, prompt: str, sampling: Sampling, out: TextIO | None = None, tls=None,
                   api_key: str = "", timeout_s: float = 120.0, model: str = "", session_id: str = "") -> Completion:
    """Send one request; write each text piece to ``out`` as it arrives (None: stay quiet)."""
    from pdserve.protos import pdserve_pb2 as pb
    from pdserve.protos import pdserve_pb2_grpc as pb_grpc
    from pdserve.serving.rpc import bearer, channel

    check_request(prompt, sampling)
    metadata = bearer(api_key)
    params = pb.SamplingParams(max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                               stop=list(sampling.stop))
    if sampling.top_p is not None:
        params.top_p = sampling.top_p
    if sampling.top_k is not None:
        params.top_k = sampling.top_k
    if sampling.seed is not None:
        params.seed = sampling.seed
    pieces: list[str] = []
    t0 = time.perf_counter()
    ttft = None
    last = None
    async with channel(address, tls) as ch:
        stub = pb_grpc.GenerationStub(ch)
        req = pb.GenerateRequest(prompt=prompt, sampling=params, model=model, session_id=session_id)
        async for resp in stub.Generate(req, timeout=timeout_s, metadata=metadata):
            if ttft is None and (resp.text or resp.token_ids):
                ttft = time.perf_counter() - t0
            pieces.append(resp.text)
            if out is not None and resp.text:
                out.write(resp.text)
                out.flush()
            last = resp
    total = time.perf_counter() - t0
    if last is None:
        raise ConnectionError(f"router {address} closed the stream without a response")
    return Completion(
        text="".join(pieces), request_id=last.request_id, finish_reason=last.finish_reason,
        prompt_tokens=last.usage.prompt_tokens, completion_tokens=last.usage.completion_tokens,
        cached_prompt_tokens=last.usage.cached_prompt_tokens, ttft_s=total if ttft is None else ttft, total_s=total,
        prefill_worker=last.prefill_worker, decode_worker=last.decode_worker, model=last.model, cached=last.cached,
    )


def run_and_print(address: str, prompt: str, sampling: Sampling, as_json: bool, tls=None, api_key: str = "",
                  prog: str = "pdserve generate", out: TextIO | None = None, model: str = "",
                  session_id: str = "") -> int:
    """Stream the text then a one-line summary on stderr, or (``as_json``) print one JSON object.
    An RPC error prints one line and returns 1."""
    import grpc

    out = out or sys.stdout
    try:
        done = asyncio.run(generate(address, prompt, sampling, None if as_json else out, tls, api_key,
                                    model=model, session_id=session_id))
    except grpc.aio.AioRpcError as e:
        if as_json:
            print(json.dumps({"error": e.code().name, "details": e.details()}), file=out)
        print(f"{prog}: {e.code().name} from {address}: {e.details()}", file=sys.stderr)
        return 1
    except (ConnectionError, ValueError) as e:  # --json: still one JSON object
        code, rc, line = ("UNAVAILABLE", 1, f"{prog}: {e}") if isinstance(e, ConnectionError) else \
            ("INVALID_ARGUMENT", 2, f"{prog}: error: {e}")
        if as_json:
            print(json.dumps({"error": code, "details": str(e)}), file=out)
        print(line, file=sys.stderr)
        return rc
    if as_json:
        print(json.dumps(asdict(done)), file=out, flush=True)
    else:
        out.write("\n")
        out.flush()
        print(done.summary(), file=sys.stderr, flush=True)
    return 0


def sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (unset: 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (unset: off)")
    p.add_argument("--seed", type=int, default=None, help="per-request seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears; not included in the output (repeatable)")


def api_key(a: argparse.Namespace) -> str:
    return a.api_key or env.api_key()


def sampling_from(a: argparse.Namespace) -> Sampling:
    return Sampling(a.max_tokens, a.temperature, a.top_p, a.top_k, a.seed, list(a.stop))


def add_generate_parser(sub, tls_args) -> argparse.ArgumentParser:
    g = sub.add_parser("generate", help="stream a completion from a running cluster",
                       description="Stream the text as it arrives, then a one-line summary on stderr.")
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--router", default=DEFAULT_ROUTER, metavar="HOST:PORT", help="router address (pdserve up listens on port 50051)")
    g.add_argument("--model", default="", help="a base model, adapter or route the router serves (empty: its default)")
    g.add_argument("--session-id", default="", help="session key: sticky routes and session affinity")
    sampling_args(g)
    g.add_argument("--api-key", default="", help="API key sent as 'authorization: Bearer KEY' "
                   "(default: $PDSERVE_API_KEY)")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, usage, timings, workers) only")
    tls_args(g)
    return g
