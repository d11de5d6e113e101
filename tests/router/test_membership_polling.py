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


class FailingStub:
    def __init__(self, code):
        self.code = code

    async def GetLoad(self, request, timeout=None, metadata=None):
        import grpc

        raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), "injected")


class FakeCall:
    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


def test_a_hung_worker_has_its_calls_cancelled_and_a_dead_one_does_not():
    """Polls that time out (a stopped worker: its connection stays up) cancel the Decode calls that depend on it,
    so the decode leg moves them (router.leg); a worker that refuses connections fails its calls by itself."""
    import grpc

    async def main():
        m = Membership(poll_interval_s=0.05, failure_threshold=2)
        hung, dead = m.add("127.0.0.1:1", "decode"), m.add("127.0.0.1:2", "prefill")
        hung.stub, dead.stub = FailingStub(grpc.StatusCode.DEADLINE_EXCEEDED), FailingStub(grpc.StatusCode.UNAVAILABLE)
        calls = {w.address: FakeCall() for w in (hung, dead)}
        for w in (hung, dead):
            w.healthy = True
            w.calls.add(calls[w.address])
        for _ in range(2):
            await m.poll(hung)
            await m.poll(dead)
        return hung, dead, calls

    hung, dead, calls = asyncio.run(main())
    assert not hung.healthy and hung.hung and calls[hung.address].cancelled
    assert not dead.healthy and not dead.hung and not calls[dead.address].cancelled
