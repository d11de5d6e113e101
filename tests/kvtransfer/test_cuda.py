"""CUDA caches (run with ``-m gpu`` on a GPU machine): device-to-device transfers between two processes,
and the ``ready`` event the forward pass hands to ``push_layer``."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.kv_cache import KVCache, KVCacheSpec
from pdserve.kvtransfer import TransferError, make_receiver, make_sender
from tests.kvtransfer.helpers import (
    BLOCKS,
    BS,
    DIM,
    DST,
    HEADS,
    LAYERS,
    SRC,
    cfg,
    fingerprint,
    kill,
    push_all,
    recv,
    spawn,
)

pytestmark = pytest.mark.gpu


def cuda_cache(seed: int | None) -> KVCache:
    c = KVCache(KVCacheSpec(LAYERS, BLOCKS, BS, HEADS, DIM, torch.float32, "cuda"))
    if seed is not None:
        g = torch.Generator(device="cuda").manual_seed(seed)
        for layer in c.layers:
            layer.copy_(torch.randn(layer.shape, generator=g, device="cuda"))
    return c


def cuda_receiver_main(config, dst, conn) -> None:
    cache = cuda_cache(None)
    r = make_receiver(config, cache.layers, fingerprint())
    try:
        conn.send(r.start())
        r.expect("t", dst)
        try:
            stats = r.wait("t", 60)
            conn.send(("ok", stats.path, [layer.cpu() for layer in cache.layers]))
        except Exception as e:  # noqa: BLE001 - reported to the parent
            conn.send(("error", type(e).__name__, str(e)))
        conn.poll(10)
    finally:
        r.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend,path", [("tcp", "tcp"), ("ucx", "ucx"), ("nccl", "nccl")])
def test_cuda_blocks_arrive_bit_identical_across_processes(backend, path):
    c = cfg(backend, checksum=True, timeout_s=20.0)
    proc, pipe = spawn(cuda_receiver_main, c, DST)
    try:
        endpoint = recv(pipe, 60)
        src = cuda_cache(1)
        s = make_sender(c, src.layers, fingerprint())
        try:
            h = s.open("t", endpoint, DST)
            push_all(h)
            stats = h.finish(30)
        except TransferError as e:
            if backend == "nccl":  # NCCL refuses two ranks on one GPU; it must fail cleanly, not hang
                pytest.xfail(f"nccl with both ranks on one GPU: {e}")
            raise
        finally:
            s.close()
        status, rx_path, layers = recv(pipe, 60)
        assert (status, rx_path, stats.path) == ("ok", path, path)
        for layer in range(LAYERS):
            for a, b in zip(SRC, DST, strict=True):
                assert torch.equal(layers[layer][b], src.layers[layer][a].cpu())
            untouched = [b for b in range(BLOCKS) if b not in DST]
            assert not layers[layer][untouched].any()
        pipe.send("bye")
    finally:
        kill(proc)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["tcp", "ucx"])
def test_push_waits_for_the_ready_event(backend):
    """The sender thread reads a layer only after the kernel that wrote it finished."""
    c = cfg(backend, timeout_s=20.0)
    rx, src = cuda_cache(None), cuda_cache(None)
    r = make_receiver(c, rx.layers, fingerprint())
    s = make_sender(c, src.layers, fingerprint())
    try:
        ep = r.start()
        r.expect("t", DST)
        h = s.open("t", ep, DST)
        stream = torch.cuda.Stream()
        for layer in range(LAYERS):
            with torch.cuda.stream(stream):
                torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time before the layer is written
                src.layers[layer][SRC] = float(layer + 1)
                ready = torch.cuda.Event()
                ready.record(stream)
            h.push_layer(layer, SRC, DST, ready=ready)
        h.finish(30)
        r.wait("t", 30)
        for layer in range(LAYERS):
            assert bool((rx.layers[layer][DST] == layer + 1).all()), f"layer {layer} was read too early"
    finally:
        s.close()
        r.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend,path", [("tcp", "tcp"), ("nccl", "nccl")])
def test_cuda_transfer_over_the_channel_bound_handshake(backend, path):
    """With a cluster secret: the channel-bound, mutually authenticated handshake, across processes."""
    c = cfg(backend, checksum=True, timeout_s=20.0, secret="s3cret")
    proc, pipe = spawn(cuda_receiver_main, c, DST)
    try:
        endpoint = recv(pipe, 60)
        src = cuda_cache(1)
        s = make_sender(c, src.layers, fingerprint())
        try:
            h = s.open("t", endpoint, DST)
            push_all(h)
            stats = h.finish(30)
        except TransferError as e:
            if backend == "nccl":
                pytest.xfail(f"nccl with both ranks on one GPU: {e}")
            raise
        finally:
            s.close()
        status, rx_path, layers = recv(pipe, 60)
        assert (status, rx_path, stats.path) == ("ok", path, path)
        for layer in range(LAYERS):
            for a, b in zip(SRC, DST, strict=True):
                assert torch.equal(layers[layer][b], src.layers[layer][a].cpu())
        pipe.send("bye")
    finally:
        kill(proc)
