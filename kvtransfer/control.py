"""Connection set-up shared by the socket-based backends: handshake, authentication, control frames.

Handshake (receiver speaks first):
    receiver -> CHALLENGE {nonce, host_id, shm_path, extra}
    sender   -> HELLO     {fingerprint, proof = HMAC-SHA256(secret, nonce || fingerprint)}
    receiver -> HELLO_OK  {extra} | REFUSE {kind: "fingerprint" | "auth" | "protocol", message}
A mismatch or a bad proof is refused before any KV byte is accepted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct

from engine.kv_cache import LayoutFingerprint
from kvtransfer import wire
from kvtransfer.base import FingerprintMismatchError, TransferAuthError, TransferError


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


def proof(secret: str | None, nonce: bytes, fingerprint_json: str) -> str:
    if not secret:
        return ""
    return hmac.new(secret.encode(), nonce + fingerprint_json.encode(), hashlib.sha256).hexdigest()


def send_json(sock: socket.socket, ftype: int, obj: dict, transfer_id: str = "") -> None:
    body = json.dumps(obj).encode()
    sock.sendall(wire.encode_header(wire.Frame(ftype, transfer_id, payload_len=len(body))) + body)


def read_json(sock: socket.socket, frame: wire.Frame) -> dict:
    try:
        obj = json.loads(wire.recv_exact(sock, frame.payload_len) or b"{}")
    except ValueError:
        raise wire.WireError("control payload is not JSON") from None
    if not isinstance(obj, dict):
        raise wire.WireError("control payload is not a JSON object")
    return obj


def expect_json(sock: socket.socket, ftype: int) -> dict:
    frame = wire.read_frame(sock)
    if frame.type == wire.REFUSE:
        body = read_json(sock, frame)
        kind, msg = body.get("kind"), body.get("message", "refused")
        if kind == "fingerprint":
            raise FingerprintMismatchError(msg)
        if kind == "auth":
            raise TransferAuthError(msg)
        raise TransferError(msg)
    if frame.type != ftype:
        raise wire.WireError(f"expected frame type {ftype}, got {frame.type}")
    return read_json(sock, frame)


def client_handshake(
    sock: socket.socket, fingerprint: LayoutFingerprint, secret: str | None
) -> tuple[dict, dict]:
    """Sender side. Returns (challenge, hello_ok) bodies; raises on refusal."""
    challenge = expect_json(sock, wire.CHALLENGE)
    nonce = bytes.fromhex(challenge.get("nonce", ""))
    fp = fingerprint.to_json()
    send_json(sock, wire.HELLO, {"fingerprint": fp, "proof": proof(secret, nonce, fp)})
    return challenge, expect_json(sock, wire.HELLO_OK)


def server_handshake(
    sock: socket.socket, fingerprint: LayoutFingerprint, secret: str | None, challenge_extra: dict
) -> dict:
    """Receiver side. Returns the HELLO body; sends REFUSE and raises on mismatch or bad proof."""
    nonce = os.urandom(16)
    send_json(sock, wire.CHALLENGE, {"nonce": nonce.hex(), "host_id": host_id(), **challenge_extra})
    hello = expect_json(sock, wire.HELLO)
    fp_json = str(hello.get("fingerprint", ""))
    if secret and not hmac.compare_digest(str(hello.get("proof", "")), proof(secret, nonce, fp_json)):
        send_json(sock, wire.REFUSE, {"kind": "auth", "message": "KV handshake: bad or missing cluster secret"})
        raise TransferAuthError("peer failed authentication")
    try:
        theirs = LayoutFingerprint.from_json(fp_json)
    except ValueError as e:
        send_json(sock, wire.REFUSE, {"kind": "protocol", "message": str(e)})
        raise TransferError(str(e)) from None
    if theirs != fingerprint:
        msg = "KV layout mismatch: " + "; ".join(theirs.diff(fingerprint))
        send_json(sock, wire.REFUSE, {"kind": "fingerprint", "message": msg})
        raise FingerprintMismatchError(msg)
    return hello


def parse_endpoint(endpoint: str, scheme: str) -> tuple[str, int]:
    prefix = f"{scheme}://"
    if not endpoint.startswith(prefix):
        raise TransferError(f"endpoint {endpoint!r} is not a {scheme} endpoint")
    host, _, port = endpoint[len(prefix) :].rpartition(":")
    try:
        return host, int(port)
    except ValueError:
        raise TransferError(f"endpoint {endpoint!r} has no port") from None


def pack_ids(ids: list[int]) -> bytes:
    return struct.pack(f"<{len(ids)}i", *ids)
