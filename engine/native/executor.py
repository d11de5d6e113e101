"""Runs a native model over the paged KV cache: the general (prefill, mixed) path on the runner's step inputs,
and the static decode path (pure decode steps, every shape fixed by the batch size and table width, no host
sync and no data-dependent Python inside the forward) that CUDA graphs capture per batch-size bucket.

The static path keeps its inputs and work buffers in ``DecodeBuffers`` (engine.native.decode), made once per
(batch, width) and reused by later steps of that shape; on the torch backend its attention gathers whole K/V
blocks (16 KB rows: ~7x faster on CPU than gathering head rows) straight into the layout SDPA reads.
"""

from __future__ import annotations

import logging

import torch

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.native.decode import BufferCache, DecodeBuffers
from pdserve.engine.native.model import NativeCausalLM, NativeStep

logger = logging.getLogger(__name__)


class NativeExecutor:
    def __init__(self, model: NativeCausalLM, kv_layers: list[torch.Tensor], block_size: int, backend: str,
                 max_model_len: int, lora_slots=None):
        spec = model.spec
        self.model = model
        self.kv_layers = kv_layers
        self.block_size = block_size
        self.backend = backend
        self.device = model.device
        self.num_kv_heads, self.head_dim = spec.num_kv_heads, spec.head_dim
        self.max_blocks = -(-max_model_len // block_size)
        self.row_views = [c.view(-1, spec.num_kv_heads, spec.head_dim) for c in kv_layers]
        # the lean decode attention (torch backend): gather whole K and V blocks, SDPA over them
        self.lean = backend == "torch"
        block_numel = block_size * spec.num_kv_heads * spec.head_dim
        self.block_views = [c.view(-1, block_numel) for c in kv_layers]  # row 2b: K of block b, 2b + 1: V
        self.kv_bytes = sum(c.numel() * c.element_size() for c in kv_layers)
        self.layer_rows = self.row_views[0].shape[0]
        self.flat_rows = one_storage_rows(kv_layers, spec.num_kv_heads, spec.head_dim)
        self.windows = sorted(set(spec.sliding_windows), key=lambda w: w or 0)
        self.empty = torch.empty(0, dtype=torch.int64, device=self.device)
        self.buffers = BufferCache(self)
        self._arena: torch.Tensor | None = None
        self.graphs = None  # a DecodeGraphs when CUDA graphs are captured
        self.lora_slots = lora_slots  # engine.lora.slots.LoRASlots when the engine serves adapters
        self.compiled = None  # engine.native.compiled.CompiledRegions under --compile

    # ---- general path ---------------------------------------------------------------------------------
    def forward(self, inputs, meta: AttentionMetadata, lora=None) -> torch.Tensor:
        """Any step (prefill chunks, decode, mixed) from the runner's StepInputs and metadata; ``lora``: the
        step's LoRAStep (engine.lora.ops) when an adapter runs."""
        bs = self.block_size
        ids = inputs.input_ids.view(-1)
        k_rows = inputs.slot_blocks * (2 * bs) + inputs.slot_offsets
        kv_rows = torch.stack((k_rows + bs, k_rows), dim=1)  # V, then K: the order of the QKV columns
        cos, sin = self.model.cos_sin.index_select(0, inputs.positions.view(-1)).unbind(1)
        step = NativeStep(meta, kv_rows, cos, sin, self.row_views, lora, self.compiled)
        rows = inputs.logit_rows
        return self.model(ids, step, None if rows.numel() == ids.shape[0] else rows)

    # ---- static decode path ---------------------------------------------------------------------------
    @staticmethod
    def is_decode(items) -> bool:
        return all(len(it.token_ids) == 1 and it.needs_logits for it in items)

    def decode(self, items, lora_slots: list[int] | None = None) -> torch.Tensor:
        """A pure decode step: float32 logits [len(items), vocab]. ``lora_slots``: each row's adapter slot."""
        if self.graphs is not None:
            out = self.graphs.run(items, lora_slots)
            if out is not None:
                return out
        width = max(it.start_pos // self.block_size + 1 for it in items)
        bufs = self.buffers.get(len(items), width)
        bufs.fill(items, lora_slots)
        bufs.upload()
        return self.decode_forward(bufs)

    def context_arena(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Memory for the one resident decode context (engine.native.decode), grown by half again when a shape
        needs more (a batch's width grows a block at a time), never past the KV cache's size."""
        if self._arena is None or self._arena.numel() < numel or self._arena.dtype != dtype:
            self._arena = None  # freed before its successor is allocated
            cap = self.kv_bytes // torch.empty((), dtype=dtype).element_size()
            self._arena = torch.empty(max(numel, min(cap, numel * 3 // 2)), dtype=dtype, device=self.device)
        return self._arena

    def decode_forward(self, bufs: DecodeBuffers) -> torch.Tensor:
        """The static decode forward: shapes depend only on (batch, table width); nothing reads the device."""
        return self.model.decode(bufs)


def one_storage_rows(kv_layers: list[torch.Tensor], num_kv_heads: int, head_dim: int) -> torch.Tensor | None:
    """Every layer's cache rows as one [layers * rows, Hkv, D] view (layer i's rows from i * rows), when the
    layers are consecutive slices of one storage (engine.kv_cache on CPU); else None."""
    first = kv_layers[0]
    n, base = first.numel(), first.storage_offset()
    storage = first.untyped_storage().data_ptr()
    for i, c in enumerate(kv_layers):
        if not (c.is_contiguous() and c.dtype == first.dtype and c.numel() == n
                and c.untyped_storage().data_ptr() == storage and c.storage_offset() == base + i * n):
            return None
    rows = n * len(kv_layers) // (num_kv_heads * head_dim)
    return first.as_strided((rows, num_kv_heads, head_dim), (num_kv_heads * head_dim, head_dim, 1), base)
