"""Reflection v1 (grpcurl's first try) and v1alpha on a pdserve server, called as raw streams."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from pdserve.serving.rpc import create_server


async def _ask(port: int, version: str, req: rpb.ServerReflectionRequest) -> rpb.ServerReflectionResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                request_serializer=rpb.ServerReflectionRequest.SerializeToString,
                                response_deserializer=rpb.ServerReflectionResponse.FromString)
        stream = call(iter([req]))
        return await stream.read()


def test_reflection_v1_and_v1alpha_list_services_and_describe():
    async def main():
        server, port, _ = create_server("127.0.0.1:0", ["Generation", "Admin"])
        await server.start()
        try:
            for version in ("v1", "v1alpha"):
                resp = await _ask(port, version, rpb.ServerReflectionRequest(list_services=""))
                names = {s.name for s in resp.list_services_response.service}
                assert {"pdserve.v1.Generation", "pdserve.v1.Admin", "grpc.health.v1.Health",
                        "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
                resp = await _ask(port, version, rpb.ServerReflectionRequest(file_containing_symbol="pdserve.v1.Generation"))
                assert resp.file_descriptor_response.file_descriptor_proto, version
                for name in sorted(names):  # what `grpcurl describe` does: every listed service resolves
                    resp = await _ask(port, version, rpb.ServerReflectionRequest(file_containing_symbol=name))
                    assert resp.WhichOneof("message_response") == "file_descriptor_response", (version, name)
                    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                             for b in resp.file_descriptor_response.file_descriptor_proto]
                    assert any(f"{f.package}.{s.name}" == name for f in files for s in f.service), (version, name)
        finally:
            await server.stop(None)

    asyncio.run(main())
