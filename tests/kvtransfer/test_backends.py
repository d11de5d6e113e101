"""Every backend: bit-identical blocks across processes, refusals, dead peers, checksums, reservations."""

from __future__ import annotations

import time

import pytest
import torch

from kvtransfer import (
    ChecksumError,
    FingerprintMismatchError,
    TransferAuthError,
    TransferConfig,
    TransferError,
    make_receiver,
    make_sender,
)
from tests.kvtransfer.helpers import (
    BLOCKS,
    LAYERS,
    KVCache,
    filled_cache,
    fingerprint,
    kill,
    receiver_main,
    sender_main,
    spawn,
    spec,
)

BACKENDS = [
    pytest.param("tcp", True, "shm", id="tcp-shm"),
    pytest.param("tcp", False, "tcp", id="tcp-stream"),
    pytest.param("nccl", False, "gloo", id="nccl-gloo"),
    pytest.param("ucx", False, "ucx", id="ucx"),
]
SRC = [5, 6, 7, 20, 3, 40, 41, 2]  # non-contiguous, out of order
DST = [10, 11, 12, 33, 34, 50, 9, 60]


def cfg(backend, shm=True, **kw):
    return TransferConfig(backend=backend, allow_shm=shm, timeout_s=kw.pop("timeout_s", 5.0), **kw)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend,shm,path", BACKENDS)
def test_blocks_arrive_bit_identical_across_processes(backend, shm, path):
    c = cfg(backend, shm, checksum=True)
    proc, pipe = spawn(receiver_main, c, DST, shm, "t", 10.0)
    try:
        endpoint = pipe.recv()
        src = filled_cache(1)
        sender = make_sender(c, src.layers, fingerprint())
        h = sender.open("t", endpoint, DST)
        for layer in range(LAYERS):
            h.push_layer(layer, SRC, DST)
        stats = h.finish(10)
        assert stats.path == path and stats.num_bytes == LAYERS * len(SRC) * fingerprint().block_bytes()
        status, rx_path, layers = pipe.recv()
        assert status == "ok" and rx_path == path
        for layer in range(LAYERS):
            for s, d in zip(SRC, DST, strict=True):
                assert torch.equal(layers[layer][d], src.layers[layer][s]), f"layer {layer} block {d} differs"
            untouched = [b for b in range(BLOCKS) if b not in DST]
            assert not layers[layer][untouched].any(), "blocks outside the transfer were written"
        sender.close()
    finally:
        kill(proc)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["tcp", "nccl", "ucx"])
def test_bfloat16_roundtrip_in_process(backend):
    fp = fingerprint(dtype="bfloat16")
    rx_cache, src = KVCache(spec(torch.bfloat16)), filled_cache(2, torch.bfloat16)
    c = cfg(backend, False)
    r = make_receiver(c, rx_cache.layers, fp)
    s = make_sender(c, src.layers, fp)
    try:
        ep = r.start()
        for t in ("a", "b"):  # a reused connection carries several transfers
            r.expect(t, DST)
            h = s.open(t, ep, DST)
            for layer in range(LAYERS):
                h.push_layer(layer, SRC, DST)
            h.finish(10)
            r.wait(t, 10)
        for layer in range(LAYERS):
            assert torch.equal(rx_cache.layers[layer][DST], src.layers[layer][SRC])
    finally:
        s.close()
        r.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["tcp", "nccl", "ucx"])
def test_fingerprint_mismatch_is_refused_and_receiver_keeps_serving(backend):
    rx_cache = KVCache(spec())
    c = cfg(backend, False)
    r = make_receiver(c, rx_cache.layers, fingerprint())
    try:
        ep = r.start()
        bad = make_sender(c, filled_cache(1).layers, fingerprint(head_dim=16, dtype="bfloat16"))
        t0 = time.monotonic()
        with pytest.raises(FingerprintMismatchError, match="head_dim") as err:
            bad.open("x", ep, DST)
        assert "dtype" in str(err.value) and time.monotonic() - t0 < c.timeout_s
        good = make_sender(c, filled_cache(1).layers, fingerprint())
        r.expect("ok", DST)
        h = good.open("ok", ep, DST)
        h.push_layer(0, SRC, DST)
        h.finish(10)
        assert r.wait("ok", 10).num_frames >= 1
        good.close()
    finally:
        r.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["tcp", "ucx"])
