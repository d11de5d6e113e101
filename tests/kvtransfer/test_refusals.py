"""A hostile or buggy peer speaking raw frames never gets bytes into the cache outside its reservation."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest
import torch

from pdserve.kvtransfer import TransferError, make_receiver, make_sender, wire
from pdserve.kvtransfer import control as ctl
from tests.kvtransfer.helpers import (
    BLOCKS,
    DST,
    SRC,
    KVCache,
    assert_landed,
    cfg,
    filled_cache,
    fingerprint,
    push_all,
    spec,
)

BLOCK_SHAPE = spec().layer_shape()[1:]
BLOCK_BYTES = fingerprint().block_bytes()


class RawPeer:
    """Speaks the wire protocol by hand."""

    def __init__(self, endpoint: str, handshake: bool = True, secret: str | None = None):
        host, port = ctl.parse_endpoint(endpoint, "tcp")
        self.sock = socket.create_connection((host, port), timeout=5)
        if handshake:
            ctl.client_handshake(self.sock, fingerprint(), secret, endpoint)

    def frame(self, ftype: int, tid: str, layer: int = 0, blocks=(), payload: bytes = b"",
              payload_len: int | None = None) -> None:
        plen = len(payload) if payload_len is None else payload_len
        self.sock.sendall(wire.encode_header(wire.Frame(ftype, tid, layer, list(blocks), plen)) + payload)

    def data(self, tid: str, layer: int, blocks, value: float = 7.0) -> None:
        payload = torch.full((len(blocks), *BLOCK_SHAPE), value).numpy().tobytes()
        self.frame(wire.DATA, tid, layer, blocks, payload)

    def done(self, tid: str, frames: int, nbytes: int) -> dict:
        ctl.send_json(self.sock, wire.DONE, {"frames": frames, "bytes": nbytes}, tid)
        return ctl.expect_json(self.sock, wire.ACK)

    def dropped(self, timeout: float = 3.0) -> bool:
        """Whether the receiver closed the connection."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver():
    cache = KVCache(spec())
    r = make_receiver(cfg("tcp", timeout_s=3.0), cache.layers, fingerprint())
    ep = r.start()
    yield r, ep, cache
    r.close()


def serves_a_good_sender(r, ep) -> bool:
    cache = filled_cache(5)
    s = make_sender(cfg("tcp"), cache.layers, fingerprint())
    try:
        r.expect("good", DST)
        h = s.open("good", ep, DST)
        push_all(h)
        h.finish(5)
        r.wait("good", 5)
        return True
    finally:
        s.close()


@pytest.mark.timeout(30)
def test_frames_outside_a_reservation_are_drained_and_fail_only_their_transfer(receiver):
    r, ep, cache = receiver
    r.expect("t", [10, 11])
    r.expect("t2", [20])
    r.expect("t3", [21])
    r.expect("ok", [30, 31])
    p = RawPeer(ep)
    try:
        p.data("unknown", 0, [10])  # no such transfer
        p.data("t", 0, [11, 12])  # 12 was not reserved
        p.data("t2", 4, [20])  # layer out of range
        p.data("t3", -1, [21])  # negative layer
        p.data("ok", 1, [30, 31])  # the stream is still in sync after the drains
        assert p.done("unknown", 1, BLOCK_BYTES) == {"ok": False, "error": "unknown or cancelled transfer"}
        assert "outside the reservation" in p.done("t", 1, 2 * BLOCK_BYTES)["error"]
        assert "layer 4 out of range" in p.done("t2", 1, BLOCK_BYTES)["error"]
        assert "layer -1 out of range" in p.done("t3", 1, BLOCK_BYTES)["error"]
        assert p.done("ok", 1, 2 * BLOCK_BYTES)["ok"] is True
        for tid in ("t", "t2", "t3"):
            with pytest.raises(TransferError):
                r.wait(tid, 1)
        r.wait("ok", 1)
        written = {(1, 30), (1, 31)}
        for layer in range(len(cache.layers)):
            for b in range(BLOCKS):
                block = cache.layers[layer][b]
                assert bool((block == 7.0).all()) if (layer, b) in written else not block.any(), (layer, b)
    finally:
        p.close()


@pytest.mark.timeout(30)
def test_replayed_frames_of_a_finished_transfer_are_never_written(receiver):
    """Once a transfer completed, its blocks belong to the decoding sequence: a replay must not touch them."""
    r, ep, cache = receiver
    r.expect("t", [30, 31])
    p = RawPeer(ep)
    try:
        p.data("t", 1, [30, 31])
        assert p.done("t", 1, 2 * BLOCK_BYTES)["ok"] is True
        r.wait("t", 1)
        assert bool((cache.layers[1][30] == 7.0).all())
        p.data("t", 1, [30, 31], value=-1.0)  # the same frame again, other bytes
        p.data("t", 0, [30], value=-1.0)
        assert p.done("t", 2, 3 * BLOCK_BYTES) == {"ok": False, "error": "unknown or cancelled transfer"}
        assert bool((cache.layers[1][30:32] == 7.0).all()) and not cache.layers[0][30].any()
    finally:
        p.close()


