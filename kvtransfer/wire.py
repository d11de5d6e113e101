"""The KV wire format: fixed header + transfer id + destination block ids + payload.

Header (little endian, 32 bytes): magic b"PDKV", version u8, type u8, flags u16, id_len u16, pad u16,
layer i32, num_blocks u32, payload_len u64, crc32 u32. Every length is checked against a cap before
anything is allocated or read, so garbage cannot make a peer allocate huge buffers or write past a block.
"""

from __future__ import annotations

import socket
import struct
import zlib
from dataclasses import dataclass, field

MAGIC = b"PDKV"
VERSION = 3  # 2: BEGIN frame, mutual auth, extras only in HELLO_OK; 3: channel-bound handshake
HEADER = struct.Struct("<4sBBHHHiIQI")
assert HEADER.size == 32

# frame types: handshake (CHALLENGE, HELLO, HELLO_OK, REFUSE), transfer (BEGIN, DATA, NOTIFY, DONE, ABORT),
# receiver -> sender (ACK). DATA carries its payload in-band (or on the backend's data plane); NOTIFY says the
# sender already placed the blocks in the receiver's shared memory.
CHALLENGE, HELLO, HELLO_OK, REFUSE, DATA, DONE, ACK, ABORT, NOTIFY, BEGIN = range(1, 11)
TYPES = frozenset({CHALLENGE, HELLO, HELLO_OK, REFUSE, DATA, DONE, ACK, ABORT, NOTIFY, BEGIN})
# flags
F_CHECKSUM = 1
KNOWN_FLAGS = F_CHECKSUM

MAX_ID_LEN = 512
MAX_BLOCKS = 1 << 20
MAX_CONTROL_PAYLOAD = 1 << 20  # every frame but DATA
MAX_DATA_PAYLOAD = 1 << 34  # never allocated: DATA payloads land in cache views or are drained in chunks
# the largest control frame (header, id, block ids, JSON body): the cap for message-based transports
MAX_CONTROL_FRAME = HEADER.size + MAX_ID_LEN + 4 * MAX_BLOCKS + MAX_CONTROL_PAYLOAD


class WireError(ValueError):
    """A malformed frame: bad magic, version, type or length."""


@dataclass(slots=True)
class Frame:
    type: int
    transfer_id: str = ""
    layer: int = 0
    block_ids: list[int] = field(default_factory=list)
    payload_len: int = 0
    crc: int = 0
    flags: int = 0


def encode_header(f: Frame) -> bytes:
    tid = f.transfer_id.encode()
    if len(tid) > MAX_ID_LEN:
        raise WireError(f"transfer id longer than {MAX_ID_LEN} bytes")
    if len(f.block_ids) > MAX_BLOCKS:
        raise WireError(f"{len(f.block_ids)} block ids over the {MAX_BLOCKS} cap")
    try:
        ids = struct.pack(f"<{len(f.block_ids)}i", *f.block_ids)
    except struct.error as e:
        raise WireError(f"block id out of int32 range: {e}") from None
    try:
        head = HEADER.pack(MAGIC, VERSION, f.type, f.flags, len(tid), 0, f.layer, len(f.block_ids),
                           f.payload_len, f.crc)
    except struct.error as e:
        raise WireError(f"frame field out of range: {e}") from None
    return head + tid + ids


def decode_header(buf: bytes) -> tuple[Frame, int, int]:
    """Parse the fixed header; returns (frame without id/blocks, id_len, num_blocks)."""
    if len(buf) != HEADER.size:
        raise WireError(f"truncated header: {len(buf)} of {HEADER.size} bytes")
    magic, version, ftype, flags, id_len, _, layer, nblocks, plen, crc = HEADER.unpack(buf)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}")
    if version != VERSION:
        raise WireError(f"unsupported wire version {version}")
    if ftype not in TYPES:
        raise WireError(f"unknown frame type {ftype}")
    if flags & ~KNOWN_FLAGS:
        raise WireError(f"unknown flags {flags:#x}")
    if id_len > MAX_ID_LEN:
        raise WireError(f"transfer id length {id_len} over the {MAX_ID_LEN} cap")
    if nblocks > MAX_BLOCKS:
        raise WireError(f"block count {nblocks} over the {MAX_BLOCKS} cap")
    cap = MAX_DATA_PAYLOAD if ftype == DATA else MAX_CONTROL_PAYLOAD
    if plen > cap:
        raise WireError(f"payload length {plen} over the {cap} cap for frame type {ftype}")
    return Frame(ftype, layer=layer, payload_len=plen, crc=crc, flags=flags), id_len, nblocks


def parse_frame(data: bytes) -> tuple[Frame, bytes]:
    """Parse one whole frame held in memory (tests, fuzzing); returns (frame, payload)."""
    frame, id_len, nblocks = decode_header(data[: HEADER.size])
    pos = HEADER.size
    need = pos + id_len + 4 * nblocks + frame.payload_len
    if len(data) < need:
        raise WireError(f"truncated frame: {len(data)} of {need} bytes")
    try:
        frame.transfer_id = data[pos : pos + id_len].decode()
    except UnicodeDecodeError:
        raise WireError("transfer id is not UTF-8") from None
    pos += id_len
    frame.block_ids = list(struct.unpack(f"<{nblocks}i", data[pos : pos + 4 * nblocks]))
    pos += 4 * nblocks
    return frame, data[pos : pos + frame.payload_len]


def crc32(views) -> int:
    c = 0
    for v in views:
        c = zlib.crc32(v, c)
    return c


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    n = len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k


def read_frame(sock: socket.socket) -> Frame:
    """Read a header plus id and block ids (not the payload) from a socket."""
    frame, id_len, nblocks = decode_header(recv_exact(sock, HEADER.size))
    rest = recv_exact(sock, id_len + 4 * nblocks) if id_len or nblocks else b""
    try:
        frame.transfer_id = rest[:id_len].decode()
    except UnicodeDecodeError:
        raise WireError("transfer id is not UTF-8") from None
    frame.block_ids = list(struct.unpack(f"<{nblocks}i", rest[id_len:]))
    return frame


def discard(sock: socket.socket, n: int, chunk: int = 1 << 20) -> None:
    scratch = memoryview(bytearray(min(n, chunk) or 1))
    while n > 0:
        k = min(n, len(scratch))
        recv_into_exact(sock, scratch[:k])
        n -= k
