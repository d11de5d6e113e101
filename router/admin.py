"""The Admin servicer: list workers with their load, drain and undrain, worker self-registration; list models,
load and unload LoRA adapters (router.adapters)."""

from __future__ import annotations

from pdserve.engine.errors import InvalidRequestError
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.router.adapters import AdapterAdmin
from pdserve.router.edge import load_to_proto
from pdserve.router.membership import ROLES, Membership, Worker
from pdserve.router.models import ADAPTER, BASE, ROUTE, ModelEntry
from pdserve.router.prefix_index import PrefixIndex
from pdserve.serving.errors import abort_with

KINDS = {BASE: pb.MODEL_KIND_BASE, ADAPTER: pb.MODEL_KIND_ADAPTER, ROUTE: pb.MODEL_KIND_ROUTE}


def model_entry(e: ModelEntry) -> pb.ModelEntry:
    return pb.ModelEntry(
        name=e.name, kind=KINDS[e.kind], base_model=e.base, state=e.state,
        worker_ids=[w.load.worker_id or w.address for w in e.workers], worker_addresses=[w.address for w in e.workers],
        targets=[pb.RouteTarget(model=m, weight=wt) for m, wt in e.targets],
    )


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
        self.adapters = (AdapterAdmin(membership, generation.catalog, on_change=generation.forget_answers)
                         if generation else None)

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

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        entries = self.generation.catalog.entries() if self.generation is not None else []
        return pb.ListModelsResponse(models=[model_entry(e) for e in entries])

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context) -> pb.LoadAdapterResponse:
        try:
            worker_ids = await self._adapters().load(request.name, request.path, request.base_model)
        except Exception as e:  # noqa: BLE001 - mapped to a status
            await abort_with(context, e)
        return pb.LoadAdapterResponse(worker_ids=worker_ids)

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context) -> pb.UnloadAdapterResponse:
        try:
            unloaded, worker_ids = await self._adapters().unload(request.name)
        except Exception as e:  # noqa: BLE001 - mapped to a status
            await abort_with(context, e)
        return pb.UnloadAdapterResponse(unloaded=unloaded, worker_ids=worker_ids)

    def _adapters(self) -> AdapterAdmin:
        if self.adapters is None:
            raise InvalidRequestError("this router has no model catalog")
        return self.adapters

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
            await self.membership.leave(request.address)
            return pb.RegisterResponse(accepted=True)
        try:
            worker = self.membership.register(request.address, request.role, request.ttl_s or 5.0)
        except ValueError as e:
            await abort_with(context, e)
        if not worker.healthy:
            await self.membership._poll(worker)
        return pb.RegisterResponse(accepted=True)
