"""Connection set-up shared by every backend (tcp, tcp+shm, nccl/gloo, ucx): JSON control frames and the
channel-bound, mutually authenticated handshake.

Handshake (wire version 3; the receiver speaks first):

    receiver -> CHALLENGE {nonce: Nr}                                        fresh per connection
    sender   -> HELLO     {fingerprint: F, endpoint: E, host_id: H, nonce2: Ns,
                           proof: MAC(K, "sender",   Nr, Ns, E, F, H)}
    receiver -> HELLO_OK  {...extras X, proof: MAC(K, "receiver", Nr, Ns, E, F, H, X)}
              | REFUSE    {kind: "auth" | "fingerprint" | "protocol" | "busy", message}

K = HMAC-SHA256(cluster secret, "pdserve/kvtransfer/handshake/v3") (a key for this use only, so no proof
here is ever valid in another protocol keyed by the same secret); MAC is HMAC-SHA256 over the
length-prefixed fields, so no two transcripts encode alike.

Why this stops a relay. The attack: a prefill worker can be made to dial an endpoint of the attacker's
choosing, A. The attacker connects to the real decode receiver R, gets R's challenge Nr, plays it to the
prefill worker as A's challenge, and forwards the proof it gets back. Here the prefill worker signs the
endpoint it *dialed* (E = A, canonical form, ``names``), never a name the peer claims, and R accepts a
proof only for one of its own names: the endpoint it is bound to or advertises (``advertise_host``), or
the local address this very connection arrived on. A proof obtained through A names A and is refused by
R; rewriting E in transit breaks the MAC. To make the prefill worker sign R's name, the attacker has to
make it dial R's name, and then it reaches R itself. Nothing binds to the transport's addresses as the
sender sees them: behind NAT or a Service VIP those differ on the two sides, whereas the dialed name is
exactly what the decode worker advertised. The receiver-chosen nonce makes every proof good for one
connection only (no replay), the sender's nonce does the same for the receiver's proof, and the role
labels keep a proof from being reflected as the other side's.

Mutual. The receiver proves too, over the same transcript plus the extras it hands out (a shared-memory
path, a process-group rendezvous), so a sender never sends KV to, or maps a file named by, anyone but an
authenticated receiver at the endpoint it dialed; a tampered extra fails the proof.

Internals only to authenticated peers. A bad or missing proof, or a proof for another name, is refused
before the layout is compared (so an unauthenticated peer learns neither the layout nor the receiver's
names), and extras travel only in HELLO_OK. The host id H is signed, so a peer cannot claim to be on
this host to be offered shared memory, and a loopback name (127.0.0.1, ::1, localhost) is accepted only
from a peer on this host: the same name means a different machine to a peer elsewhere.

Limits. Without a cluster secret nothing is authenticated (the development mode; every proof is empty).
A name that means different machines to the two sides (overlapping private address spaces bridged by
the attacker) or a network-level man in the middle, which can read and inject frames after the
handshake, needs transport encryption (TLS, or UCX/NCCL over a trusted fabric), which this does not add.
Backends share this code: tcp and its shm path, nccl/gloo (the TCPStore rendezvous is an extra, so
only authenticated senders learn it and the link's random prefix) and ucx (over ``UcxStream``).

Every call here runs on a socket (or socket-like stream) with a timeout set, and the receiver's whole
handshake under a deadline (``admission``): a silent or trickling peer is an error within seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import select
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import cache

from pdserve.engine.layout import LayoutFingerprint
from pdserve.kvtransfer import names, wire
from pdserve.kvtransfer.admission import HandshakeStream
from pdserve.kvtransfer.base import FingerprintMismatchError, TransferAuthError, TransferConfig, TransferError

NONCE_LEN = 16
SENDER, RECEIVER = b"sender", b"receiver"
HANDSHAKE_ATTEMPTS = 5
RETRY_PAUSE_S = 0.02


@cache
def host_id() -> str:
    """Identifies this machine (and boot), so peers know when shared memory is reachable."""
    parts = [socket.gethostname()]
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            with open(path) as f:
                parts.append(f.read().strip())
        except OSError:
            pass
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def readable(sock, timeout: float) -> bool:
    """Whether a frame can be read within ``timeout`` (False: idle). Raises ConnectionError if closed."""
    if hasattr(sock, "readable"):  # message-based streams (ucx)
        return sock.readable(timeout)
    try:
        r, _, _ = select.select([sock], [], [], timeout)
    except (OSError, ValueError):
        raise ConnectionError("socket closed") from None
    return bool(r)


def send_json(sock, ftype: int, obj: dict, transfer_id: str = "") -> None:
    body = json.dumps(obj).encode()
    sock.sendall(wire.encode_header(wire.Frame(ftype, transfer_id, payload_len=len(body))) + body)


def read_json(sock, frame: wire.Frame) -> dict:
    try:
        obj = json.loads(wire.recv_exact(sock, frame.payload_len) or b"{}")
    except ValueError:
        raise wire.WireError("control payload is not JSON") from None
    if not isinstance(obj, dict):
        raise wire.WireError("control payload is not a JSON object")
    return obj


def expect_json(sock, ftype: int) -> dict:
    frame = wire.read_frame(sock)
    if frame.type == wire.REFUSE:
        body = read_json(sock, frame)
        kind, msg = body.get("kind"), str(body.get("message", "refused"))
        if kind == "fingerprint":
            raise FingerprintMismatchError(msg)
        if kind == "auth":
            raise TransferAuthError(msg)
        raise TransferError(msg)
    if frame.type != ftype:
        raise wire.WireError(f"expected frame type {ftype}, got {frame.type}")
    return read_json(sock, frame)


def _key(secret: str) -> bytes:
    return hmac.new(secret.encode(), b"pdserve/kvtransfer/handshake/v3", hashlib.sha256).digest()


def mac(secret: str | None, role: bytes, *fields: str | bytes) -> str:
    """HMAC-SHA256 under the handshake key over ``role`` and ``fields``, each length-prefixed ("" without
    a secret)."""
    if not secret:
        return ""
    m = hmac.new(_key(secret), digestmod=hashlib.sha256)
    for f in (role, *fields):
        b = f.encode() if isinstance(f, str) else f
        m.update(len(b).to_bytes(4, "big") + b)
    return m.hexdigest()


def _canon_json(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Hello:
    """A sender's HELLO: the transcript both proofs cover."""

    nonce: bytes  # the receiver's challenge
    nonce2: bytes  # the sender's
    endpoint: str  # the receiver endpoint the sender dialed, canonical
    fingerprint: str  # the sender's layout fingerprint, as JSON
    host_id: str  # the sender's machine

    def transcript(self) -> tuple:
        return self.nonce, self.nonce2, self.endpoint, self.fingerprint, self.host_id

    def sender_proof(self, secret: str | None) -> str:
        return mac(secret, SENDER, *self.transcript())

    def receiver_proof(self, secret: str | None, extra: dict) -> str:
        return mac(secret, RECEIVER, *self.transcript(), _canon_json(extra))


