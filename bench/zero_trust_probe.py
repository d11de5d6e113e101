"""Issue 15's cluster-plane attacks, measured: a burst past capacity, a reused request id, Release by another
caller and by the owner. Public wire only, cluster tokens made by hand from the documented format
(pdserve.serving.cluster_auth), so the same script measures an older checkout too.

    python -m pdserve.bench.zero_trust_probe        # a local cluster: 1 prefill, 1 decode (2 seqs/step, 20 ms steps)

Prints one JSON object: the burst's statuses (count, median and max seconds) and retry hints, whether a request
right after the burst is admitted, how the first of two requests sharing a ``request_id`` ended, and how a live
stream ends after a Release by another principal and by its owner.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import grpc

from pdserve.deploy.local import LocalCluster
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc

SECRET = "zero-trust-probe"
PROMPT = [(7 * i + 3) % 200 + 10 for i in range(40)]


def token(method: str, binding: str, principal: str) -> tuple[tuple[str, str], ...]:
    key = hmac.new(SECRET.encode(), b"pdserve/rpc/token/v1", hashlib.sha256).digest()
    exp = int((time.time() + 30) * 1000)
    mac = hmac.digest(key, f"v1|{method}|{binding}|{principal}|{exp}".encode(), "sha256")
    return (("pdserve-cluster-token", f"v1.{principal}.{exp}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"),)


def greedy(n: int) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


async def drain(call) -> tuple[str, int, float]:
    """(status, tokens, seconds) of a stream read to its end."""
    t0, n = time.monotonic(), 0
    try:
        while (m := await call.read()) is not grpc.aio.EOF:
            n += len(m.token_ids)
    except grpc.aio.AioRpcError as e:
        return e.code().name, n, time.monotonic() - t0
    return "OK", n, time.monotonic() - t0


async def one(stub, timeout_s: float) -> tuple[str, float, str | None]:
    call = stub.Generate(pb.GenerateRequest(token_ids=PROMPT, sampling=greedy(32)), timeout=timeout_s)
    code, _, seconds = await drain(call)
    return code, seconds, dict(await call.trailing_metadata() or ()).get("retry-after-ms")


async def probe(router: str, decode: str) -> dict:
    out: dict = {}
    async with grpc.aio.insecure_channel(router) as ch:
        stub = pb_grpc.GenerationStub(ch)
        await one(stub, 30)
        burst = await asyncio.gather(*(one(stub, 6) for _ in range(40)))
        by_code: dict[str, list[float]] = {}
        for code, seconds, _ in burst:
            by_code.setdefault(code, []).append(seconds)
        out["burst_of_40_at_6s"] = {c: {"n": len(s), "median_s": round(sorted(s)[len(s) // 2], 3),
                                        "max_s": round(max(s), 3)} for c, s in by_code.items()}
        out["retry_after_ms"] = sorted({h for _, _, h in burst if h})
        out["right_after_the_burst"] = (await one(stub, 30))[0]
        first = stub.Generate(pb.GenerateRequest(request_id="shared", token_ids=PROMPT, sampling=greedy(60)),
                              timeout=25)
        await first.read()
        second = await drain(stub.Generate(pb.GenerateRequest(request_id="shared", token_ids=PROMPT[:20],
                                                              sampling=greedy(2)), timeout=25))
        code, n, seconds = await drain(first)
        out["reused_request_id"] = {"first": [code, n + 1, round(seconds, 2)], "second": second[0]}
    async with grpc.aio.insecure_channel(decode) as ch:
        stub = pb_grpc.DecodeStub(ch)
        m_decode, m_release = "/pdserve.v1.Decode/Decode", "/pdserve.v1.Decode/Release"
        for who in ("intruder", "orch"):
            rid = f"live-{who}"
            call = stub.Decode(pb.DecodeRequest(request_id=rid, token_ids=PROMPT, sampling=greedy(200)), timeout=10,
                               metadata=token(m_decode, rid, "orch"))
            await call.read()
            try:
                await stub.Release(pb.ReleaseRequest(request_id=rid), timeout=10, metadata=token(m_release, rid, who))
                release = "OK"
            except grpc.aio.AioRpcError as e:
                release = e.code().name
            code, n, seconds = await drain(call)
            out[f"release_by_{who}"] = {"release": release, "stream": code, "tokens_after": n,
                                        "stream_ended_after_s": round(seconds, 3)}
    return out


def main() -> int:
    with LocalCluster(1, 1, extra_worker_args=["--max-num-seqs", "2", "--debug-step-delay-ms", "20"],
                      router_args=["--local-prefill-tokens", "0"], env={"PDSERVE_CLUSTER_SECRET": SECRET}) as c:
        print(json.dumps(asyncio.run(probe(c.router_address, c.workers("decode")[0].address)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
