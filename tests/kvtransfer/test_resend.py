"""A KV link cut mid-transfer: the sender re-sends the transfer on a new connection and it completes.

The receiver resumes it in the blocks it reserved (idempotent writes), counts it as re-sent, drops frames of
the superseded link, and never lets a resend write into a transfer that already finished.
"""

from __future__ import annotations

import time

import pytest
import torch

from pdserve.kvtransfer import TransferError, make_receiver, make_sender, wire
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
    push_all,
    spec,
)
from tests.kvtransfer.test_refusals import BLOCK_BYTES, RawPeer


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend,shm,path", PATHS)
def test_a_cut_mid_transfer_is_re_sent_on_a_new_connection_and_completes(backend, shm, path):
    """Every 2nd transfer's connection is cut in the middle of a frame (after half the layers went out)."""
    c = cfg(backend, shm, checksum=True, debug_cut_every=2)
    rx_cache = KVCache(spec(), shared=shm)
    tx_cache = filled_cache(1)
    r = make_receiver(c, rx_cache.layers, fingerprint(), rx_cache.shm_path)
    s = make_sender(c, tx_cache.layers, fingerprint())
    try:
        ep = r.start()
        for tid, cut in (("t1", False), ("t2", True), ("t3", False)):
            for layer in rx_cache.layers:
                layer.zero_()
            r.expect(tid, DST)
            h = s.open(tid, ep, DST)
            push_all(h)
            stats = h.finish(10)
            got = r.wait(tid, 10)
            assert got.num_bytes == stats.num_bytes == LAYERS * len(SRC) * fingerprint().block_bytes()
            assert (stats.resends, got.resends, h.resends) == ((1, 1, 1) if cut else (0, 0, 0)), tid
            assert got.path == stats.path == path
            assert_landed(rx_cache.layers, tx_cache.layers)
        assert s.resender.num_resent == 1
    finally:
        s.close()
        r.close()
        rx_cache.close()


