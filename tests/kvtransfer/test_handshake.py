"""The channel-bound handshake and the pending-handshake budget, piece by piece (the attacks end to end are
in test_attacks)."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from pdserve.kvtransfer import TransferAuthError, TransferError, make_receiver, make_sender, names, wire
from pdserve.kvtransfer import control as ctl
from pdserve.kvtransfer.admission import HandshakeBudget
from tests.kvtransfer.helpers import DST, KVCache, cfg, filled_cache, fingerprint, push_all, spec

SECRET = "cluster-s3cret"


def test_endpoint_names_compare_in_canonical_form():
    assert names.canonical("tcp://LocalHost.:5") == "tcp://localhost:5"
    assert names.canonical("tcp://[::ffff:127.0.0.1]:5") == "tcp://127.0.0.1:5"
    assert names.canonical("ucx://[0:0::1]:7") == names.canonical("ucx://::1:7") == "ucx://[::1]:7"
    assert names.is_loopback("tcp://127.0.0.9:1") and names.is_loopback("tcp://localhost:1")
    assert not names.is_loopback("tcp://10.0.0.1:1")
    assert "127.0.0.1" in names.local_addresses()
    with pytest.raises(TransferError):
        names.canonical("tcp://nohost")


def _hello_body(hello: ctl.Hello) -> dict:
    return {"fingerprint": hello.fingerprint, "endpoint": hello.endpoint, "host_id": hello.host_id,
            "nonce2": hello.nonce2.hex(), "proof": hello.sender_proof(SECRET)}


@pytest.fixture
def receiver():
    cache = KVCache(spec())
    r = make_receiver(cfg("tcp", secret=SECRET, advertise_host="kv-0.decode.example"), cache.layers,
                      fingerprint())
    ep = r.start()
    yield r, ep
    r.close()


def _signed_for(ep: str, endpoint: str, host_id: str | None = None) -> tuple[int, dict]:
    """Dial the receiver at ``ep`` and present a valid proof (we hold the secret) made for ``endpoint``."""
    with socket.create_connection(ctl.parse_endpoint(ep, "tcp"), timeout=5) as sock:
        nonce = bytes.fromhex(ctl.expect_json(sock, wire.CHALLENGE)["nonce"])
        hello = ctl.Hello(nonce, os.urandom(ctl.NONCE_LEN), names.canonical(endpoint), fingerprint().to_json(),
                          host_id or ctl.host_id())
        ctl.send_json(sock, wire.HELLO, _hello_body(hello))
        frame = wire.read_frame(sock)
        return frame.type, ctl.read_json(sock, frame)


def test_a_receiver_accepts_proofs_only_for_its_own_names(receiver):
    r, ep = receiver
    port = ctl.parse_endpoint(ep, "tcp")[1]
    assert ep == f"tcp://kv-0.decode.example:{port}"  # the advertised name is the endpoint
    for own in (f"tcp://127.0.0.1:{port}", f"tcp://localhost:{port}", ep.upper().replace("TCP", "tcp")):
        assert _signed_for(ep.replace("kv-0.decode.example", "127.0.0.1"), own)[0] == wire.HELLO_OK, own
    for other in (f"tcp://127.0.0.1:{port + 1}", f"tcp://10.9.9.9:{port}", f"nccl://127.0.0.1:{port}"):
        ftype, body = _signed_for(ep.replace("kv-0.decode.example", "127.0.0.1"), other)
        assert (ftype, body["kind"]) == (wire.REFUSE, "auth") and "not this receiver" in body["message"]
        assert "127.0.0.1" not in body["message"].replace(other, "")  # the receiver's names are not told


def test_a_loopback_name_is_accepted_only_from_this_host(receiver):
    """127.0.0.1 means another machine to a peer elsewhere: its proof for that name is not ours."""
    r, ep = receiver
    direct = ep.replace("kv-0.decode.example", "127.0.0.1")
    ftype, body = _signed_for(direct, direct, host_id="0123456789abcdef")
    assert ftype == wire.REFUSE and "shm_path" not in body


def test_a_captured_hello_cannot_be_replayed(receiver):
    r, ep = receiver
    direct = ep.replace("kv-0.decode.example", "127.0.0.1")
    with socket.create_connection(ctl.parse_endpoint(direct, "tcp"), timeout=5) as sock:
        nonce = bytes.fromhex(ctl.expect_json(sock, wire.CHALLENGE)["nonce"])
        body = _hello_body(ctl.Hello(nonce, os.urandom(16), direct, fingerprint().to_json(), ctl.host_id()))
        ctl.send_json(sock, wire.HELLO, body)
        ctl.expect_json(sock, wire.HELLO_OK)
    with socket.create_connection(ctl.parse_endpoint(direct, "tcp"), timeout=5) as sock:
        ctl.expect_json(sock, wire.CHALLENGE)  # a fresh challenge: the old proof does not cover it
        ctl.send_json(sock, wire.HELLO, body)
        with pytest.raises(TransferAuthError, match="cluster secret"):
            ctl.expect_json(sock, wire.HELLO_OK)


def test_a_receiver_bound_to_a_wildcard_answers_to_its_local_addresses():
    cache = KVCache(spec())
    r = make_receiver(cfg("tcp", secret=SECRET, host="0.0.0.0"), cache.layers, fingerprint())
    src = filled_cache(1)
    s = make_sender(cfg("tcp", secret=SECRET), src.layers, fingerprint())
    try:
        port = ctl.parse_endpoint(r.start(), "tcp")[1]
        r.expect("t", DST)
        h = s.open("t", f"tcp://127.0.0.1:{port}", DST)
        push_all(h)
        h.finish(5)
        r.wait("t", 5)
    finally:
        s.close()
        r.close()


def test_a_tampered_welcome_is_refused_by_the_sender():
    """A man in the middle that swaps HELLO_OK's shared-memory path for its own file breaks the receiver's
    proof: the sender maps nothing and sends nothing."""
    endpoint = "tcp://kv-0.decode.example:7000"
    sender_side, mitm_a = socket.socketpair()
    mitm_b, receiver_side = socket.socketpair()
    for sock in (sender_side, mitm_a, mitm_b, receiver_side):
        sock.settimeout(5)

    def receiver() -> None:
        hello = ctl.server_handshake(receiver_side, fingerprint(), SECRET, {endpoint})
        ctl.welcome(receiver_side, hello, fingerprint(), SECRET, {"shm_path": "/dev/shm/real", "num_blocks": 64})

    def mitm() -> None:
        ctl.send_json(mitm_a, wire.CHALLENGE, ctl.expect_json(mitm_b, wire.CHALLENGE))
        ctl.send_json(mitm_b, wire.HELLO, ctl.expect_json(mitm_a, wire.HELLO))
        welcome = ctl.expect_json(mitm_b, wire.HELLO_OK)
        ctl.send_json(mitm_a, wire.HELLO_OK, {**welcome, "shm_path": "/dev/shm/attacker"})

    threads = [threading.Thread(target=f, daemon=True) for f in (receiver, mitm)]
    for th in threads:
        th.start()
    with pytest.raises(TransferAuthError, match="receiver failed authentication"):
        ctl.client_handshake(sender_side, fingerprint(), SECRET, endpoint)
    for th in threads:
        th.join(5)
    for sock in (sender_side, mitm_a, mitm_b, receiver_side):
        sock.close()


def test_a_sender_dials_again_when_a_busy_receiver_drops_its_handshake():
    ls = socket.create_server(("127.0.0.1", 0))
    endpoint = f"tcp://127.0.0.1:{ls.getsockname()[1]}"

    def receiver() -> None:
        first, _ = ls.accept()
        first.close()  # shed, as under a flood
        conn, _ = ls.accept()
        with conn:
            conn.settimeout(5)
            hello = ctl.server_handshake(conn, fingerprint(), SECRET, {endpoint})
            ctl.welcome(conn, hello, fingerprint(), SECRET, {})
            conn.recv(1)

    th = threading.Thread(target=receiver, daemon=True)
    th.start()
    s = make_sender(cfg("tcp", secret=SECRET), filled_cache(1).layers, fingerprint())
    try:
        s.open("t", endpoint, DST)
    finally:
        s.close()
        ls.close()
        th.join(5)


def test_the_budget_evicts_idle_before_active_and_the_busiest_source_first():
    b = HandshakeBudget(max_pending=4, max_pending_per_source=3)
    a1, _ = b.admit("a1", "A")
    a2, _ = b.admit("a2", "A")
    a2.progressed = True
    a3, _ = b.admit("a3", "A")
    _, victims = b.admit("a4", "A")  # A at its cap: its idlest, oldest slot goes
    assert [v.item for v in victims] == ["a1"] and a1.evicted
    assert b.admit("c1", "C")[1] == []
    _, victims = b.admit("d1", "D")  # the budget is full: from the busiest source (A), idle before active
    assert [v.item for v in victims] == ["a3"]
    _, victims = b.admit("e1", "E")
    assert [v.item for v in victims] == ["a4"]
    assert b.leave(a2) and not b.leave(a1) and len(b) == 3
    b = HandshakeBudget(max_pending=4, max_pending_per_source=1)
    assert all(b.admit(f"u{i}", "")[1] == [] for i in range(4))  # an unknown source: the global cap only
    assert len(b.admit("u4", "")[1]) == 1 and len(b) == 4


@pytest.mark.parametrize("field,value", [("handshake_timeout_s", 0), ("handshake_timeout_s", 5.0),
                                         ("max_pending", 0), ("max_pending_per_source", 0)])
def test_config_bounds_the_unauthenticated_budget(field, value):
    with pytest.raises(ValueError, match=field):
        cfg("tcp", **{field: value})
