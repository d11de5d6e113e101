"""gRPC server reflection, v1 (what grpcurl and Postman try first) alongside v1alpha, on every server.

grpcio-reflection ships only ``grpc.reflection.v1alpha``. ``grpc.reflection.v1`` has the same messages (same
field numbers, only the package differs), so the same servicer answers both: v1 is registered as a generic
handler that decodes v1 requests with the v1alpha message classes. A grpcio-reflection that has ``v1`` is used
as it is.
"""

from __future__ import annotations

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME


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
        server.add_generic_rpc_handlers((_v1_handler(names),))
    reflection.enable_server_reflection(names, server)


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
