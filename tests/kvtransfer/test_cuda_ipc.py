"""The same-host CUDA data plane (kvtransfer/cuda_ipc.py): handle encoding here, real transfers with -m gpu."""

from __future__ import annotations

import pytest
import torch

from pdserve.kvtransfer import cuda_ipc, make_receiver, make_sender
from tests.kvtransfer.helpers import DST, LAYERS, SRC, cfg, fingerprint, kill, push_all, recv, spawn


def test_handle_fields_round_trip_through_json_types():
    import json

    args = (torch.Tensor, torch.Size([4, 2]), (2, 1), 0, torch.UntypedStorage, torch.bfloat16, 0,
            b"\x00\xffhandle", 4096, 128, False, b"/torch_123_456", 7, None, True)
    wire_form = json.loads(json.dumps([cuda_ipc._encode(a) for a in args]))
    back = tuple(cuda_ipc._decode(v, i) for i, v in enumerate(wire_form))
    assert back[0] is torch.Tensor and back[4] is torch.UntypedStorage and back[5] is torch.bfloat16
    assert back[1] == (4, 2) and back[7] == b"\x00\xffhandle" and back[11] == b"/torch_123_456"
    assert back[13] is None and back[14] is True


@pytest.mark.parametrize("bad", [{"cls": "os.system"}, {"dtype": "not_a_dtype"}, {"weird": 1}, [1, 2]])
def test_decode_refuses_anything_but_a_tensor_reduction(bad):
    with pytest.raises(ValueError, match="cuda_ipc"):
        cuda_ipc._decode(bad, 3)


def test_cpu_caches_are_never_offered_or_opened():
    layers = [torch.zeros(4, 2, 2, 1, 8) for _ in range(2)]
    assert cuda_ipc.export_layers(layers) == {}
    assert cuda_ipc.open_layers({cuda_ipc.PATH: [[]] * 2}, layers) is None


# ---- real CUDA IPC between two processes -------------------------------------------------------------


def _cuda_layers(seed: int | None) -> list[torch.Tensor]:
    from tests.kvtransfer.test_cuda import cuda_cache

    return cuda_cache(seed).layers


def ipc_receiver_main(config, dst, conn) -> None:
    layers = _cuda_layers(None)
    r = make_receiver(config, layers, fingerprint())
    try:
        conn.send(r.start())
        r.expect("t", dst)
        try:
            stats = r.wait("t", 60)
            conn.send(("ok", stats.path, [layer.cpu() for layer in layers]))
        except Exception as e:  # noqa: BLE001 - reported to the parent
            conn.send(("error", type(e).__name__, str(e)))
        conn.poll(10)
    finally:
        r.close()


@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["tcp", "ucx"])
def test_cuda_ipc_copies_straight_into_the_receivers_cache(backend):
    c = cfg(backend, shm=True, timeout_s=20.0)
    proc, pipe = spawn(ipc_receiver_main, c, DST)
    try:
        endpoint = recv(pipe, 60)
        src = _cuda_layers(1)
        s = make_sender(c, src, fingerprint())
        try:
            h = s.open("t", endpoint, DST)
            push_all(h)
            stats = h.finish(30)
        finally:
            s.close()
        status, rx_path, layers = recv(pipe, 60)
        assert (status, rx_path, stats.path) == ("ok", cuda_ipc.PATH, cuda_ipc.PATH)
        for layer in range(LAYERS):
            for a, b in zip(SRC, DST, strict=True):
                assert torch.equal(layers[layer][b], src[layer][a].cpu())
            untouched = [b for b in range(layers[layer].shape[0]) if b not in DST]
            assert not layers[layer][untouched].any()
        pipe.send("bye")
    finally:
        kill(proc)


@pytest.mark.gpu
@pytest.mark.timeout(60)
def test_cuda_ipc_push_waits_for_the_ready_event():
    c = cfg("tcp", shm=True, timeout_s=20.0)
    rx, src = _cuda_layers(None), _cuda_layers(None)
    r = make_receiver(c, rx, fingerprint())
    s = make_sender(c, src, fingerprint())
    try:
        ep = r.start()
        r.expect("t", DST)
        h = s.open("t", ep, DST)
        stream = torch.cuda.Stream()
        for layer in range(LAYERS):
            with torch.cuda.stream(stream):
                torch.cuda._sleep(50_000_000)
                src[layer][SRC] = float(layer + 1)
                ready = torch.cuda.Event()
                ready.record(stream)
            h.push_layer(layer, SRC, DST, ready=ready)
        assert h.finish(30).path == cuda_ipc.PATH
        r.wait("t", 30)
        for layer in range(LAYERS):
            assert bool((rx[layer][DST] == layer + 1).all()), f"layer {layer} was read too early"
    finally:
        s.close()
        r.close()
