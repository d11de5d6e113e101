"""Shared by the zero-trust tests: hand-made cluster tokens (the documented format, no import of the code under
test, so the tests run unchanged against an older checkout), API-key metadata, raw-call helpers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time

import grpc

from pdserve.protos import pdserve_pb2 as pb

SECRET = "zero-trust-test-secret"
KEYS = {"k-alice": "alice", "k-bob": "bob", "k-ops": "admin"}
PKG = "pdserve.v1"
START_S = 240.0


def method(service: str, name: str) -> str:
    return f"/{PKG}.{service}/{name}"


def token(method_: str, binding: str = "", principal: str = "tests", secret: str = SECRET,
          expiry_ms: int | None = None) -> tuple[tuple[str, str], ...]:
    """A cluster token, made by hand from the documented format (v1.<principal>.<expiry_ms>.<mac>)."""
    key = hmac.new(secret.encode(), b"pdserve/rpc/token/v1", hashlib.sha256).digest()
    exp = expiry_ms if expiry_ms is not None else int((time.time() + 30) * 1000)
    msg = f"v1|{method_}|{binding}|{principal}|{exp}".encode()
    mac = base64.urlsafe_b64encode(hmac.digest(key, msg, "sha256")).rstrip(b"=").decode()
    return (("pdserve-cluster-token", f"v1.{principal}.{exp}.{mac}"),)


def key(k: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {k}"),)


def run(coro, timeout: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def status_of(coro) -> grpc.StatusCode:
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def stream_status(call) -> tuple[grpc.StatusCode, list]:
    """Read a stream to its end: (status, messages)."""
    got = []
    try:
        while (m := await call.read()) is not grpc.aio.EOF:
            got.append(m)
    except grpc.aio.AioRpcError as e:
        return e.code(), got
    return grpc.StatusCode.OK, got


def greedy(n: int) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


PROMPT = [(7 * i + 3) % 200 + 10 for i in range(40)]
