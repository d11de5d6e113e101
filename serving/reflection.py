"""gRPC server reflection, v1 (what grpcurl and Postman try first) alongside v1alpha, on every server.

grpcio-reflection ships only ``grpc.reflection.v1alpha``. ``grpc.reflection.v1`` has the same messages (same
field numbers, only the package differs), so the same servicer answers both: v1 is registered as a generic
handler that decodes v1 requests with the v1alpha message classes. A grpcio-reflection that has ``v1`` is used
as it is.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
V1_FILE_NAME = "grpc/reflection/v1/reflection.proto"


def enable_reflection(service_names: list[str], server: grpc.aio.Server) -> None:
    """Reflection v1 and v1alpha for ``service_names`` (full names) on ``server``; both list each other."""
    names = [*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME]
    try:
        from grpc_reflection.v1 import reflection as v1  # type: ignore[import-not-found]
    except ImportError:
        v1 = None
    if v1 is not None:
        v1.enable_server_reflection(names, server)
    else:
        _add_v1_descriptor()
        server.add_generic_rpc_handlers((_v1_handler(names),))
    reflection.enable_server_reflection(names, server)


def _add_v1_descriptor() -> None:
    """v1's file in the default pool (v1alpha's, package renamed), so a client that lists the services and then
    describes each one (``grpcurl describe``) finds ``grpc.reflection.v1.ServerReflection`` too."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE_NAME)
        return
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    old_pkg = fdp.package
    fdp.name, fdp.package = V1_FILE_NAME, "grpc.reflection.v1"
    for msg in fdp.message_type:
        for field in msg.field:
            if field.type_name:
                field.type_name = field.type_name.replace(f".{old_pkg}.", ".grpc.reflection.v1.")
    for service in fdp.service:
        for method in service.method:
            method.input_type = method.input_type.replace(f".{old_pkg}.", ".grpc.reflection.v1.")
            method.output_type = method.output_type.replace(f".{old_pkg}.", ".grpc.reflection.v1.")
    pool.Add(fdp)


def _v1_handler(names: list[str]) -> grpc.GenericRpcHandler:
    servicer = _async_servicer(names)
    return grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    })


def _async_servicer(names: list[str]):
    # the aio servicer that enable_server_reflection picks for an aio server
    from grpc_reflection.v1alpha import _async

    return _async.ReflectionServicer(names)
