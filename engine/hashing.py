"""Chained block hashes, stable across processes and machines.

h_i = H(seed || h_{i-1} || token ids of block i || extra keys), over full blocks only.
H is BLAKE2b-64 keyed with the hash seed; Python's hash() is never used.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT_HASH = 0
_ADAPTER_TAG = b"\x00lora\x00"


def adapter_extra(lora_name: str | None) -> bytes:
    """The ``extra`` key of every block hash of a request run under LoRA adapter ``lora_name``.

    b"" for the base model (its hashes are unchanged); otherwise a tag plus the name, so KV computed under one
    adapter never matches another adapter's or the base's. The engine and the router's prefix index both use it.
    """
    if not lora_name:
        return b""
    return _ADAPTER_TAG + lora_name.encode("utf-8")


def hash_block(parent: int, token_ids: Sequence[int], seed: int = 0, extra: bytes = b"") -> int:
    h = hashlib.blake2b(digest_size=8, key=struct.pack("<q", seed))
    h.update(struct.pack("<Q", parent))
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    if extra:
        h.update(extra)
    return int.from_bytes(h.digest(), "little")


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    seed: int = 0,
    extra: bytes = b"",
    start: list[int] | None = None,
) -> list[int]:
    """Hashes of every full block of ``token_ids``. ``start`` extends a chain already computed."""
    hashes = list(start or [])
    parent = hashes[-1] if hashes else ROOT_HASH
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], seed, extra)
        hashes.append(parent)
    return hashes
