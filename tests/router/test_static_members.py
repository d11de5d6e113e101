"""A worker from the router's static lists stays a member for good, even when it also self-registers.

Before: its heartbeats made it a registered member, so its SIGTERM goodbye (or a missed heartbeat while it
hung) removed it from the router for good; restarted on the same address without --router, it never came
back until the router itself restarted.
"""

from __future__ import annotations

import asyncio

from pdserve.router.membership import Membership

STATIC, DYNAMIC = "127.0.0.1:1", "127.0.0.1:2"


def _run(body) -> None:
    async def main() -> None:
        m = Membership()
        try:
            await body(m)
        finally:
            await m.close()

    asyncio.run(main())


def test_a_static_worker_that_also_registers_survives_its_goodbye():
    async def body(m: Membership) -> None:
        m.add(STATIC, "decode", static=True)
        m.register(STATIC, "decode", 5.0)
        m.workers[STATIC].healthy = True
        await m.leave(STATIC)
        assert STATIC in m.workers and not m.workers[STATIC].available

    _run(body)


def test_a_static_worker_whose_heartbeats_stop_is_not_expired():
    async def body(m: Membership) -> None:
        m.add(STATIC, "prefill", static=True)
        m.register(STATIC, "prefill", 1.0)
        m.register(DYNAMIC, "prefill", 1.0)
        for w in m.workers.values():
            w.heartbeat -= 100.0  # both went silent long ago
        await m.expire()
        assert STATIC in m.workers and DYNAMIC not in m.workers

    _run(body)


def test_a_registered_worker_still_leaves_at_once():
    async def body(m: Membership) -> None:
        m.register(DYNAMIC, "decode", 5.0)
        await m.leave(DYNAMIC)
        assert DYNAMIC not in m.workers

    _run(body)


def test_a_static_listing_after_registration_makes_it_static():
    async def body(m: Membership) -> None:
        m.register(STATIC, "decode", 5.0)
        assert m.add(STATIC, "decode", static=True).static
        await m.leave(STATIC)
        assert STATIC in m.workers

    _run(body)
