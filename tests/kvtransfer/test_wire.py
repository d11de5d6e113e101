"""Wire format: round trips and malformed frames (fuzzed) refused with clear errors."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.kvtransfer import wire


def frame_bytes(**kw) -> bytes:
    f = wire.Frame(kw.pop("type", wire.DATA), kw.pop("transfer_id", "req-1"), kw.pop("layer", 3),
                   kw.pop("block_ids", [4, 5, 9]), kw.pop("payload_len", 8), kw.pop("crc", 77))
    return wire.encode_header(f) + b"\x01" * f.payload_len


def test_roundtrip():
    frame, payload = wire.parse_frame(frame_bytes())
    assert (frame.type, frame.transfer_id, frame.layer, frame.block_ids, frame.crc) == (wire.DATA, "req-1", 3,
                                                                                        [4, 5, 9], 77)
    assert payload == b"\x01" * 8


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + bytes([9]) + b[5:], "version"),
        (lambda b: b[:5] + bytes([200]) + b[6:], "frame type"),
        (lambda b: b[:10], "truncated header"),
        (lambda b: b[:-3], "truncated frame"),
        (lambda b: b[:8] + struct.pack("<H", 60000) + b[10:], "transfer id length"),
        (lambda b: b[:16] + struct.pack("<I", 1 << 30) + b[20:], "block count"),
        (lambda b: b[:5] + bytes([wire.ACK]) + b[6:20] + struct.pack("<Q", 1 << 40) + b[28:],
         "payload length"),
    ],
)
def test_malformed_frames_are_refused(mutate, match):
    with pytest.raises(wire.WireError, match=match):
        wire.parse_frame(mutate(frame_bytes()))


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=0, max_size=200))
def test_garbage_never_crashes_the_parser(data):
    try:
        wire.parse_frame(data)
    except wire.WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 200), st.integers(0, 255))
def test_flipped_header_bytes_are_refused_or_parsed_consistently(pos, value):
    data = bytearray(frame_bytes())
    if pos < len(data):
        data[pos] = value
    try:
        frame, payload = wire.parse_frame(bytes(data))
    except wire.WireError:
        return
    assert len(payload) == frame.payload_len and len(frame.block_ids) <= wire.MAX_BLOCKS


def test_unknown_flags_and_unencodable_frames_are_refused():
    data = bytearray(frame_bytes())
    data[6] = 0x80  # flags low byte
    with pytest.raises(wire.WireError, match="flags"):
        wire.parse_frame(bytes(data))
    with pytest.raises(wire.WireError, match="int32"):
        wire.encode_header(wire.Frame(wire.DATA, "t", 0, [1 << 40], 0))
    with pytest.raises(wire.WireError, match="transfer id"):
        wire.encode_header(wire.Frame(wire.BEGIN, "x" * (wire.MAX_ID_LEN + 1)))
    with pytest.raises(wire.WireError, match="out of range"):
        wire.encode_header(wire.Frame(wire.DATA, "t", 1 << 33, [1], 0))


def test_control_frames_fit_the_message_cap():
    biggest = wire.HEADER.size + wire.MAX_ID_LEN + 4 * wire.MAX_BLOCKS + wire.MAX_CONTROL_PAYLOAD
    assert wire.MAX_CONTROL_FRAME == biggest


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=300))
def test_garbage_streams_fail_cleanly_on_a_socket(data):
    """read_frame on a live socket: garbage ends in WireError or ConnectionError, never a hang or a big
    allocation (a valid prefix may parse; whatever follows is read within its caps)."""
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(2)
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        try:
            while True:
                frame = wire.read_frame(b)
                wire.discard(b, frame.payload_len)
        except (wire.WireError, ConnectionError):
            pass
