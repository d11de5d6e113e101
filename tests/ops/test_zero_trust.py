"""Issue 15, the cluster plane, from the attacker's side: raw gRPC on every port, reused ids, floods.

Every test here talks to real processes through their public wire only (raw gRPC, the ``pdserve`` CLI), and
mints cluster tokens by hand from the documented format (pdserve.serving.cluster_auth), so the module runs
unchanged against an older checkout; each test fails there. Holes: 1 (worker ports trust anyone), 2 (Release
and a reused request_id hang a live stream), 6 (one client stalls everyone; unbounded fields), 8 (no overload
limit by default); holes 4 and 5 (the CLI: ``pdserve up --api-keys``, self-registration) are in
test_zero_trust_cli.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from pdserve.deploy.local import LocalCluster
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from tests.ops.zero_trust_helpers import (
    KEYS,
    PROMPT,
    SECRET,
    START_S,
    greedy,
    key,
    method,
    run,
    status_of,
    stream_status,
    token,
)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("zt") / "keys.json"
    path.write_text(json.dumps(KEYS))
    return path


@pytest.fixture(scope="module")
def cluster(keys_file):
    """1 prefill + 1 decode with a known cluster secret, two sequences per step (an admission bound of 4), a slow
    step (streams last), and a router with API keys."""
    with LocalCluster(1, 1, extra_worker_args=["--max-num-seqs", "2", "--debug-step-delay-ms", "20"],
                      router_args=["--api-keys", str(keys_file), "--local-prefill-tokens", "0"],
                      env={"PDSERVE_CLUSTER_SECRET": SECRET}, ready_timeout_s=START_S) as c:
        yield c


def decode_addr(c: LocalCluster) -> str:
    return c.workers("decode")[0].address


# ---- hole 1: worker ports trust anyone ---------------------------------------------------------------
def test_hole1_worker_rpcs_refuse_callers_without_the_cluster_credential(cluster):
    d, p = decode_addr(cluster), cluster.workers("prefill")[0].address

    async def go():
        async with grpc.aio.insecure_channel(d) as dch, grpc.aio.insecure_channel(p) as pch:
            dec, pre = pb_grpc.DecodeStub(dch), pb_grpc.PrefillStub(pch)
            req = pb.DecodeRequest(request_id="steal", token_ids=PROMPT, sampling=greedy(4))
            out = {
                "Decode": (await stream_status(dec.Decode(req, timeout=15)))[0],
                "Reserve": await status_of(dec.Reserve(pb.ReserveRequest(request_id="hog", token_ids=PROMPT * 40),
                                                       timeout=15)),
                "Release": await status_of(dec.Release(pb.ReleaseRequest(request_id="x"), timeout=15)),
                "GetLoad": await status_of(dec.GetLoad(pb.LoadRequest(), timeout=15)),
                "KVEvents": (await stream_status(dec.KVEvents(pb.KVEventsRequest(), timeout=3)))[0],
                "Prefill": await status_of(pre.Prefill(pb.PrefillRequest(request_id="p", token_ids=PROMPT), timeout=15)),
                "Prefill.GetLoad": await status_of(pre.GetLoad(pb.LoadRequest(), timeout=15)),
            }
            m = method("Decode", "Decode")
            forged = {  # tokens that are not good for this call
                "wrong secret": token(m, "steal", secret="guess"),
                "expired": token(m, "steal", expiry_ms=int((time.time() - 5) * 1000)),
                "other method": token(method("Decode", "GetLoad")),
                "other request": token(m, "someone-else"),
                "garbage": (("pdserve-cluster-token", "v1.x.1.y"),),
            }
            for name, md in forged.items():
                out[name] = (await stream_status(dec.Decode(req, timeout=15, metadata=md)))[0]
            good = pb.DecodeRequest(request_id="legit", token_ids=PROMPT, sampling=greedy(2))
            out["legit"] = (await stream_status(dec.Decode(good, timeout=30, metadata=token(m, "legit"))))[0]
            return out

    out = run(go())
    legit = out.pop("legit")
    assert out == dict.fromkeys(out, grpc.StatusCode.UNAUTHENTICATED), out
    assert legit == grpc.StatusCode.OK, "a holder of the cluster secret is served"


def test_hole1_a_worker_on_a_public_address_without_a_secret_does_not_start():
    env = {k: v for k, v in os.environ.items() if k != "PDSERVE_CLUSTER_SECRET"}
    proc = subprocess.Popen([sys.executable, "-m", "pdserve", "decode", "--host", "0.0.0.0", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"a decode worker on 0.0.0.0 without PDSERVE_CLUSTER_SECRET is serving:\n{out[-2000:]}")
    assert proc.returncode == 2 and "PDSERVE_CLUSTER_SECRET" in out, out


def test_hole1_k8s_manifests_take_the_secret_from_a_secret_for_every_process():
    import yaml

    base = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "base"
    for name in ("router", "prefill", "decode"):
        docs = [d for d in yaml.safe_load_all((base / f"{name}.yaml").read_text()) if d and d["kind"] == "Deployment"]
        env = {e["name"]: e for e in docs[0]["spec"]["template"]["spec"]["containers"][0].get("env", [])}
        ref = env.get("PDSERVE_CLUSTER_SECRET", {}).get("valueFrom", {}).get("secretKeyRef")
        assert ref and ref["name"] == "pdserve-cluster" and not ref.get("optional"), (name, env)


# ---- hole 2: Release and a reused request_id hang a live stream ---------------------------------------
def test_hole2_a_reused_request_id_never_touches_the_request_that_has_it(cluster):
    async def go():
        async with grpc.aio.insecure_channel(cluster.router_address) as ch:
            stub = pb_grpc.GenerationStub(ch)
            first = stub.Generate(pb.GenerateRequest(request_id="shared", token_ids=PROMPT, sampling=greedy(60)),
                                  timeout=25, metadata=key("k-alice"))
            head = await first.read()  # in flight
            reuse = [pb.GenerateRequest(request_id="shared", token_ids=PROMPT[:20], sampling=greedy(2)),
                     pb.GenerateRequest(request_id="shared", prompt="hello", sampling=greedy(2))]
            others = [await stream_status(stub.Generate(r, timeout=25, metadata=key(k)))
                      for r, k in zip(reuse, ("k-bob", "k-alice"), strict=True)]
            code, rest = await stream_status(first)
            return head, code, rest, others

    head, code, rest, others = run(go())
    assert code == grpc.StatusCode.OK, f"the first request ended with {code.name}"
    assert sum(len(m.token_ids) for m in [head, *rest]) == 60 and rest[-1].finish_reason == "length"
    assert {m.request_id for m in [head, *rest]} == {"shared"}, "the client's id is echoed"
    for other_code, msgs in others:  # served on their own (the router gives each request its own id)
        assert other_code == grpc.StatusCode.OK and msgs[-1].finish_reason == "length"


def test_hole2_release_only_by_the_owner_and_it_ends_the_stream_with_a_status(cluster):
    d = decode_addr(cluster)
    m_decode, m_release = method("Decode", "Decode"), method("Decode", "Release")

    async def go():
        async with grpc.aio.insecure_channel(d) as ch:
            stub = pb_grpc.DecodeStub(ch)
            a = pb.DecodeRequest(request_id="owned", token_ids=PROMPT, sampling=greedy(60))
            call = stub.Decode(a, timeout=25, metadata=token(m_decode, "owned", principal="orchestrator-a"))
            await call.read()
            # an insider with the cluster secret but not the owner; then an outsider without it
            intruder = await status_of(stub.Release(pb.ReleaseRequest(request_id="owned"), timeout=10,
                                                    metadata=token(m_release, "owned", principal="intruder")))
            outsider = await status_of(stub.Release(pb.ReleaseRequest(request_id="owned"), timeout=10))
            code, rest = await stream_status(call)
            # the owner's own Release of a live stream ends it at once, with a status
            b = pb.DecodeRequest(request_id="mine", token_ids=PROMPT, sampling=greedy(200))
            call_b = stub.Decode(b, timeout=25, metadata=token(m_decode, "mine", principal="orchestrator-a"))
            await call_b.read()
            released = await stub.Release(pb.ReleaseRequest(request_id="mine"), timeout=10,
                                          metadata=token(m_release, "mine", principal="orchestrator-a"))
            t0 = time.monotonic()
            code_b, _ = await stream_status(call_b)
            return intruder, outsider, code, rest, released, code_b, time.monotonic() - t0

    intruder, outsider, code, rest, released, code_b, ended_s = run(go())
    assert intruder == grpc.StatusCode.NOT_FOUND and outsider == grpc.StatusCode.UNAUTHENTICATED
    assert code == grpc.StatusCode.OK and rest[-1].finish_reason == "length", "the owner's stream was untouched"
    assert released.released
    assert code_b == grpc.StatusCode.CANCELLED and ended_s < 5, f"released stream: {code_b.name} after {ended_s:.1f}s"


# ---- hole 6: one client stalls everyone --------------------------------------------------------------
def test_hole6_huge_prompts_do_not_stall_small_requests_and_fields_are_bounded(cluster):
    huge = "The quick brown fox jumps over the lazy dog. " * (4 * 1024 * 1024 // 45)

    async def small(stub) -> float:
        t0 = time.monotonic()
        await stub.Complete(pb.GenerateRequest(prompt="hi there", sampling=greedy(1)), timeout=60,
                            metadata=key("k-alice"))
        return time.monotonic() - t0

    async def go():
        async with grpc.aio.insecure_channel(cluster.router_address) as ch:
            stub = pb_grpc.GenerationStub(ch)
            for _ in range(3):
                await small(stub)
            big = [asyncio.ensure_future(status_of(stub.Complete(pb.GenerateRequest(prompt=huge), timeout=60,
                                                                 metadata=key("k-bob")))) for _ in range(4)]
            during = []  # at least 3 small requests, however fast the huge ones are refused (often within 50 ms)
            while (len(during) < 3 or not all(b.done() for b in big)) and len(during) < 40:
                during.append(await small(stub))
            big_codes = await asyncio.gather(*big)
            bad = {}
            for name, req in {
                "stop_token_ids": pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(
                    stop_token_ids=[5] * 5_000_000)),
                "token_ids": pb.GenerateRequest(token_ids=[5] * (1024 * 1024 + 1)),
                "stop": pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(stop=["s"] * 17)),
                "session_id": pb.GenerateRequest(prompt="x", session_id="s" * 300),
            }.items():
                try:
                    await stub.Complete(req, timeout=30, metadata=key("k-alice"))
                    bad[name] = ("OK", "")
                except grpc.aio.AioRpcError as e:
                    bad[name] = (e.code().name, e.details())
            return during, big_codes, bad

    during, big_codes, bad = run(go(), timeout=300)
    assert set(big_codes) == {grpc.StatusCode.INVALID_ARGUMENT}, big_codes
    assert during and max(during) < 2.0, f"small requests took up to {max(during):.2f}s next to 4 MB prompts"
    assert bad["stop_token_ids"][0] == "INVALID_ARGUMENT" and "256" in bad["stop_token_ids"][1], bad
    assert bad["token_ids"][0] == "INVALID_ARGUMENT" and "1048576" in bad["token_ids"][1], bad
    assert bad["stop"][0] == "INVALID_ARGUMENT" and "16" in bad["stop"][1], bad
    assert bad["session_id"][0] == "INVALID_ARGUMENT" and "256" in bad["session_id"][1], bad


# ---- hole 8: no overload limit by default ------------------------------------------------------------
def test_hole8_a_burst_past_capacity_is_refused_at_once_with_a_retry_hint(cluster):
    async def one(stub, i):
        t0 = time.monotonic()
        call = stub.Generate(pb.GenerateRequest(token_ids=PROMPT, sampling=greedy(32)), timeout=6,
                             metadata=key("k-alice"))
        code, msgs = await stream_status(call)
        trailers = dict(await call.trailing_metadata() or ())
        return code, time.monotonic() - t0, trailers.get("retry-after-ms")

    async def go():
        async with grpc.aio.insecure_channel(cluster.router_address) as ch:
            stub = pb_grpc.GenerationStub(ch)
            burst = await asyncio.gather(*(one(stub, i) for i in range(40)))
            after = await one(stub, -1)  # the burst is over: an idle cluster admits at once, before any poll
            return burst, after

    burst, after = run(go(), timeout=120)
    codes = [c for c, _, _ in burst]
    refused = [(t, hint) for c, t, hint in burst if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert grpc.StatusCode.DEADLINE_EXCEEDED not in codes, [c.name for c in codes]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, [c.name for c in codes]
    assert codes.count(grpc.StatusCode.OK) >= 4 and len(refused) >= 20, [c.name for c in codes]
    assert all(hint and int(hint) > 0 for _, hint in refused) and max(t for t, _ in refused) < 2.0, refused
    assert after[0] == grpc.StatusCode.OK, after