@pytest.mark.timeout(30)
def test_a_frame_count_that_does_not_match_fails_the_transfer(receiver):
    r, ep, cache = receiver
    r.expect("t", [10])
    p = RawPeer(ep)
    try:
        p.data("t", 0, [10])
        assert "2 frames" in p.done("t", 2, 2 * BLOCK_BYTES)["error"]
        with pytest.raises(TransferError, match="arrived"):
            r.wait("t", 1)
    finally:
        p.close()


VIOLATIONS = {
    "payload size": lambda p: p.frame(wire.DATA, "t", 0, [10], b"\0" * 10),
    "no blocks": lambda p: p.frame(wire.DATA, "t", 0, [], b""),
    "too many blocks": lambda p: p.frame(wire.DATA, "t", 0, [10] * (BLOCKS + 1),
                                         payload_len=(BLOCKS + 1) * BLOCK_BYTES),
    "notify without shm": lambda p: p.frame(wire.NOTIFY, "t", 0, [10]),
    "ack from a sender": lambda p: p.frame(wire.ACK, "t"),
    "garbage": lambda p: p.sock.sendall(b"\xde\xad\xbe\xef" * 64),
    "oversized control payload": lambda p: p.sock.sendall(
        wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.DONE, 0, 1, 0, 0, 0, 1 << 40, 0) + b"t"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("violation", list(VIOLATIONS))
def test_protocol_violations_drop_the_connection_and_fail_its_transfers(receiver, violation):
    r, ep, cache = receiver
    r.expect("t", [10])
    p = RawPeer(ep)
    try:
        ctl.send_json(p.sock, wire.BEGIN, {"blocks": 1}, "t")  # binds "t" to this connection
        VIOLATIONS[violation](p)
        assert p.dropped()
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="connection lost"):
            r.wait("t", 3)
        assert time.monotonic() - t0 < 1
        assert not any(layer.any() for layer in cache.layers)
        assert serves_a_good_sender(r, ep)
    finally:
        p.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("secret", [None, "s3cret"])
def test_frames_before_a_completed_handshake_are_never_written(secret):
    cache = KVCache(spec())
    r = make_receiver(cfg("tcp", secret=secret, timeout_s=3.0), cache.layers, fingerprint())
    ep = r.start()
    try:
        r.expect("t", [10])
        p = RawPeer(ep, handshake=False)  # skips HELLO and goes straight to KV
        ctl.expect_json(p.sock, wire.CHALLENGE)
        with contextlib.suppress(OSError):
            p.data("t", 0, [10])
        assert p.dropped()
        p.close()
        if secret:  # a HELLO with a forged proof, pipelined with KV
            p = RawPeer(ep, handshake=False)
            ctl.expect_json(p.sock, wire.CHALLENGE)
            fp = fingerprint().to_json()
            ctl.send_json(p.sock, wire.HELLO, {"fingerprint": fp, "proof": "0" * 64, "nonce2": "00" * 16})
            with contextlib.suppress(OSError):
                p.data("t", 0, [10])
            with pytest.raises((TransferError, ConnectionError)):
                ctl.expect_json(p.sock, wire.HELLO_OK)
            p.close()
        assert not cache.layers[0].any()
        src = filled_cache(1)
        s = make_sender(cfg("tcp", secret=secret), src.layers, fingerprint())
        h = s.open("t", ep, [10])
        h.push_layer(0, [SRC[0]], [10])
        h.finish(5)
        r.wait("t", 5)
        assert torch.equal(cache.layers[0][10], src.layers[0][SRC[0]])
        s.close()
    finally:
        r.close()


@pytest.mark.timeout(30)
def test_sender_validates_pushes_before_queueing():
    src = filled_cache(1)
    s = make_sender(cfg("tcp"), src.layers, fingerprint())
    cache = KVCache(spec())
    r = make_receiver(cfg("tcp"), cache.layers, fingerprint())
    try:
        ep = r.start()
        r.expect("t", DST)
        h = s.open("t", ep, DST)
        for layer, src_ids, dst_ids in [(9, SRC, DST), (0, SRC[:2], DST[:3]), (0, [BLOCKS], [DST[0]]),
                                        (0, SRC[:2], [DST[0], DST[0]]), (0, [1], [99])]:
            with pytest.raises(ValueError):
                h.push_layer(layer, src_ids, dst_ids)
        push_all(h)
        h.finish(5)
        r.wait("t", 5)
        assert_landed(cache.layers, src.layers)
    finally:
        s.close()
        r.close()
