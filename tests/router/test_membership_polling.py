"""One hung worker does not slow the router's polling of the others.

Before: every poll cycle awaited all workers' GetLoad together, so a SIGSTOPped worker (its call runs to the
poll timeout, 2 s) stretched the cycle of every other worker from 0.5 s to about 2.5 s: stale load figures
for routing, and slower health changes for everyone.
"""

from __future__ import annotations

import asyncio

from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.membership import Membership


class FakeStub:
    def __init__(self, address: str, hang: bool):
        self.address, self.hang, self.calls = address, hang, 0

    async def GetLoad(self, request, timeout=None, metadata=None):
        self.calls += 1
        if self.hang:
            await asyncio.sleep(3600)  # a stopped process: the call only ends when cancelled
        return pb.WorkerLoad(address=self.address, role="decode", num_total_blocks=10, num_free_blocks=10)


def test_a_hung_workers_poll_does_not_hold_up_the_others():
    async def main() -> tuple[int, int, bool, bool]:
        m = Membership(poll_interval_s=0.05)
        fast, hung = m.add("127.0.0.1:1", "decode"), m.add("127.0.0.1:2", "decode")
        fast.stub, hung.stub = FakeStub(fast.address, False), FakeStub(hung.address, True)
        m.start()
        try:
            for _ in range(200):  # up to ~10 s on a slow box; the fast worker needs ~4 cycles of 0.1 s
                await asyncio.sleep(0.05)
                if fast.stub.calls >= 4:
                    break
            return fast.stub.calls, hung.stub.calls, fast.healthy, hung.healthy
        finally:
            await m.close()

    fast_calls, hung_calls, fast_healthy, hung_healthy = asyncio.run(main())
    assert fast_calls >= 4 and fast_healthy, "the fast worker is polled every cycle while the other hangs"
    assert hung_calls == 1 and not hung_healthy, "one poll outstanding per worker; no second call piles up"
