"""Shared layout, caches and cross-process peers for the transfer tests (spawned with multiprocessing)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time

import pytest
import torch

from pdserve.engine.kv_cache import KVCache, KVCacheSpec, LayoutFingerprint
from pdserve.kvtransfer import TransferConfig

LAYERS, BLOCKS, BS, HEADS, DIM = 4, 64, 16, 2, 8
SRC = [5, 6, 7, 20, 3, 40, 41, 2]  # non-contiguous, out of order
DST = [10, 11, 12, 33, 34, 50, 9, 60]

# (backend, allow_shm, expected stats.path)
PATHS = [
    pytest.param("tcp", True, "shm", id="tcp-shm"),
    pytest.param("tcp", False, "tcp", id="tcp-stream"),
    pytest.param("nccl", False, "gloo", id="nccl-gloo"),
    pytest.param("ucx", False, "ucx", id="ucx"),
]


def cfg(backend: str, shm: bool = False, **kw) -> TransferConfig:
    return TransferConfig(backend=backend, allow_shm=shm, timeout_s=kw.pop("timeout_s", 5.0), **kw)


def fingerprint(**over) -> LayoutFingerprint:
    base = dict(model_id="m", revision="r", num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM,
                block_size=BS, dtype="float32", hash_seed=0)
    base.update(over)
    return LayoutFingerprint(**base)


def spec(dtype=torch.float32) -> KVCacheSpec:
    return KVCacheSpec(LAYERS, BLOCKS, BS, HEADS, DIM, dtype, "cpu")


def filled_cache(seed: int, dtype=torch.float32, shared: bool = False) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    c = KVCache(spec(dtype), shared=shared)
    for layer in c.layers:
        layer.copy_(torch.randn(layer.shape, generator=g).to(dtype))
    return c


def push_all(handle, src=SRC, dst=DST, layers=range(LAYERS)) -> None:
    for layer in layers:
        handle.push_layer(layer, src, dst)


def assert_landed(dst_layers, src_layers, src=SRC, dst=DST) -> None:
    """Destination blocks are bit-identical to the sources, and no other block was written."""
    untouched = [b for b in range(BLOCKS) if b not in dst]
    for layer in range(LAYERS):
        for s, d in zip(src, dst, strict=True):
            assert torch.equal(dst_layers[layer][d], src_layers[layer][s]), f"layer {layer} block {d} differs"
        assert not dst_layers[layer][untouched].any(), f"layer {layer}: blocks outside the transfer written"


def receiver_main(config, dst, shared: bool, transfer_id: str, wait_s: float, conn) -> None:
    """Child: start a receiver, send back (endpoint, shm path), wait for one transfer, send back the
    result and the cache, then wait for the parent's word."""
    from pdserve.kvtransfer import make_receiver

    cache = KVCache(spec(), shared=shared)
    r = make_receiver(config, cache.layers, fingerprint(), cache.shm_path)
    try:
        conn.send((r.start(), cache.shm_path))
        r.expect(transfer_id, dst)
        try:
            stats = r.wait(transfer_id, wait_s)
            conn.send(("ok", stats.path, [layer.clone() for layer in cache.layers]))
        except Exception as e:  # noqa: BLE001 - reported to the parent
            conn.send(("error", type(e).__name__, str(e)))
        conn.poll(10)
    finally:
        r.close()
        cache.close()


def sender_main(config, endpoint: str, src, dst, num_layers: int, conn) -> None:
    """Child: push some layers, report, then hang until killed."""
    from pdserve.kvtransfer import make_sender

    cache = filled_cache(1)
    s = make_sender(config, cache.layers, fingerprint())
    h = s.open("t", endpoint, dst)
    for layer in range(num_layers):
        h.push_layer(layer, src, dst)
    conn.send("pushed")
    time.sleep(60)


def spawn(target, *args) -> tuple[mp.Process, object]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=target, args=(*args, child), daemon=True)
    p.start()
    return p, parent


def recv(pipe, timeout: float = 30.0):
    if not pipe.poll(timeout):
        raise TimeoutError("child process did not answer")
    return pipe.recv()


def kill(p: mp.Process, shm_path: str | None = None) -> None:
    """kill -9 a child (if alive) and remove the shared cache file it can no longer remove itself."""
    if p.is_alive():
        os.kill(p.pid, 9)
    p.join(5)
    if shm_path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(shm_path)
