"""The decode worker's calls to prefill workers (decode-driven disaggregation): one channel per address,
the cluster credential and trace context on every call, a failure blamed on the prefill worker."""

from __future__ import annotations

import grpc

from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving import tracing
from pdserve.serving.cluster_auth import method_name
from pdserve.serving.errors import RpcStatusError
from pdserve.serving.rpc import TlsConfig, channel
from pdserve.serving.worker import WorkerIdentity

PREFILL = method_name("Prefill", "Prefill")


class PrefillLegError(RpcStatusError):
    """The prefill worker this request was sent to failed; the router should blame it, not us."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(code, message, (("pdserve-failed-role", "prefill"),))


class PrefillClient:
    def __init__(self, identity: WorkerIdentity, kv_endpoint: str, tls: TlsConfig | None, timeout_s: float):
        self.identity = identity
        self.kv_endpoint = kv_endpoint
        self.tls = tls
        self.timeout_s = timeout_s
        self.stubs: dict[str, pb_grpc.PrefillStub] = {}

    def stub(self, address: str) -> pb_grpc.PrefillStub:
        stub = self.stubs.get(address)
        if stub is None:
            stub = self.stubs[address] = pb_grpc.PrefillStub(channel(address, self.tls))
        return stub

    async def prefill(self, rid: str, request: pb.DecodeRequest, block_ids: list[int]) -> pb.PrefillResponse:
        """Have ``request.prefill_address`` prefill ``request`` into our ``block_ids``."""
        credential = self.identity.credential
        try:
            return await self.stub(request.prefill_address).Prefill(
                pb.PrefillRequest(
                    request_id=rid, token_ids=request.token_ids, sampling=request.sampling,
                    priority=request.priority, num_prior_tokens=request.num_prior_tokens, lora_name=request.lora_name,
                    target=pb.KVTarget(endpoint=self.kv_endpoint, block_ids=block_ids, transfer_id=rid,
                                       worker_id=self.identity.worker_id),
                ),
                timeout=self.timeout_s,
                metadata=tracing.with_traceparent(credential.metadata(PREFILL, rid) if credential else None),
            )
        except grpc.aio.AioRpcError as e:
            raise PrefillLegError(e.code(), f"prefill worker {request.prefill_address}: {e.details()}") from None
