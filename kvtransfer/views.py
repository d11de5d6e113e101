"""Byte views of KV blocks for the data planes: runs of blocks map to contiguous slices, never repacked."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pdserve.engine.kv_cache import block_runs


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def host_view(t: torch.Tensor) -> memoryview:
    """Bytes of ``t`` readable by the host: a view on CPU, a staged copy for CUDA tensors."""
    return byte_view(t.cpu() if t.is_cuda else t)


def pair_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, n) runs where both sides are consecutive."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def run_views(layer: torch.Tensor, block_ids: list[int]) -> list[torch.Tensor]:
    """One contiguous view of ``layer`` per run of consecutive ids, in ``block_ids`` order."""
    return [layer[start : start + n] for start, n in block_runs(block_ids)]


def is_one_run(block_ids: list[int]) -> bool:
    return bool(block_ids) and block_ids == list(range(block_ids[0], block_ids[0] + len(block_ids)))


PARALLEL_COPY_BYTES = 1 << 20  # runs at least this big are split across the copy pool


def copy_ways() -> int:
    """How many threads share one large host copy (the caller plus ``copy_ways() - 1`` pool workers)."""
    return max(1, min(4, os.cpu_count() or 1))


def byte_rows(layer: torch.Tensor) -> np.ndarray:
    """A host layer as a [num_blocks, block_bytes] uint8 array (a view, no copy)."""
    return layer.reshape(layer.shape[0], -1).view(torch.uint8).numpy()


def copy_bytes(dst: np.ndarray, src: np.ndarray, pool: ThreadPoolExecutor | None = None) -> None:
    """``dst[...] = src`` for same-shaped C-contiguous arrays: plain memcpy with the GIL released (numpy).
    A large copy is split into ``copy_ways()`` byte ranges, one done by the caller and the rest by ``pool``
    (which must have ``copy_ways() - 1`` workers). Unlike ``Tensor.copy_`` (OpenMP), this neither competes
    with the model's intra-op team nor stalls spin-waiting for it when the CPU is busy."""
    d, s = dst.reshape(-1), src.reshape(-1)
    if pool is None or d.size < PARALLEL_COPY_BYTES:
        np.copyto(d, s)
        return
    step = -(-d.size // copy_ways())
    futures = [pool.submit(np.copyto, d[i : i + step], s[i : i + step]) for i in range(step, d.size, step)]
    np.copyto(d[:step], s[:step])
    for f in futures:
        f.result()


STAGING_BYTES = 8 << 20  # pinned host buffer per connection for CUDA caches on the socket data plane


def staging_buffer() -> torch.Tensor:
    return torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)


def byte_chunks(t: torch.Tensor, chunk: int = STAGING_BYTES) -> list[torch.Tensor]:
    """Byte slices (views) of a contiguous tensor, each at most ``chunk`` bytes."""
    flat = t.reshape(-1).view(torch.uint8)
    return [flat[off : off + chunk] for off in range(0, flat.numel(), chunk)]
