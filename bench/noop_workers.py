"""No-op prefill and decode workers: the full gRPC surface, zero compute. For measuring router overhead.

    python -m bench.noop_workers --role decode --port 0     # prints PDSERVE_READY decode HOST:PORT

``--role proxy --decode ADDR --prefill ADDR`` is the floor a router cannot beat: a ``Generation.Complete``
that forwards every request to ``Decode.Decode`` (naming the prefill worker) with no validation, routing,
metrics or failover -- the cost of one more grpc.aio hop and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio

from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving.rpc import channel, create_server, install_sigterm, set_serving

FINGERPRINT = pb.LayoutFingerprint(model_id="noop", revision="main", num_layers=1, num_kv_heads=1, head_dim=8,
                                   block_size=16, dtype="float32", hash_seed=0)


def _load(role: str, address: str) -> pb.WorkerLoad:
    return pb.WorkerLoad(worker_id=f"noop-{role}", role=role, address=address, num_total_blocks=1000,
                         num_free_blocks=1000, fingerprint=FINGERPRINT, kv_endpoint="noop://", vocab_size=32000,
                         max_model_len=100000, host="noop", device="cpu")


class NoopPrefill(pb_grpc.PrefillServicer):
    def __init__(self, address: str):
        self.address = address

    async def Prefill(self, request, context):
        return pb.PrefillResponse(first_token_id=7, worker_id="noop-prefill")

    async def GetLoad(self, request, context):
        return _load("prefill", self.address)

    async def KVEvents(self, request, context):
        yield pb.KVEventBatch(snapshot=True, seq=1)
        await asyncio.Event().wait()


class PassThrough(pb_grpc.GenerationServicer):
    """One extra gRPC hop and nothing else (see the module docstring)."""

    def __init__(self, decode: str, prefill: str):
        self.decode = pb_grpc.DecodeStub(channel(decode))
        self.prefill = prefill

    async def Complete(self, request, context):
        req = pb.DecodeRequest(request_id=request.request_id or "x", token_ids=request.token_ids,
                               sampling=request.sampling, prefill_address=self.prefill)
        out = pb.GenerateResponse()
        async for chunk in self.decode.Decode(req, timeout=10):
            out.token_ids.extend(chunk.token_ids)
            out.text += chunk.text
            out.finish_reason = chunk.finish_reason
        return out


class NoopDecode(pb_grpc.DecodeServicer):
    def __init__(self, address: str):
        self.address = address
        self.prefill_stubs: dict = {}

    async def Reserve(self, request, context):
        n = (len(request.token_ids) + 15) // 16
        return pb.ReserveResponse(block_ids=list(range(n)), kv_endpoint="noop://", transfer_id=request.request_id)

    async def Decode(self, request, context):
        if request.prefill_address:  # decode-driven prefill, like the real worker
            stub = self.prefill_stubs.get(request.prefill_address)
            if stub is None:
                stub = self.prefill_stubs[request.prefill_address] = pb_grpc.PrefillStub(channel(request.prefill_address))
            await stub.Prefill(pb.PrefillRequest(request_id=request.request_id, token_ids=request.token_ids), timeout=10)
        n = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 16
        for i in range(n):
            yield pb.DecodeChunk(token_ids=[7], text="x", finish_reason="length" if i == n - 1 else "")

    async def Release(self, request, context):
        return pb.ReleaseResponse(released=True)

    async def GetLoad(self, request, context):
        return _load("decode", self.address)

    async def KVEvents(self, request, context):
        yield pb.KVEventBatch(snapshot=True, seq=1)
        await asyncio.Event().wait()


async def serve(role: str, addr: str, decode: str = "", prefill: str = "") -> None:
    name = {"prefill": "Prefill", "decode": "Decode", "proxy": "Generation"}[role]
    server, port, health = create_server(addr, [name])
    address = f"{addr.rsplit(':', 1)[0]}:{port}"
    if role == "prefill":
        pb_grpc.add_PrefillServicer_to_server(NoopPrefill(address), server)
    elif role == "decode":
        pb_grpc.add_DecodeServicer_to_server(NoopDecode(address), server)
    else:
        pb_grpc.add_GenerationServicer_to_server(PassThrough(decode, prefill), server)
    await server.start()
    await set_serving(health, [name], True)
    print(f"PDSERVE_READY {role} {address}", flush=True)
    stop = asyncio.Event()
    install_sigterm(stop)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=["prefill", "decode", "proxy"], required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--decode", default="", help="proxy: the decode worker to forward to")
    ap.add_argument("--prefill", default="", help="proxy: the prefill worker to name")
    a = ap.parse_args()
    if a.role == "proxy" and not (a.decode and a.prefill):
        ap.error("--role proxy needs --decode and --prefill")
    coro = serve(a.role, f"{a.host}:{a.port}", a.decode, a.prefill)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    main()
