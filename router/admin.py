"""The Admin servicer: list workers with their load, drain and undrain, worker self-registration."""

from __future__ import annotations

from pdserve.engine.errors import InvalidRequestError
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.router.edge import load_to_proto
from pdserve.router.membership import ROLES, Membership, Worker
from pdserve.router.prefix_index import PrefixIndex
from pdserve.serving.errors import abort_with


def worker_status(w: Worker) -> pb.WorkerStatus:
    return pb.WorkerStatus(
        address=w.address,
        role=w.role,
        healthy=w.healthy,
        draining=w.draining or w.load.draining,
        load=load_to_proto(w.load),
        in_flight=w.in_flight,
        circuit_open=w.circuit_open,
    )


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, membership: Membership, index: PrefixIndex | None = None, generation=None):
        self.membership = membership
        self.index = index or PrefixIndex()
        self.generation = generation

    async def ListWorkers(self, request: pb.ListWorkersRequest, context) -> pb.ListWorkersResponse:
        out = pb.ListWorkersResponse()
        for w in sorted(self.membership.workers.values(), key=lambda w: (w.role, w.address)):
            status = worker_status(w)
            held = self.index.hashes_of(w.address)
            status.num_indexed_blocks = len(held)
            if request.include_index:
                status.indexed_block_hashes.extend(sorted(held))
            out.workers.append(status)
        if self.generation is not None:
            c, a = self.generation.counters, self.generation.admission
            out.router.CopyFrom(pb.RouterStats(
                requests=c.requests, retries=c.retries, migrations=c.migrations, cancelled=c.cancelled,
                local_prefills=c.local_prefills, failed=c.failed, rate_limited=a.num_rate_limited, shed=a.num_shed,
            ))
        return out

    async def Drain(self, request: pb.DrainRequest, context) -> pb.DrainResponse:
        return await self._set(request, context, True)

    async def Undrain(self, request: pb.DrainRequest, context) -> pb.DrainResponse:
        return await self._set(request, context, False)

    async def _set(self, request: pb.DrainRequest, context, draining: bool) -> pb.DrainResponse:
        try:
            worker = self.membership.get(request.address)
        except KeyError as e:
            await abort_with(context, e)
        worker.draining = draining
        return pb.DrainResponse(worker=worker_status(worker))

    async def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterResponse:
        if request.role not in ROLES:
            await abort_with(context, InvalidRequestError(f"role: must be one of {ROLES}"))
        if request.leaving:
            await self.membership.remove(request.address)
            return pb.RegisterResponse(accepted=True)
        try:
            worker = self.membership.register(request.address, request.role, request.ttl_s or 5.0)
        except ValueError as e:
            await abort_with(context, e)
        if not worker.healthy:
            await self.membership._poll(worker)
        return pb.RegisterResponse(accepted=True)
