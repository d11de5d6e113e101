"""Cross-process receivers for transfer tests (spawned with multiprocessing)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import torch

from engine.kv_cache import KVCache, KVCacheSpec, LayoutFingerprint

LAYERS, BLOCKS, BS, HEADS, DIM = 4, 64, 16, 2, 8


def fingerprint(**over) -> LayoutFingerprint:
    base = dict(model_id="m", revision="r", num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM,
                block_size=BS, dtype="float32", hash_seed=0)
    base.update(over)
    return LayoutFingerprint(**base)


def spec(dtype=torch.float32) -> KVCacheSpec:
    return KVCacheSpec(LAYERS, BLOCKS, BS, HEADS, DIM, dtype, "cpu")


def filled_cache(seed: int, dtype=torch.float32) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    c = KVCache(spec(dtype))
    for layer in c.layers:
        layer.copy_(torch.randn(layer.shape, generator=g).to(dtype))
    return c


def receiver_main(cfg, dst, shared: bool, expect_transfer: str, wait_s: float, conn) -> None:
    """Child: start a receiver, send back its endpoint, wait for one transfer, send back the blocks."""
    from kvtransfer import make_receiver

    cache = KVCache(spec(), shared=shared)
    r = make_receiver(cfg, cache.layers, fingerprint(), cache.shm_path)
    try:
        conn.send(r.start())
        r.expect(expect_transfer, dst)
        try:
            stats = r.wait(expect_transfer, wait_s)
            conn.send(("ok", stats.path, [cache.layers[i].clone() for i in range(LAYERS)]))
        except Exception as e:  # noqa: BLE001 - reported to the parent
            conn.send(("error", type(e).__name__, str(e)))
        time.sleep(0.5)
    finally:
        r.close()
        cache.close()


def sender_main(cfg, endpoint: str, src, dst, hang_after_layers: int, conn) -> None:
    """Child: push some layers then hang (to be killed) or finish."""
    from kvtransfer import make_sender

    cache = filled_cache(1)
    s = make_sender(cfg, cache.layers, fingerprint())
    h = s.open("t", endpoint, dst)
    for layer in range(hang_after_layers):
        h.push_layer(layer, src, dst)
    conn.send("pushed")
    time.sleep(60)


def spawn(target, *args) -> tuple[mp.Process, object]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=target, args=(*args, child), daemon=True)
    p.start()
    return p, parent


def kill(p: mp.Process) -> None:
    if p.is_alive():
        os.kill(p.pid, 9)
    p.join(5)
