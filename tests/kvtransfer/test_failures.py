"""Failures surface as typed errors within the timeout: dead peers, corruption, aborts, cancels, silence."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from pdserve.kvtransfer import (
    ChecksumError,
    TransferError,
    TransferTimeoutError,
    make_receiver,
    make_sender,
)
from pdserve.kvtransfer import control as ctl
from tests.kvtransfer.helpers import (
    DST,
    LAYERS,
    PATHS,
    SRC,
    KVCache,
    cfg,
    filled_cache,
    fingerprint,
    kill,
    push_all,
    receiver_main,
    recv,
    sender_main,
    spawn,
    spec,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def corrupt(view: torch.Tensor) -> torch.Tensor:
    bad = view.clone()
    flat = bad.view(torch.uint8).reshape(-1)
    flat[100] ^= 0xFF
    return bad


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,shm,path", PATHS)
def test_killed_receiver_fails_the_sender_within_timeout(backend, shm, path):
    c = cfg(backend, shm, timeout_s=3.0)
    proc, pipe = spawn(receiver_main, c, DST, shm, "t", 30.0)
    shm_path = None
    s = make_sender(c, filled_cache(1).layers, fingerprint())
    try:
        endpoint, shm_path = recv(pipe)
        h = s.open("t", endpoint, DST)
        h.push_layer(0, SRC, DST)
        kill(proc)
        t0 = time.monotonic()
        with pytest.raises(TransferError):
            push_all(h, layers=range(1, LAYERS))
            h.finish()
        assert time.monotonic() - t0 < c.timeout_s + 2
    finally:
        kill(proc, shm_path)
        s.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,shm,path", PATHS)
def test_killed_sender_fails_the_receiver_within_timeout(backend, shm, path):
    c = cfg(backend, shm, timeout_s=3.0)
    rx_cache = KVCache(spec(), shared=shm)
    r = make_receiver(c, rx_cache.layers, fingerprint(), rx_cache.shm_path)
    proc = None
    try:
        ep = r.start()
        r.expect("t", DST)
        proc, pipe = spawn(sender_main, c, ep, SRC, DST, 2)
        assert recv(pipe) == "pushed"
        time.sleep(0.3)
        kill(proc)
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="connection lost"):
            r.wait("t")
        assert time.monotonic() - t0 < c.timeout_s + 2
    finally:
        if proc is not None:
            kill(proc)
        r.close()
        rx_cache.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,shm,path", PATHS)
def test_corrupted_payload_fails_the_checksum_on_both_sides(backend, shm, path):
    c = cfg(backend, shm, checksum=True)
    rx_cache = KVCache(spec(), shared=shm)
    r = make_receiver(c, rx_cache.layers, fingerprint(), rx_cache.shm_path)
    s = make_sender(c, filled_cache(1).layers, fingerprint())
    try:
        ep = r.start()
        r.expect("t", DST)
        s.fault_injector = corrupt
        h = s.open("t", ep, DST)
        h.push_layer(0, SRC, DST)
        with pytest.raises(ChecksumError):
            h.finish(10)
        with pytest.raises(ChecksumError, match="checksum mismatch in layer 0"):
            r.wait("t", 1)
        # the connection survives a refused transfer
        s.fault_injector = None
        r.expect("t2", DST)
        h = s.open("t2", ep, DST)
        push_all(h)
        h.finish(10)
        r.wait("t2", 10)
    finally:
        s.close()
        r.close()
        rx_cache.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,shm,path", PATHS)
def test_connection_cut_midway_fails_both_sides_without_resends_and_the_next_transfer_reconnects(
        backend, shm, path):
    """The injected fault: every 2nd transfer's connection is cut in the middle of a frame. With resends off
    the cut transfer fails on both sides (with them on it completes: test_resend.py)."""
    c = cfg(backend, shm, checksum=True, debug_cut_every=2, resend_attempts=0)
    rx_cache = KVCache(spec(), shared=shm)
    tx_cache = filled_cache(1)
    r = make_receiver(c, rx_cache.layers, fingerprint(), rx_cache.shm_path)
    s = make_sender(c, tx_cache.layers, fingerprint())
    try:
        ep = r.start()
        for tid, cut in (("t1", False), ("t2", True), ("t3", False)):
            rx_cache.layers[0].zero_()
            r.expect(tid, DST)
            h = s.open(tid, ep, DST)
            if cut:
                with pytest.raises(TransferError):  # the cut may already fail push_layer, else finish
                    push_all(h)
                    h.finish(10)
                with pytest.raises(TransferError, match="connection lost|truncated|closed"):
                    r.wait(tid, 10)
                continue
            push_all(h)
            stats = h.finish(10)
            assert r.wait(tid, 10).num_bytes == stats.num_bytes == LAYERS * len(SRC) * fingerprint().block_bytes()
            for s_id, d_id in zip(SRC, DST, strict=True):
                assert torch.equal(rx_cache.layers[0][d_id], tx_cache.layers[0][s_id])
    finally:
        s.close()
        r.close()
        rx_cache.close()


@pytest.mark.parametrize("bad", [-1, -5])
def test_debug_cut_every_and_resend_settings_are_validated(bad):
    with pytest.raises(ValueError, match="debug_cut_every"):
        cfg("tcp", debug_cut_every=bad)
    with pytest.raises(ValueError, match="resend_attempts"):
        cfg("tcp", resend_attempts=bad)
    with pytest.raises(ValueError, match="resend_window_s"):
        cfg("tcp", resend_window_s=float(bad))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["tcp", "nccl"])
def test_abort_fails_the_receiver_promptly(backend):
    c = cfg(backend, timeout_s=5.0)
    r = make_receiver(c, KVCache(spec()).layers, fingerprint())
    s = make_sender(c, filled_cache(1).layers, fingerprint())
    try:
        ep = r.start()
        r.expect("t", DST)
        h = s.open("t", ep, DST)
        h.push_layer(0, SRC, DST)
        h.abort("prefill preempted")
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="prefill preempted"):
            r.wait("t", 5)
        assert time.monotonic() - t0 < 2
        with pytest.raises(TransferError, match="aborted"):
            h.finish(1)
        with pytest.raises(TransferError):
            h.push_layer(1, SRC, DST)
    finally:
        s.close()
        r.close()


@pytest.mark.timeout(30)
def test_cancelled_transfer_is_never_written():
    c = cfg("tcp")
    rx_cache = KVCache(spec())
    r = make_receiver(c, rx_cache.layers, fingerprint())
    s = make_sender(c, filled_cache(1).layers, fingerprint())
    try:
        ep = r.start()
        r.expect("t", DST)
        r.cancel("t")
        h = s.open("t", ep, DST)
        push_all(h)
        with pytest.raises(TransferError, match="unknown or cancelled"):
            h.finish(5)
        assert not any(layer.any() for layer in rx_cache.layers)
        with pytest.raises(TransferError, match="not expected"):
            r.wait("t", 1)
    finally:
        s.close()
        r.close()


@pytest.mark.timeout(30)
def test_expected_transfer_that_never_comes_times_out():
    r = make_receiver(cfg("tcp", timeout_s=0.5), KVCache(spec()).layers, fingerprint())
    try:
        r.start()
        r.expect("t", DST)
        t0 = time.monotonic()
        with pytest.raises(TransferTimeoutError, match="did not arrive"):
            r.wait("t")
        assert time.monotonic() - t0 < 2
        with pytest.raises(TransferError, match="not expected"):
            r.wait("unknown")
    finally:
        r.close()


@pytest.mark.timeout(30)
def test_silent_receiver_times_out_handshake_and_finish():
    """A peer that accepts but never answers (or never acks) costs one timeout, not a hang."""
    c = cfg("tcp", timeout_s=0.5)
    s = make_sender(c, filled_cache(1).layers, fingerprint())
    mute = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody speaks
    no_ack = socket.create_server(("127.0.0.1", 0))

    def handshake_then_silence() -> None:
        conn, _ = no_ack.accept()
        with conn:
            conn.settimeout(5)
            hello = ctl.server_handshake(conn, fingerprint(), None)
            ctl.welcome(conn, hello, fingerprint(), None, {})
            while conn.recv(1 << 16):
                pass

    th = threading.Thread(target=handshake_then_silence, daemon=True)
    th.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="handshake"):
            s.open("t", f"tcp://127.0.0.1:{mute.getsockname()[1]}", DST)
        assert time.monotonic() - t0 < 2
        h = s.open("t", f"tcp://127.0.0.1:{no_ack.getsockname()[1]}", DST)
        h.push_layer(0, SRC, DST)
        t0 = time.monotonic()
        with pytest.raises(TransferTimeoutError):
            h.finish(0.5)
        assert time.monotonic() - t0 < 2
    finally:
        s.close()
        mute.close()
        no_ack.close()
        th.join(5)


@pytest.mark.timeout(60)
def test_missing_ucxx_is_a_clear_transfer_error():
    code = (
        "import sys; sys.modules['ucxx'] = None\n"
        "from kvtransfer import TransferConfig, TransferError, make_sender\n"
        "from tests.kvtransfer.helpers import filled_cache, fingerprint\n"
        "try:\n"
        "    make_sender(TransferConfig(backend='ucx'), filled_cache(1).layers, fingerprint())\n"
        "except TransferError as e:\n"
        "    print('TransferError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=50)
    assert "TransferError: the ucx backend needs ucxx" in out.stdout, out.stderr


def test_handshake_helpers_reject_bad_endpoints():
    for bad in ("tcp://nohost", "tcp://:80", "ucx://127.0.0.1:80", "tcp://127.0.0.1:99999"):
        with pytest.raises(TransferError):
            ctl.parse_endpoint(bad, "tcp")
    assert ctl.parse_endpoint("tcp://[::1]:5", "tcp") == ("::1", 5)


@pytest.mark.timeout(30)
def test_closing_the_receiver_fails_pending_waits():
    r = make_receiver(cfg("tcp"), KVCache(spec()).layers, fingerprint())
    r.start()
    r.expect("t", DST)
    closer = threading.Timer(0.2, r.close)
    closer.start()
    t0 = time.monotonic()
    with pytest.raises(TransferError, match="receiver closed"):
        r.wait("t", 5)
    assert time.monotonic() - t0 < 2
    closer.join(5)
