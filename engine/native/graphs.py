"""CUDA graphs for the native decode step: one graph per batch-size bucket, captured at start-up.

Each bucket owns one ``DecodeBuffers`` (persistent inputs: ids, positions, context lengths, KV rows, block
tables of the full max-model-len width; persistent work buffers) and a static logits output. A step fills the
smallest bucket that fits (rows past the batch repeat row 0: they compute the same values and write the same KV
slot), copies its host inputs to the device once and replays. Capture needs the triton backend (its decode kernel walks only each sequence's real context; the
torch reference would gather the whole padded width). Any capture failure logs a warning and leaves the
executor on the eager static path.

With LoRA each bucket has two graphs over the same buffers: one without any LoRA work (base-only steps) and one
with the dense multi-LoRA (engine.lora.dense), whose row -> slot indices are one more persistent input.
"""

from __future__ import annotations

import logging

import torch

from pdserve.engine.native.decode import DecodeBuffers

logger = logging.getLogger(__name__)


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += range(16, max_num_seqs, 16)
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    def __init__(self, executor):
        self.executor = executor
        self.width = executor.max_blocks
        self.buffers: dict[int, DecodeBuffers] = {}
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}  # (batch, with LoRA) -> logits
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}

    @property
    def max_batch(self) -> int:
        return max(self.buffers, default=0)

    def _new_buffers(self, batch: int) -> DecodeBuffers:
        bufs = DecodeBuffers(self.executor, batch, self.width)
        bufs.h_ctx[:] = 1  # a valid context for warm-up and capture (they write KV into block 0: nothing lives there yet)
        bufs.upload()
        return bufs

    def capture(self, sizes: list[int]) -> None:
        ex = self.executor
        pool = None
        modes = (False, True) if ex.lora_slots is not None else (False,)
        for batch in sorted(sizes, reverse=True):  # largest first: the smaller ones reuse its memory pool
            bufs = self.buffers[batch] = self._new_buffers(batch)
            for lora in modes:
                if bufs.lora is not None:  # slots -1 during capture: every row on the base (a zero delta)
                    bufs.lora.active = lora
                    bufs.lora.upload()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.inference_mode(), torch.cuda.stream(stream):
                    for _ in range(2):  # compiles the triton kernels, settles the allocator
                        ex.decode_forward(bufs)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
                    out = ex.decode_forward(bufs)
                pool = graph.pool()
                self.outputs[(batch, lora)], self.graphs[(batch, lora)] = out, graph
        torch.cuda.synchronize()

    def run(self, items, lora_slots: list[int] | None = None) -> torch.Tensor | None:
        """Logits [len(items), vocab] from the smallest fitting bucket, or None when none fits."""
        n = len(items)
        batch = next((b for b in sorted(self.buffers) if b >= n), None)
        if batch is None:
            return None
        key = (batch, lora_slots is not None)
        bufs = self.buffers[batch]
        bufs.fill(items, lora_slots)
        bufs.upload()
        self.graphs[key].replay()
        return self.outputs[key][:n]


def capture_decode_graphs(executor, max_num_seqs: int) -> DecodeGraphs | None:
    """Capture every bucket, or return None (eager static decode) with a warning when it cannot be done."""
    if executor.backend != "triton":
        logger.warning("cuda graphs: off (they need the triton attention backend, got %r)", executor.backend)
        return None
    graphs = DecodeGraphs(executor)
    sizes = bucket_sizes(max_num_seqs)
    try:
        graphs.capture(sizes)
    except Exception as e:  # noqa: BLE001 - any capture failure means "run eagerly", never "fail to serve"
        logger.warning("cuda graphs: capture failed (%s: %s); decoding eagerly", type(e).__name__, e)
        torch.cuda.synchronize()
        return None
    logger.info("cuda graphs: captured %d decode buckets up to batch %d", len(sizes), max(sizes))
    return graphs