def test_cluster_secret_is_required(backend):
    rx_cache = KVCache(spec())
    r = make_receiver(cfg(backend, False, secret="s3cret"), rx_cache.layers, fingerprint())
    try:
        ep = r.start()
        for secret in (None, "wrong"):
            s = make_sender(cfg(backend, False, secret=secret), filled_cache(1).layers, fingerprint())
            with pytest.raises(TransferAuthError):
                s.open("x", ep, DST)
        s = make_sender(cfg(backend, False, secret="s3cret"), filled_cache(1).layers, fingerprint())
        r.expect("y", DST)
        h = s.open("y", ep, DST)
        h.push_layer(0, SRC, DST)
        h.finish(10)
        r.wait("y", 10)
        s.close()
    finally:
        r.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["tcp", "nccl", "ucx"])
def test_killed_receiver_fails_the_sender_within_timeout(backend):
    c = cfg(backend, False, timeout_s=3.0)
    proc, pipe = spawn(receiver_main, c, DST, False, "t", 30.0)
    endpoint = pipe.recv()
    s = make_sender(c, filled_cache(1).layers, fingerprint())
    try:
        h = s.open("t", endpoint, DST)
        h.push_layer(0, SRC, DST)
        kill(proc)
        t0 = time.monotonic()
        with pytest.raises(TransferError):
            for layer in range(1, LAYERS):
                h.push_layer(layer, SRC, DST)
            h.finish()
        assert time.monotonic() - t0 < c.timeout_s + 2
    finally:
        kill(proc)
        s.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["tcp", "nccl", "ucx"])
def test_killed_sender_fails_the_receiver_within_timeout(backend):
    c = cfg(backend, False, timeout_s=3.0)
    rx_cache = KVCache(spec())
    r = make_receiver(c, rx_cache.layers, fingerprint())
    try:
        ep = r.start()
        r.expect("t", DST)
        proc, pipe = spawn(sender_main, c, ep, SRC, DST, 2)
        assert pipe.recv() == "pushed"
        time.sleep(0.3)
        kill(proc)
        t0 = time.monotonic()
        with pytest.raises(TransferError):
            r.wait("t")
        assert time.monotonic() - t0 < c.timeout_s + 2
    finally:
        r.close()


@pytest.mark.timeout(60)
def test_corrupted_payload_fails_the_checksum():
    c = cfg("tcp", False, checksum=True)
    rx_cache = KVCache(spec())
    r = make_receiver(c, rx_cache.layers, fingerprint())
    s = make_sender(c, filled_cache(1).layers, fingerprint())
    try:
        ep = r.start()
        r.expect("t", DST)
        s.fault_injector = lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:]
        h = s.open("t", ep, DST)
        h.push_layer(0, SRC, DST)
        with pytest.raises(ChecksumError):
            h.finish(10)
        with pytest.raises(ChecksumError):
            r.wait("t", 1)
    finally:
        s.close()
        r.close()


@pytest.mark.timeout(60)
def test_writes_outside_the_reservation_are_refused():
    c = cfg("tcp", False)
    rx_cache = KVCache(spec())
    r = make_receiver(c, rx_cache.layers, fingerprint())
    s = make_sender(c, filled_cache(1).layers, fingerprint())
    try:
        ep = r.start()
        r.expect("t", [10, 11])
        h = s.open("t", ep, [10, 11, 12, 13])  # the sender believes it owns more than was reserved
        h.push_layer(0, [1, 2, 3, 4], [10, 11, 12, 13])
        with pytest.raises(TransferError, match="outside the reservation"):
            h.finish(10)
        assert not rx_cache.layers[0].any(), "nothing may be written from a refused frame"
        # unknown transfer ids are refused too
        h2 = s.open("never-expected", ep, [20])
        h2.push_layer(0, [1], [20])
        with pytest.raises(TransferError):
            h2.finish(10)
        assert not rx_cache.layers[0].any()
        with pytest.raises(ValueError):
            h.push_layer(0, [1], [99])  # not part of this transfer at all
    finally:
        s.close()
        r.close()


@pytest.mark.timeout(30)
def test_expected_transfer_that_never_comes_times_out():
    c = cfg("tcp", False, timeout_s=0.5)
    r = make_receiver(c, KVCache(spec()).layers, fingerprint())
    try:
        r.start()
        r.expect("t", DST)
        with pytest.raises(TransferError, match="did not arrive"):
            r.wait("t")
        with pytest.raises(TransferError):
            r.wait("unknown")
    finally:
        r.close()
