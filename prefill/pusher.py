"""The prefill worker's KV connector: after layer L's KV is written, queue those blocks to the decode side."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pdserve.engine.connector import LayerReady
from pdserve.engine.scheduler import ScheduledSeq
from pdserve.kvtransfer.base import TransferError, TransferHandle


@dataclass(slots=True)
class TransferPlan:
    """Where one request's KV goes: its open transfer and the decode worker's blocks, in prompt order."""

    handle: TransferHandle
    dst_block_ids: list[int]
    started: bool = False
    t_first_push: float | None = None


class LayerPusher:
    """A ``KVConnector``: for each step, a "layer ready" callback pushing the step's blocks layer by layer.

    Runs on the engine thread, as do ``plans`` updates (through the engine loop). The first chunk of a
    request also sends its prefix-cached blocks.
    """

    def __init__(self, block_size: int, cuda: bool):
        self.block_size = block_size
        self.cuda = cuda  # record an event per layer so the sender waits for the compute stream
        self.plans: dict[str, TransferPlan] = {}

    def layer_ready(self, scheduled: list[ScheduledSeq]) -> LayerReady | None:
        work = []
        for s in scheduled:
            plan = self.plans.get(s.seq.request_id)
            if plan is None:
                continue
            first = s.seq.num_computed_tokens // self.block_size if plan.started else 0
            last = (s.seq.num_computed_tokens + s.num_new_tokens - 1) // self.block_size
            idx = range(first, min(last + 1, len(plan.dst_block_ids)))
            plan.started = True
            if plan.t_first_push is None:
                plan.t_first_push = time.monotonic()
            work.append((plan.handle, [s.seq.block_ids[i] for i in idx], [plan.dst_block_ids[i] for i in idx]))
        if not work:
            return None

        failed: set[int] = set()

        def push(layer: int) -> None:
            ready = None
            if self.cuda:
                ready = torch.cuda.Event()
                ready.record()
            for i, (handle, src, dst) in enumerate(work):
                if i in failed:
                    continue
                try:
                    handle.push_layer(layer, src, dst, ready)
                except TransferError:
                    # that transfer's link died: its own Prefill call reports it at finish(); the rest of
                    # the batch (other requests, other decode workers) keeps computing and pushing
                    failed.add(i)

        return push
