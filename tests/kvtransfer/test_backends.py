"""Every backend: bit-identical blocks across processes and in-process, handshake refusals, connection
reuse."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from pdserve.kvtransfer import (
    FingerprintMismatchError,
    TransferAuthError,
    make_receiver,
    make_sender,
    wire,
)
from pdserve.kvtransfer import control as ctl
from tests.kvtransfer.helpers import (
    DST,
    LAYERS,
    PATHS,
    SRC,
    KVCache,
    assert_landed,
    cfg,
    filled_cache,
    fingerprint,
    kill,
    push_all,
    receiver_main,
    recv,
    spawn,
    spec,
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,shm,path", PATHS)
def test_blocks_arrive_bit_identical_across_processes(backend, shm, path):
    c = cfg(backend, shm, checksum=True)
    proc, pipe = spawn(receiver_main, c, DST, shm, "t", 20.0)
    shm_path = None
    try:
        endpoint, shm_path = recv(pipe)
        src = filled_cache(1)
        sender = make_sender(c, src.layers, fingerprint())
        h = sender.open("t", endpoint, DST)
        push_all(h)
        stats = h.finish(10)
        assert stats.path == path
        assert stats.num_bytes == LAYERS * len(SRC) * fingerprint().block_bytes() and stats.num_frames > 0
        status, rx_path, layers = recv(pipe)
        assert (status, rx_path) == ("ok", path)
        assert_landed(layers, src.layers)
        sender.close()
        pipe.send("bye")
    finally:
        kill(proc, shm_path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,shm,path", PATHS)
def test_bfloat16_transfers_reuse_one_connection(backend, shm, path):
    fp = fingerprint(dtype="bfloat16")
    rx_cache, src = KVCache(spec(torch.bfloat16), shared=shm), filled_cache(2, torch.bfloat16)
    c = cfg(backend, shm, checksum=True)
    r = make_receiver(c, rx_cache.layers, fp, rx_cache.shm_path)
    s = make_sender(c, src.layers, fp)
    try:
        ep = r.start()
        transfers = {"a": (SRC[:4], DST[:4]), "b": (SRC[4:], DST[4:])}
        for t, (src_ids, dst_ids) in transfers.items():
            r.expect(t, dst_ids)
            h = s.open(t, ep, dst_ids)
            push_all(h, src_ids, dst_ids)
            assert h.finish(10).path == path
            assert r.wait(t, 10).path == path
        assert len(s._conns) == 1, "the second transfer must reuse the connection"
        assert_landed(rx_cache.layers, src.layers)
    finally:
        s.close()
        r.close()
        rx_cache.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["tcp", "nccl", "ucx"])
def test_fingerprint_mismatch_is_refused_and_receiver_keeps_serving(backend):
    rx_cache = KVCache(spec())
    c = cfg(backend)
    r = make_receiver(c, rx_cache.layers, fingerprint())
    try:
        ep = r.start()
        bad = make_sender(c, filled_cache(1).layers, fingerprint(head_dim=16, dtype="bfloat16"))
        t0 = time.monotonic()
        with pytest.raises(FingerprintMismatchError, match="head_dim") as err:
            bad.open("x", ep, DST)
        assert "dtype" in str(err.value) and "model_id" not in str(err.value)
        assert time.monotonic() - t0 < c.timeout_s
        src = filled_cache(1)
        good = make_sender(c, src.layers, fingerprint())
        r.expect("ok", DST)
        h = good.open("ok", ep, DST)
        push_all(h)
        h.finish(10)
        assert r.wait("ok", 10).num_frames >= LAYERS
        assert_landed(rx_cache.layers, src.layers)
        good.close()
    finally:
        r.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["tcp", "nccl", "ucx"])
def test_cluster_secret_is_required(backend):
    rx_cache = KVCache(spec())
    r = make_receiver(cfg(backend, secret="s3cret"), rx_cache.layers, fingerprint())
    try:
        ep = r.start()
        r.expect("y", DST)
        for secret in (None, "wrong"):
            s = make_sender(cfg(backend, secret=secret), filled_cache(1).layers, fingerprint())
            with pytest.raises(TransferAuthError):
                s.open("y", ep, DST)
        assert not rx_cache.layers[0].any()
        src = filled_cache(1)
        s = make_sender(cfg(backend, secret="s3cret"), src.layers, fingerprint())
        h = s.open("y", ep, DST)
        push_all(h)
        h.finish(10)
        r.wait("y", 10)
        assert_landed(rx_cache.layers, src.layers)
        s.close()
    finally:
        r.close()


@pytest.mark.timeout(30)
def test_sender_refuses_a_receiver_that_cannot_prove_the_secret():
    """An impostor that accepts any HELLO must not get KV: the sender checks the receiver's proof."""
    ls = socket.create_server(("127.0.0.1", 0))

    def impostor() -> None:
        conn, _ = ls.accept()
        with conn:
            conn.settimeout(5)
            ctl.send_json(conn, wire.CHALLENGE, {"nonce": "00" * ctl.NONCE_LEN})
            ctl.expect_json(conn, wire.HELLO)
            ctl.send_json(conn, wire.HELLO_OK, {"proof": "f" * 64})
            conn.recv(1)

    th = threading.Thread(target=impostor, daemon=True)
    th.start()
    try:
        s = make_sender(cfg("tcp", secret="s3cret"), filled_cache(1).layers, fingerprint())
        with pytest.raises(TransferAuthError, match="receiver failed authentication"):
            s.open("t", f"tcp://127.0.0.1:{ls.getsockname()[1]}", DST)
    finally:
        ls.close()
        th.join(5)