def _nonce(body: dict, key: str) -> bytes:
    try:
        nonce = bytes.fromhex(str(body.get(key, "")))
    except ValueError:
        raise wire.WireError(f"handshake {key} is not hex") from None
    if len(nonce) != NONCE_LEN:
        raise wire.WireError(f"handshake {key} has {len(nonce)} bytes, not {NONCE_LEN}")
    return nonce


def client_handshake(sock, fingerprint: LayoutFingerprint, secret: str | None, endpoint: str) -> dict:
    """Sender side, with the receiver at ``endpoint`` (the one dialed). Returns the HELLO_OK body (the
    receiver's extras); raises on refusal or a receiver that cannot prove the secret for this session."""
    nonce = _nonce(expect_json(sock, wire.CHALLENGE), "nonce")
    hello = Hello(nonce, os.urandom(NONCE_LEN), names.canonical(endpoint), fingerprint.to_json(), host_id())
    send_json(sock, wire.HELLO, {"fingerprint": hello.fingerprint, "endpoint": hello.endpoint,
                                 "host_id": hello.host_id, "nonce2": hello.nonce2.hex(),
                                 "proof": hello.sender_proof(secret)})
    welcome = expect_json(sock, wire.HELLO_OK)
    extra = {k: v for k, v in welcome.items() if k != "proof"}
    if secret and not hmac.compare_digest(str(welcome.get("proof", "")), hello.receiver_proof(secret, extra)):
        raise TransferAuthError(f"KV receiver failed authentication (wrong cluster secret, or not the "
                                f"receiver at {endpoint})")
    return extra


def names_me(hello: Hello, my_names: Collection[str]) -> bool:
    """Whether the endpoint the sender signed is one of this receiver's names (loopback names only for a
    peer on this host)."""
    if hello.endpoint not in my_names:
        return False
    return not names.is_loopback(hello.endpoint) or hello.host_id == host_id()


class Refusal(Exception):
    """A HELLO that must be refused: ``kind`` and ``message`` go to the peer, ``error`` is what we raise."""

    def __init__(self, kind: str, message: str, error: TransferError):
        super().__init__(message)
        self.kind, self.message, self.error = kind, message, error


def challenge(nonce: bytes) -> bytes:
    """The CHALLENGE frame carrying ``nonce``."""
    body = json.dumps({"nonce": nonce.hex()}).encode()
    return wire.encode_header(wire.Frame(wire.CHALLENGE, payload_len=len(body))) + body


