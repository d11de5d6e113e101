"""The KV layout fingerprint: what two workers must agree on before KV moves between them (torch-free).

It travels in every KV handshake and in ``WorkerLoad``; a mismatch is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

DTYPE_BYTES = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1,
}


@dataclass(frozen=True, slots=True)
class LayoutFingerprint:
    """What two workers must agree on before KV moves between them."""

    model_id: str
    revision: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    hash_seed: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LayoutFingerprint:
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError) as e:
            raise ValueError(f"fingerprint: malformed layout fingerprint: {e}") from None

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def block_bytes(self) -> int:
        """Bytes of one block of one layer (K and V)."""
        itemsize = DTYPE_BYTES.get(self.dtype)
        if itemsize is None:
            raise ValueError(f"dtype: unknown KV dtype {self.dtype!r}")
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def diff(self, other: LayoutFingerprint) -> list[str]:
        a, b = asdict(self), asdict(other)
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]
