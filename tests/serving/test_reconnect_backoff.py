"""The router dials a worker back soon after it returns on the same address.

gRPC's default reconnect backoff grows to 120 s; a statically listed worker restarted after a few minutes down
stayed unhealthy in the router (Admin.ListWorkers: the old process's load, draining) for over a minute after
it was serving again. Every channel the router and workers open caps the backoff.
"""

from __future__ import annotations

import asyncio

import grpc

from pdserve.router.membership import Membership
from pdserve.serving import rpc


def _captured_options(monkeypatch) -> list[dict]:
    seen: list[dict] = []
    real = grpc.aio.insecure_channel

    def spy(target, options=None, *args, **kwargs):
        seen.append(dict(options or []))
        return real(target, options, *args, **kwargs)

    monkeypatch.setattr(grpc.aio, "insecure_channel", spy)
    return seen


def test_a_routers_worker_channel_caps_its_reconnect_backoff(monkeypatch):
    seen = _captured_options(monkeypatch)

    async def add() -> None:
        membership = Membership()
        membership.add("127.0.0.1:1", "decode")
        await membership.close()

    asyncio.run(add())
    (options,) = seen
    assert options["grpc.max_reconnect_backoff_ms"] <= 5_000
    assert options["grpc.initial_reconnect_backoff_ms"] <= options["grpc.max_reconnect_backoff_ms"]


def test_tool_and_heartbeat_channels_cap_it_too(monkeypatch):
    seen = _captured_options(monkeypatch)

    async def open_one() -> None:
        await rpc.channel("127.0.0.1:1").close()

    asyncio.run(open_one())
    assert seen[0]["grpc.max_reconnect_backoff_ms"] == rpc.MAX_RECONNECT_BACKOFF_MS <= 5_000
