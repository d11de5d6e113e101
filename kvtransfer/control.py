"""Connection set-up shared by every backend: handshake, mutual authentication, JSON control frames.

Handshake (receiver speaks first):
    receiver -> CHALLENGE {nonce}
    sender   -> HELLO     {fingerprint, proof = HMAC-SHA256(secret, nonce || fingerprint), nonce2, host_id}
    receiver -> HELLO_OK  {proof = HMAC-SHA256(secret, "rx" || nonce2 || fingerprint), ...backend extras}
              | REFUSE    {kind: "fingerprint" | "auth" | "protocol", message}
A mismatch or a bad proof is refused before any KV byte is accepted. Backend extras (a shared-memory path,
a process-group rendezvous) travel only in HELLO_OK, i.e. only to peers that passed both checks. With a
secret set, the sender also checks the receiver's proof, so KV never goes to an impostor.
Every call here runs on a socket (or socket-like stream) with a timeout set: a silent peer is an error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import select
import socket

from pdserve.engine.layout import LayoutFingerprint
from pdserve.kvtransfer import wire
from pdserve.kvtransfer.base import FingerprintMismatchError, TransferAuthError, TransferError

NONCE_LEN = 16


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


def proof(secret: str | None, nonce: bytes, fingerprint_json: str, role: bytes = b"") -> str:
    if not secret:
        return ""
    return hmac.new(secret.encode(), role + nonce + fingerprint_json.encode(), hashlib.sha256).hexdigest()


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


def _nonce(body: dict, key: str) -> bytes:
    try:
        nonce = bytes.fromhex(str(body.get(key, "")))
    except ValueError:
        raise wire.WireError(f"handshake {key} is not hex") from None
    if len(nonce) != NONCE_LEN:
        raise wire.WireError(f"handshake {key} has {len(nonce)} bytes, not {NONCE_LEN}")
    return nonce


def client_handshake(sock, fingerprint: LayoutFingerprint, secret: str | None) -> dict:
    """Sender side. Returns the HELLO_OK body; raises on refusal or an unauthenticated receiver."""
    nonce = _nonce(expect_json(sock, wire.CHALLENGE), "nonce")
    fp = fingerprint.to_json()
    nonce2 = os.urandom(NONCE_LEN)
    send_json(sock, wire.HELLO, {"fingerprint": fp, "proof": proof(secret, nonce, fp), "nonce2": nonce2.hex(),
                                 "host_id": host_id()})
    welcome = expect_json(sock, wire.HELLO_OK)
    if secret and not hmac.compare_digest(str(welcome.get("proof", "")), proof(secret, nonce2, fp, b"rx")):
        raise TransferAuthError("KV receiver failed authentication (wrong cluster secret)")
    return welcome


def server_handshake(sock, fingerprint: LayoutFingerprint, secret: str | None) -> dict:
    """Receiver side, up to (not including) HELLO_OK. Returns the HELLO body; sends REFUSE and raises on a
    layout mismatch or a bad proof."""
    nonce = os.urandom(NONCE_LEN)
    send_json(sock, wire.CHALLENGE, {"nonce": nonce.hex()})
    hello = expect_json(sock, wire.HELLO)
    fp_json = str(hello.get("fingerprint", ""))
    if secret and not hmac.compare_digest(str(hello.get("proof", "")), proof(secret, nonce, fp_json)):
        msg = "KV handshake: bad or missing cluster secret"
        send_json(sock, wire.REFUSE, {"kind": "auth", "message": msg})
        raise TransferAuthError("peer failed authentication")
    try:
        theirs = LayoutFingerprint.from_json(fp_json)
    except ValueError as e:
        send_json(sock, wire.REFUSE, {"kind": "protocol", "message": str(e)})
        raise TransferError(str(e)) from None
    if theirs != fingerprint:
        msg = "KV layout mismatch (sender != receiver): " + "; ".join(theirs.diff(fingerprint))
        send_json(sock, wire.REFUSE, {"kind": "fingerprint", "message": msg})
        raise FingerprintMismatchError(msg)
    hello["nonce2"] = _nonce(hello, "nonce2")
    return hello


def welcome(sock, hello: dict, fingerprint: LayoutFingerprint, secret: str | None, extra: dict) -> None:
    """Receiver side: accept the peer (HELLO_OK with the receiver's proof and the backend's extras)."""
    body = {**extra, "proof": proof(secret, hello["nonce2"], fingerprint.to_json(), b"rx")}
    send_json(sock, wire.HELLO_OK, body)


def parse_endpoint(endpoint: str, scheme: str) -> tuple[str, int]:
    prefix = f"{scheme}://"
    if not endpoint.startswith(prefix):
        raise TransferError(f"endpoint {endpoint!r} is not a {scheme} endpoint")
    host, _, port = endpoint[len(prefix) :].rpartition(":")
    try:
        port_num = int(port)
    except ValueError:
        raise TransferError(f"endpoint {endpoint!r} has no port") from None
    if not host or not 0 < port_num < 65536:
        raise TransferError(f"endpoint {endpoint!r} has no host or a bad port")
    return host.strip("[]"), port_num