@pytest.mark.timeout(60)
def test_pushes_after_the_cut_go_to_the_new_connection():
    """The cut happens while the caller keeps pushing: nothing is lost or doubled in the DONE counts."""
    c = cfg("tcp", checksum=True, debug_cut_every=1)
    rx_cache = KVCache(spec())
    tx_cache = filled_cache(2)
    r = make_receiver(c, rx_cache.layers, fingerprint())
    s = make_sender(c, tx_cache.layers, fingerprint())
    try:
        ep = r.start()
        r.expect("t", DST)
        h = s.open("t", ep, DST)
        push_all(h, layers=range(LAYERS // 2 + 1))  # the cut comes on the first push of the second half
        deadline = time.monotonic() + 10
        while h.resends == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        push_all(h, layers=range(LAYERS // 2 + 1, LAYERS))
        stats = h.finish(10)
        assert stats.resends == 1 and r.wait("t", 10).resends == 1
        assert stats.num_frames == LAYERS
        assert_landed(rx_cache.layers, tx_cache.layers)
    finally:
        s.close()
        r.close()
        rx_cache.close()


@pytest.mark.timeout(60)
def test_a_receiver_that_is_gone_fails_the_transfer_after_bounded_resends():
    c = cfg("tcp", timeout_s=3.0, debug_cut_every=1, resend_attempts=2, resend_window_s=2.0)
    rx_cache = KVCache(spec())
    r = make_receiver(c, rx_cache.layers, fingerprint())
    s = make_sender(c, filled_cache(1).layers, fingerprint())
    try:
        ep = r.start()
        r.expect("t", DST)
        h = s.open("t", ep, DST)
        push_all(h, layers=range(LAYERS // 2))
        r.close()  # the listener goes with it: every reconnect is refused
        t0 = time.monotonic()
        with pytest.raises(TransferError):
            push_all(h, layers=range(LAYERS // 2, LAYERS))
            h.finish(10)
        assert time.monotonic() - t0 < c.resend_window_s + c.timeout_s + 1
        assert h.resends <= c.resend_attempts
    finally:
        s.close()
        rx_cache.close()


@pytest.mark.timeout(30)
def test_a_resend_resumes_a_partial_transfer_and_cuts_the_superseded_link():
    cache = KVCache(spec())
    r = make_receiver(cfg("tcp", timeout_s=3.0), cache.layers, fingerprint())
    ep = r.start()
    r.expect("t", [30, 31])
    old, new = RawPeer(ep), RawPeer(ep)
    try:
        def barrier(peer) -> None:  # a DONE for an unknown id: its ACK says every earlier frame was handled
            assert peer.done("sync", 0, 0)["error"] == "unknown or cancelled transfer"

        ctl.send_json(old.sock, wire.BEGIN, {"blocks": 2}, "t")
        old.data("t", 0, [30], value=1.0)  # partially received on the old link
        barrier(old)
        ctl.send_json(new.sock, wire.BEGIN, {"blocks": 2, "resend": 1}, "t")
        new.data("t", 0, [30], value=7.0)  # rewritten: idempotent into the same reserved block
        barrier(new)
        assert old.dropped()  # the superseded link is cut: nothing it still had in flight lands later
        new.data("t", 1, [31], value=7.0)
        assert new.done("t", 2, 2 * BLOCK_BYTES) == {"ok": True, "error": None, "checksum": False}
        stats = r.wait("t", 3)
        assert stats.resends == 1 and stats.num_bytes == 2 * BLOCK_BYTES
        assert bool((cache.layers[0][30] == 7.0).all()) and bool((cache.layers[1][31] == 7.0).all())
        assert not cache.layers[1][30].any() and not cache.layers[0][31].any()
    finally:
        old.close()
        new.close()
        r.close()


@pytest.mark.timeout(30)
def test_a_resend_of_a_finished_transfer_is_never_written():
    cache = KVCache(spec())
    r = make_receiver(cfg("tcp", timeout_s=3.0), cache.layers, fingerprint())
    ep = r.start()
    r.expect("t", [30])
    p, late = RawPeer(ep), RawPeer(ep)
    try:
        p.data("t", 0, [30])
        assert p.done("t", 1, BLOCK_BYTES)["ok"] is True
        r.wait("t", 1)
        ctl.send_json(late.sock, wire.BEGIN, {"blocks": 1, "resend": 1}, "t")
        late.data("t", 0, [30], value=-1.0)
        assert late.done("t", 1, BLOCK_BYTES) == {"ok": False, "error": "unknown or cancelled transfer"}
        assert bool((cache.layers[0][30] == 7.0).all())
    finally:
        p.close()
        late.close()
        r.close()


@pytest.mark.timeout(30)
def test_a_lost_link_not_resumed_fails_the_transfer_after_the_grace():
    cache = KVCache(spec())
    c = cfg("tcp", timeout_s=3.0, resend_window_s=0.5)
    r = make_receiver(c, cache.layers, fingerprint())
    ep = r.start()
    r.expect("t", [30])
    p = RawPeer(ep)
    try:
        ctl.send_json(p.sock, wire.BEGIN, {"blocks": 1}, "t")
        p.data("t", 0, [30])
        p.close()
        with pytest.raises(TransferError, match="connection lost"):
            r.wait("t", 3)
    finally:
        r.close()


@pytest.mark.timeout(60)
def test_every_transfer_in_flight_on_a_cut_connection_is_re_sent_and_the_fault_does_not_repeat():
    """Two transfers share a connection, both marked to be cut; the first's cut takes the second down before
    its own cut point. Both are re-sent once (the injected cut applies to a transfer's first connection
    only) and both land."""
    c = cfg("tcp", debug_cut_every=1)
    rx_cache = KVCache(spec())
    tx_cache = filled_cache(3)
    r = make_receiver(c, rx_cache.layers, fingerprint())
    s = make_sender(c, tx_cache.layers, fingerprint())
    dst2 = [13, 14, 15, 16, 17, 18, 19, 21]  # clear of DST
    assert not set(dst2) & set(DST)
    try:
        ep = r.start()
        r.expect("a", DST)
        r.expect("b", dst2)
        ha, hb = s.open("a", ep, DST), s.open("b", ep, dst2)
        for layer in range(LAYERS):
            ha.push_layer(layer, SRC, DST)
            hb.push_layer(layer, SRC, dst2)
        sa, sb = ha.finish(10), hb.finish(10)
        assert r.wait("a", 10).num_bytes == sa.num_bytes and r.wait("b", 10).num_bytes == sb.num_bytes
        assert (sa.resends, sb.resends) == (1, 1)
        for layer in range(LAYERS):
            for src, d1, d2 in zip(SRC, DST, dst2, strict=True):
                assert torch.equal(rx_cache.layers[layer][d1], tx_cache.layers[layer][src])
                assert torch.equal(rx_cache.layers[layer][d2], tx_cache.layers[layer][src])
    finally:
        s.close()
        r.close()
        rx_cache.close()
