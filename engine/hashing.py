"""Chained block hashes, stable across processes and machines.

h_i = H(seed || h_{i-1} || token ids of block i || extra keys), over full blocks only.
H is BLAKE2b-64 keyed with the hash seed; Python's hash() is never used.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT_HASH = 0


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
