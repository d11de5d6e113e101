"""Liveness apart from drain, the router's preStop, and image tags that match the Dockerfiles' build lines."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.deploy.validate import ROOT, build
from pdserve.serving.rpc import LIVENESS, create_server, set_serving

DOCKER = Path(__file__).resolve().parents[2] / "deploy" / "docker"


def containers(tree: str) -> dict[str, dict]:
    docs = build(ROOT / tree) if tree == "base" else build(ROOT / "overlays" / tree)
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
            for d in docs if d["kind"] == "Deployment"}


def test_liveness_probes_a_name_no_drain_flips_and_readiness_the_role():
    for name, c in containers("base").items():
        assert c["livenessProbe"]["grpc"]["service"] == LIVENESS, name
        assert c["readinessProbe"]["grpc"]["service"].startswith("pdserve.v1."), name
        assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep", f"{name} has no preStop"


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_image_tags_match_the_dockerfile_build_lines(flavour):
    dockerfile = DOCKER / ("Dockerfile.cpu" if flavour == "cpu" else "Dockerfile.cuda")
    documented = re.search(r"docker build .*-t (\S+)", dockerfile.read_text().splitlines()[0]).group(1)
    for name, c in containers(flavour).items():
        assert c["image"] == documented, name


def test_a_drained_server_stays_live_while_readiness_flips():
    async def main():
        server, port, health = create_server("127.0.0.1:0", ["Decode"])
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)

                async def status(service: str):
                    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status

                await set_serving(health, ["Decode"], True)
                assert await status(LIVENESS) == health_pb2.HealthCheckResponse.SERVING
                assert await status("pdserve.v1.Decode") == health_pb2.HealthCheckResponse.SERVING
                await set_serving(health, ["Decode"], False)  # SIGTERM: drain begins
                assert await status(LIVENESS) == health_pb2.HealthCheckResponse.SERVING
                assert await status("pdserve.v1.Decode") == health_pb2.HealthCheckResponse.NOT_SERVING
                assert await status("") == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            await server.stop(None)

    asyncio.run(main())
