"""TLS / mTLS on every endpoint, API keys on the router: good clients succeed, each bad one is refused."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from pdserve.deploy.local import LocalCluster
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving.rpc import TlsConfig, channel

REQ = pb.GenerateRequest(prompt="hello tls", sampling=pb.SamplingParams(max_tokens=3))


def call(address, tls=None, key=None, req=REQ, admin=False):
    md = (("authorization", f"Bearer {key}"),) if key else None

    async def go():
        async with channel(address, tls) as ch:
            if admin:
                return await pb_grpc.AdminStub(ch).ListWorkers(pb.ListWorkersRequest(), timeout=10, metadata=md)
            return await pb_grpc.GenerationStub(ch).Complete(req, timeout=20, metadata=md)

    return asyncio.run(go())


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        fn()
    return err.value.code()


@pytest.fixture(scope="module")
def mtls_cluster(certs, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({"k-alice": "alice", "k-ops": "admin"}))
    tls = ["--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key"),
           "--tls-ca", str(certs / "ca.crt"), "--tls-server-name", "localhost"]
    # every process serves mTLS and talks mTLS to its peers (one cert per cluster keeps the test small)
    with LocalCluster(1, 1, extra_worker_args=tls, router_args=[*tls, "--api-keys", str(keys),
                                                                "--local-prefill-tokens", "0"]) as c:
        yield c


def test_mtls_and_api_keys(mtls_cluster, certs):
    addr = mtls_cluster.router_address
    good = TlsConfig(str(certs / "client.crt"), str(certs / "client.key"), str(certs / "ca.crt"), "localhost")
    out = call(addr, good, "k-alice")
    assert out.finish_reason and out.prefill_worker, "a good client goes through the disaggregated path"
    # TLS refusals
    assert code_of(lambda: call(addr, None, "k-alice")) == grpc.StatusCode.UNAVAILABLE  # plaintext to TLS
    no_client_cert = TlsConfig(ca=str(certs / "ca.crt"), server_name="localhost")
    assert code_of(lambda: call(addr, no_client_cert, "k-alice")) == grpc.StatusCode.UNAVAILABLE
    rogue = TlsConfig(str(certs / "rogue.crt"), str(certs / "rogue.key"), str(certs / "ca.crt"), "localhost")
    assert code_of(lambda: call(addr, rogue, "k-alice")) == grpc.StatusCode.UNAVAILABLE
    wrong_ca = TlsConfig(str(certs / "client.crt"), str(certs / "client.key"), str(certs / "rogue-ca.crt"),
                         "localhost")
    assert code_of(lambda: call(addr, wrong_ca, "k-alice")) == grpc.StatusCode.UNAVAILABLE
    # API-key refusals
    assert code_of(lambda: call(addr, good, None)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: call(addr, good, "nope")) == grpc.StatusCode.UNAUTHENTICATED
    other = pb.GenerateRequest(prompt="x", tenant="bob", sampling=pb.SamplingParams(max_tokens=2))
    assert code_of(lambda: call(addr, good, "k-alice", other)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: call(addr, good, "k-alice", admin=True)) == grpc.StatusCode.PERMISSION_DENIED
    assert len(call(addr, good, "k-ops", admin=True).workers) == 2
    # the workers refuse plaintext too
    for p in mtls_cluster.procs:
        if p.role == "decode":
            async def direct(p=p):
                async with channel(p.address) as ch:
                    await pb_grpc.DecodeStub(ch).GetLoad(pb.LoadRequest(), timeout=5)
            assert code_of(lambda direct=direct: asyncio.run(direct())) == grpc.StatusCode.UNAVAILABLE
    assert call(addr, good, "k-alice").finish_reason, "still serving after the refusals"


def test_bad_tls_config_is_a_clear_error(certs):
    with pytest.raises(ValueError, match="go together"):
        TlsConfig(cert=str(certs / "client.crt"))
    with pytest.raises(ValueError, match="does not exist"):
        TlsConfig(ca="/nonexistent.pem")
