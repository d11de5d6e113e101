"""Issue 15, holes 3 and 7, from the attacker's side, through the public API and raw sockets only.

- Relay: the attacker gets a prefill worker (a real sender holding the cluster secret) to dial the
  attacker's endpoint, splices that onto its own connection to the real decode receiver (forwarding the
  receiver's challenge one way and the worker's proof the other) and hopes for HELLO_OK and its internals.
- Flood: 300 idle connections on the KV port, from one source or from many.
- Slow-loris: a handshake that trickles a byte at a time, or never speaks.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time

import pytest

from pdserve.kvtransfer import TransferError, make_receiver, make_sender, wire
from pdserve.kvtransfer import control as ctl
from tests.kvtransfer.helpers import (
    DST,
    KVCache,
    assert_landed,
    cfg,
    filled_cache,
    fingerprint,
    push_all,
    spec,
)

SECRET = "cluster-s3cret"
NUM_FLOOD = 300
FLOOD_BOUND_S = 2.0  # a real transfer completes within this, flood or not
CUT_BOUND_S = 2.0  # an unauthenticated handshake is cut within this


# ---- relay ------------------------------------------------------------------------------------------
class TcpSplice:
    """The attacker's tcp endpoint (for the tcp and nccl backends, whose control plane is tcp): whoever
    dials it is spliced onto a fresh connection to ``target``."""

    def __init__(self, target: str):
        self.scheme = target.partition("://")[0]
        self.target = ctl.parse_endpoint(target, self.scheme)
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"{self.scheme}://127.0.0.1:{self.ls.getsockname()[1]}"
        self.socks: list[socket.socket] = []

    def pair(self, timeout: float = 10.0):
        self.ls.settimeout(timeout)
        victim, _ = self.ls.accept()
        upstream = socket.create_connection(self.target, timeout=timeout)
        for s in (victim, upstream):
            s.settimeout(timeout)
        self.socks += [victim, upstream]
        return victim, upstream

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.ls.close()


class UcxSplice:
    """The same over UCX: a ucxx listener for the victim, a ucxx endpoint to the receiver."""

    scheme = "ucx"

    def __init__(self, target: str):
        import asyncio

        import ucxx

        from pdserve.kvtransfer.ucx import UcxStream, ucx_loop

        self.loop, self.stream_cls, self.asyncio = ucx_loop(), UcxStream, asyncio
        self.target = ctl.parse_endpoint(target, self.scheme)
        self.victims: asyncio.Queue | None = None
        self.streams: list = []

        async def make():
            self.victims, self.done = asyncio.Queue(), asyncio.Event()

            async def on_connect(ep) -> None:
                await self.victims.put(ep)
                await self.done.wait()  # keeps the endpoint alive until close

            return ucxx.create_listener(on_connect)

        self.listener = asyncio.run_coroutine_threadsafe(make(), self.loop).result(10)
        self.endpoint = f"ucx://127.0.0.1:{self.listener.port}"

    def pair(self, timeout: float = 10.0):
        import ucxx

        run = self.asyncio.run_coroutine_threadsafe
        victim_ep = run(self.asyncio.wait_for(self.victims.get(), timeout), self.loop).result(timeout + 1)
        up_ep = run(ucxx.create_endpoint(*self.target), self.loop).result(timeout)
        pair = self.stream_cls(victim_ep, self.loop, timeout), self.stream_cls(up_ep, self.loop, timeout)
        self.streams += pair
        return pair

    def close(self) -> None:
        for s in self.streams:
            s.close()
        self.loop.call_soon_threadsafe(self.done.set)
        time.sleep(0.1)
        self.listener.close()


class Relay:
    """Plays the receiver's challenge to the victim and the victim's HELLO (optionally rewritten) to the
    receiver, and records every frame the receiver answers with."""

    def __init__(self, splice, rewrite=None):
        self.splice, self.rewrite = splice, rewrite
        self.receiver_said: list[tuple[int, dict]] = []
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            victim, upstream = self.splice.pair()
            challenge = ctl.expect_json(upstream, wire.CHALLENGE)
            ctl.send_json(victim, wire.CHALLENGE, challenge)
            hello = ctl.expect_json(victim, wire.HELLO)  # the victim's proof, made for our challenge
            ctl.send_json(upstream, wire.HELLO, self.rewrite(hello) if self.rewrite else hello)
            frame = wire.read_frame(upstream)
            body = ctl.read_json(upstream, frame)
            self.receiver_said.append((frame.type, body))
            ctl.send_json(victim, frame.type, body)  # let the victim see how it went
        except Exception as e:  # noqa: BLE001 - reported through the assertions
            self.error = e


def _shared_receiver(backend: str):
    shm = backend == "tcp"
    cache = KVCache(spec(), shared=shm)
    r = make_receiver(cfg(backend, shm, secret=SECRET), cache.layers, fingerprint(), cache.shm_path)
    return r, cache, shm


@pytest.mark.timeout(90)
@pytest.mark.parametrize("rewrite", [False, True], ids=["forward", "rewrite-endpoint"])
@pytest.mark.parametrize("backend", ["tcp", "nccl", "ucx"])
def test_a_relayed_handshake_is_refused_and_leaks_nothing(backend, rewrite):
    r, cache, shm = _shared_receiver(backend)
    real = r.start()
    splice = (UcxSplice if backend == "ucx" else TcpSplice)(real)
    # "rewrite-endpoint": the attacker also claims, in the forwarded HELLO, that it was the real one dialed
    relay = Relay(splice, (lambda hello: {**hello, "endpoint": real}) if rewrite else None)
    src = filled_cache(1)
    s = make_sender(cfg(backend, shm, secret=SECRET), src.layers, fingerprint())
    try:
        r.expect("t", DST)
        with pytest.raises(TransferError):  # the prefill worker, made to dial the attacker, gets nowhere
            h = s.open("t", splice.endpoint, DST)
            push_all(h)
            h.finish(5)
        relay.thread.join(10)
        assert relay.error is None, relay.error
        said = relay.receiver_said
        assert said and said[0][0] == wire.REFUSE, f"the receiver accepted a relayed proof: {said}"
        leaked = repr(said)
        for secret_thing in ("shm_path", "/dev/shm", "num_blocks", "store_port", "store_host", "link"):
            assert secret_thing not in leaked, f"{secret_thing} leaked to the relay: {leaked}"
        assert cache.shm_path is None or cache.shm_path not in leaked
        assert not any(layer.any() for layer in cache.layers)
        # the same worker dialing the receiver itself is served (and on tcp, gets the shm path)
        h = s.open("t", real, DST)
        push_all(h)
        assert h.finish(10).path == ("shm" if shm else {"nccl": "gloo"}.get(backend, backend))
        r.wait("t", 10)
        assert_landed(cache.layers, src.layers)
    finally:
        s.close()
        splice.close()
        r.close()
        cache.close()


# ---- flood ------------------------------------------------------------------------------------------
def _flood(host: str, port: int, num: int, num_sources: int) -> list[socket.socket]:
    """``num`` idle connections from ``num_sources`` loopback addresses (127.0.0.2, .3, ...)."""
    socks = []
    for i in range(num):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((f"127.0.0.{2 + i % num_sources}", 0))
        s.settimeout(5)
        s.connect((host, port))
        socks.append(s)
    return socks


def _cut(sock: socket.socket) -> bool:
    """Whether the receiver has closed this connection (reads what it sent first, without blocking)."""
    while True:
        r, _, _ = select.select([sock], [], [], 0)
        if not r:
            return False
        try:
            if not sock.recv(1 << 16):
                return True
        except OSError:
            return True


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_sources", [1, 50], ids=["one-source", "fifty-sources"])
def test_an_idle_flood_does_not_lock_a_real_sender_out(num_sources):
    cache = KVCache(spec())
    r = make_receiver(cfg("tcp", secret=SECRET, timeout_s=30.0), cache.layers, fingerprint())
    ep = r.start()
    flood: list[socket.socket] = []
    src = filled_cache(1)
    s = make_sender(cfg("tcp", secret=SECRET, timeout_s=5.0), src.layers, fingerprint())
    try:
        flood = _flood(*ctl.parse_endpoint(ep, "tcp"), NUM_FLOOD, num_sources)
        time.sleep(0.5)  # the receiver has taken them all
        r.expect("t", DST)
        t0 = time.monotonic()
        h = s.open("t", ep, DST)
        push_all(h)
        h.finish(FLOOD_BOUND_S)
        r.wait("t", FLOOD_BOUND_S)
        elapsed = time.monotonic() - t0
        assert elapsed < FLOOD_BOUND_S, f"the real transfer took {elapsed:.2f} s under the flood"
        assert_landed(cache.layers, src.layers)
        held = sum(not _cut(f) for f in flood)
        assert held <= 128, f"{held} unauthenticated connections still held"  # the global pending budget
        time.sleep(CUT_BOUND_S)
        assert sum(not _cut(f) for f in flood) == 0, "idle connections outlived the handshake deadline"
    finally:
        for f in flood:
            f.close()
        s.close()
        r.close()


# ---- slow-loris -------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("trickle", [True, False], ids=["byte-at-a-time", "silent"])
def test_a_slow_handshake_is_cut_within_two_seconds(trickle):
    cache = KVCache(spec())
    r = make_receiver(cfg("tcp", secret=SECRET, timeout_s=30.0), cache.layers, fingerprint())
    ep = r.start()
    sock = socket.create_connection(ctl.parse_endpoint(ep, "tcp"), timeout=5)
    try:
        t0 = time.monotonic()
        ctl.expect_json(sock, wire.CHALLENGE)
        body = b'{"fingerprint": "' + b"x" * 1000 + b'"}'
        hello = wire.encode_header(wire.Frame(wire.HELLO, payload_len=len(body))) + body
        cut_at = None
        for i in range(len(hello)):
            if trickle:
                with contextlib.suppress(OSError):
                    sock.sendall(hello[i : i + 1])
            r_, _, _ = select.select([sock], [], [], 0.2)
            if r_ and _cut(sock):
                cut_at = time.monotonic() - t0
                break
            if time.monotonic() - t0 > 2 * CUT_BOUND_S + 1:
                break
        assert cut_at is not None and cut_at <= CUT_BOUND_S, f"handshake still open after {cut_at or '>5'} s"
        # and the receiver still serves a real sender
        src = filled_cache(1)
        s = make_sender(cfg("tcp", secret=SECRET), src.layers, fingerprint())
        r.expect("t", DST)
        h = s.open("t", ep, DST)
        push_all(h)
        h.finish(5)
        r.wait("t", 5)
        s.close()
    finally:
        sock.close()
        r.close()


@pytest.mark.timeout(60)
def test_ucx_handshakes_are_bounded_too():
    """ucx gets its connections from UCX, not the doorman: a silent endpoint is still cut within 2 s, and a
    flood of idle endpoints does not lock a real sender out."""
    import asyncio

    import ucxx

    from pdserve.kvtransfer.ucx import UcxStream, ucx_loop

    cache = KVCache(spec())
    r = make_receiver(cfg("ucx", secret=SECRET, timeout_s=30.0), cache.layers, fingerprint())
    ep = r.start()
    loop = ucx_loop()
    endpoints = []

    def dial() -> UcxStream:
        coro = ucxx.create_endpoint(*ctl.parse_endpoint(ep, "ucx"))
        endpoints.append(UcxStream(asyncio.run_coroutine_threadsafe(coro, loop).result(10), loop, 5.0))
        return endpoints[-1]

    src = filled_cache(1)
    s = make_sender(cfg("ucx", secret=SECRET, timeout_s=5.0), src.layers, fingerprint())
    try:
        silent = dial()
        t0 = time.monotonic()
        ctl.expect_json(silent, wire.CHALLENGE)
        with pytest.raises(ConnectionError):
            silent.readable(2 * CUT_BOUND_S)
        assert time.monotonic() - t0 <= CUT_BOUND_S
        for _ in range(150):
            dial()
        r.expect("t", DST)
        t0 = time.monotonic()
        h = s.open("t", ep, DST)
        push_all(h)
        h.finish(5)
        r.wait("t", 5)
        assert time.monotonic() - t0 < 2 * FLOOD_BOUND_S
        assert_landed(cache.layers, src.layers)
    finally:
        s.close()
        for e in endpoints:
            e.close()
        r.close()