def refusal_frame(r: Refusal) -> bytes:
    body = json.dumps({"kind": r.kind, "message": r.message}).encode()
    return wire.encode_header(wire.Frame(wire.REFUSE, payload_len=len(body))) + body


def check_hello(body: dict, nonce: bytes, fingerprint: LayoutFingerprint, secret: str | None,
                my_names: Collection[str]) -> Hello:
    """Verify a HELLO answering the challenge ``nonce``: the proof, that it is for one of ``my_names`` (this
    receiver's canonical endpoint names), then the layout. Raises Refusal (or WireError: malformed)."""
    hello = Hello(nonce, _nonce(body, "nonce2"), str(body.get("endpoint", "")), str(body.get("fingerprint", "")),
                  str(body.get("host_id", "")))
    if secret:
        if not hmac.compare_digest(str(body.get("proof", "")), hello.sender_proof(secret)):
            raise Refusal("auth", "KV handshake: bad or missing cluster secret",
                          TransferAuthError("peer failed authentication"))
        if not names_me(hello, my_names):
            raise Refusal("auth", f"KV handshake: the proof is for {hello.endpoint!r}, which is not this receiver "
                                  "(a relayed handshake, or a name it is not told: advertise_host)",
                          TransferAuthError(f"peer's proof is for {hello.endpoint!r}, not one of {sorted(my_names)}"))
    try:
        theirs = LayoutFingerprint.from_json(hello.fingerprint)
    except ValueError as e:
        raise Refusal("protocol", str(e), TransferError(str(e))) from None
    if theirs != fingerprint:
        msg = "KV layout mismatch (sender != receiver): " + "; ".join(theirs.diff(fingerprint))
        raise Refusal("fingerprint", msg, FingerprintMismatchError(msg))
    return hello


def server_handshake(sock, fingerprint: LayoutFingerprint, secret: str | None,
                     my_names: Collection[str] = ()) -> Hello:
    """Receiver side on a blocking stream, up to (not including) HELLO_OK. Returns the verified HELLO; sends
    REFUSE and raises on a bad proof, a proof for another endpoint, or a layout mismatch."""
    nonce = os.urandom(NONCE_LEN)
    sock.sendall(challenge(nonce))
    body = expect_json(sock, wire.HELLO)
    try:
        return check_hello(body, nonce, fingerprint, secret, my_names)
    except Refusal as r:
        sock.sendall(refusal_frame(r))
        raise r.error from None


def welcome(sock, hello: Hello, fingerprint: LayoutFingerprint, secret: str | None, extra: dict) -> None:
    """Receiver side: accept the peer (HELLO_OK with the backend's extras and the receiver's proof over the
    session and those extras). ``fingerprint`` equals the sender's (checked by ``server_handshake``)."""
    send_json(sock, wire.HELLO_OK, {**extra, "proof": hello.receiver_proof(secret, extra)})


def refuse_busy(sock, message: str) -> None:
    send_json(sock, wire.REFUSE, {"kind": "busy", "message": message})


def dial(connect: Callable, endpoint: str, scheme: str, fingerprint: LayoutFingerprint, config: TransferConfig):
    """Sender side: connect to ``endpoint`` and handshake under the handshake deadline; returns (socket,
    the receiver's extras). A connection dropped before HELLO_OK (a receiver shedding unauthenticated
    connections under a flood) is dialed again, up to HANDSHAKE_ATTEMPTS times (0.3 s of pauses in all);
    refusals and timeouts are not."""
    host, port = parse_endpoint(endpoint, scheme)
    error = None
    for attempt in range(HANDSHAKE_ATTEMPTS):
        if attempt:  # a jittered pause, so a retry does not land in the same burst of flood connections
            time.sleep(random.uniform(0.5, 1.5) * RETRY_PAUSE_S * attempt)
        try:
            sock = connect(host, port)
        except OSError as e:
            raise TransferError(f"cannot connect to KV receiver {endpoint}: {e}") from None
        try:
            stream = HandshakeStream(sock, min(config.handshake_timeout_s, config.timeout_s))
            extra = client_handshake(stream, fingerprint, config.secret, endpoint)
            sock.settimeout(config.timeout_s)
            return sock, extra
        except ConnectionError as e:
            sock.close()
            error = e
        except (OSError, wire.WireError) as e:
            sock.close()
            raise TransferError(f"KV handshake with {endpoint} failed: {e}") from None
        except TransferError:
            sock.close()
            raise
    raise TransferError(f"KV handshake with {endpoint} failed: {error}")


def parse_endpoint(endpoint: str, scheme: str) -> tuple[str, int]:
    return names.split_endpoint(endpoint, scheme)
