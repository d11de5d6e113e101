"""Paged KV cache tensors and block hand-off views for the transfer layer.

Layout: one contiguous tensor per layer, shaped [num_blocks, 2, block_size, num_kv_heads, head_dim]
(2 = K, V). Block ``b`` of layer ``l`` is ``caches[l][b]``: one contiguous region holding both K and V,
so a list of block ids maps to views (a run of consecutive ids is a single slice) with no repacking.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import torch

from pdserve.engine.layout import LayoutFingerprint  # noqa: F401  (the cache's layout, re-exported)


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: str

    def layer_shape(self) -> tuple[int, ...]:
        return (self.num_blocks, 2, self.block_size, self.num_kv_heads, self.head_dim)

    def layer_bytes(self) -> int:
        n = 1
        for d in self.layer_shape():
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


SHM_PREFIX = "/dev/shm/pdserve-kv-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_shm(prefix: str = SHM_PREFIX) -> list[str]:
    """Unlink shared KV cache files whose owning process is gone (a SIGKILLed worker cannot clean up after
    itself). The owner's pid is in the name; a live pid, even a reused one, keeps its file. Returns the paths
    removed."""
    folder, stem = os.path.split(prefix)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        pid_text = name[len(stem):].split("-", 1)[0] if name.startswith(stem) else ""
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            path = os.path.join(folder, name)
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


class KVCache:
    """Owns the per-layer cache tensors.

    On CPU every layer is a view of one tensor, in order (the native decode step writes all layers' new K/V
    with one op); ``shared=True`` (CPU only) backs that tensor with one file in /dev/shm so a transfer peer on
    the same host can map it and write blocks directly (the host analogue of CUDA IPC).
    """

    def __init__(self, spec: KVCacheSpec, shared: bool = False):
        self.spec = spec
        self.shm_path: str | None = None
        if shared:
            if spec.device != "cpu":
                raise ValueError("shared: shared-memory KV caches are CPU only")
            sweep_stale_shm()
            self.shm_path = f"{SHM_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            flat = torch.from_file(self.shm_path, shared=True, size=self._numel(), dtype=spec.dtype)
            flat.zero_()
            self.layers = self._split(flat)
        elif torch.device(spec.device).type == "cpu":  # one storage: a decode step writes every layer's K/V in one op
            self.layers = self._split(torch.zeros(self._numel(), dtype=spec.dtype))
        else:
            self.layers = [
                torch.zeros(spec.layer_shape(), dtype=spec.dtype, device=spec.device)
                for _ in range(spec.num_layers)
            ]

    def _numel(self) -> int:
        """Elements of every layer together."""
        return self.spec.layer_bytes() // torch.empty((), dtype=self.spec.dtype).element_size() * self.spec.num_layers

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """One tensor's consecutive slices, one per layer, in the layer shape."""
        return [chunk.view(self.spec.layer_shape()) for chunk in flat.chunk(self.spec.num_layers)]

    def close(self) -> None:
        if self.shm_path:
            try:
                os.unlink(self.shm_path)
            except FileNotFoundError:
                pass
            self.shm_path = None

    def __del__(self) -> None:  # best effort; close() is the contract
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def block_runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """Split block ids into (start, length) runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def export_block_views(layer_cache: torch.Tensor, block_ids: list[int]) -> list[torch.Tensor]:
    """Views (no copies) of ``block_ids`` in one layer, one contiguous view per run of consecutive ids."""
    return [layer_cache[start : start + n] for start, n in block_runs(block_ids)]


def import_blocks(layer_cache: torch.Tensor, block_ids: list[int], data: torch.Tensor) -> None:
    """Write ``data`` ([len(block_ids), 2, bs, heads, dim]) into ``block_ids`` of one layer."""
    if data.shape[0] != len(block_ids) or tuple(data.shape[1:]) != tuple(layer_cache.shape[1:]):
        raise ValueError(
            f"import_blocks: data shape {tuple(data.shape)} does not fit {len(block_ids)} blocks"
        )
    offset = 0
    for start, n in block_runs(block_ids):
        layer_cache[start : start + n].copy_(data[offset : offset + n])
        offset += n
