"""Runs a native model over the paged KV cache: the general (prefill, mixed) path on the runner's step inputs,
and the static decode path (pure decode steps, every shape fixed by the batch size and table width, no host
sync and no data-dependent Python inside the forward) that CUDA graphs capture per batch-size bucket.
"""

from __future__ import annotations

import logging

import torch

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.native.model import NativeCausalLM, NativeStep

logger = logging.getLogger(__name__)


class NativeExecutor:
    def __init__(self, model: NativeCausalLM, kv_layers: list[torch.Tensor], block_size: int, backend: str,
                 max_model_len: int):
        spec = model.spec
        self.model = model
        self.kv_layers = kv_layers
        self.block_size = block_size
        self.backend = backend
        self.device = model.device
        self.num_kv_heads, self.head_dim = spec.num_kv_heads, spec.head_dim
        self.max_blocks = -(-max_model_len // block_size)
        self.row_views = [c.view(-1, spec.num_kv_heads, spec.head_dim) for c in kv_layers]
        # the lean decode attention (torch backend): gather K/V heads straight into SDPA's [B, Hkv, C, D]
        self.lean = backend == "torch"
        self.head_views = [c.view(-1, spec.head_dim) for c in kv_layers] if self.lean else None
        self.windows = sorted(set(spec.sliding_windows), key=lambda w: w or 0)
        hkv, bs = spec.num_kv_heads, block_size
        kv = torch.arange(2).view(2, 1, 1, 1, 1) * (bs * hkv)
        head = torch.arange(hkv).view(1, 1, hkv, 1, 1)
        tok = torch.arange(bs).view(1, 1, 1, 1, bs) * hkv
        self._gather_base = (kv + head + tok).to(self.device)  # [2, 1, Hkv, 1, bs]
        self._key_pos = torch.arange(self.max_blocks * bs, device=self.device)
        self._empty = torch.empty(0, dtype=torch.int64, device=self.device)
        self.graphs = None  # a DecodeGraphs when CUDA graphs are captured

    # ---- general path ---------------------------------------------------------------------------------
    def forward(self, inputs, meta: AttentionMetadata) -> torch.Tensor:
        """Any step (prefill chunks, decode, mixed) from the runner's StepInputs and metadata."""
        bs = self.block_size
        ids = inputs.input_ids.view(-1)
        k_rows = inputs.slot_blocks * (2 * bs) + inputs.slot_offsets
        kv_rows = torch.stack((k_rows, k_rows + bs), dim=1)
        cos, sin = self.model.cos_sin.index_select(0, inputs.positions.view(-1)).unbind(1)
        step = NativeStep(meta, kv_rows, cos, sin, self.row_views)
        rows = inputs.logit_rows
        return self.model(ids, step, None if rows.numel() == ids.shape[0] else rows)

    # ---- static decode path ---------------------------------------------------------------------------
    @staticmethod
    def is_decode(items) -> bool:
        return all(len(it.token_ids) == 1 and it.needs_logits for it in items)

    def decode_host(self, items, num_rows: int, width: int) -> list[int]:
        """One int64 host buffer: ids [R], positions [R], context lens [R], KV rows [R, 2], tables [R, width].
        Rows past the batch repeat row 0 (a padded graph bucket: same inputs, same KV written to the same slot)."""
        bs = self.block_size
        ids, pos, ctx, kv, tables = [], [], [], [], []
        for it in items:
            p = it.start_pos
            ids.append(it.token_ids[0])
            pos.append(p)
            ctx.append(p + 1)
            k = it.block_ids[p // bs] * 2 * bs + p % bs
            kv += (k, k + bs)
            table = it.block_ids[: p // bs + 1]
            tables += table
            tables += [0] * (width - len(table))
        pad = num_rows - len(items)
        if pad:
            ids += ids[:1] * pad
            pos += pos[:1] * pad
            ctx += ctx[:1] * pad
            kv += kv[:2] * pad
            tables += tables[:width] * pad
        return ids + pos + ctx + kv + tables

    def split_decode(self, buf: torch.Tensor, num_rows: int, width: int):
        r = num_rows
        ids, pos, ctx, kv, tables = buf.split((r, r, r, 2 * r, r * width))
        return ids, pos, ctx, kv.view(r, 2), tables.view(r, width)

    def decode(self, items) -> torch.Tensor:
        """A pure decode step: float32 logits [len(items), vocab]."""
        if self.graphs is not None:
            out = self.graphs.run(items)
            if out is not None:
                return out
        width = max(it.start_pos // self.block_size + 1 for it in items)
        host = self.decode_host(items, len(items), width)
        if self.device.type == "cpu":
            buf = torch.tensor(host, dtype=torch.int64)
        else:
            buf = torch.tensor(host, dtype=torch.int64, pin_memory=True).to(self.device, non_blocking=True)
        return self.decode_forward(*self.split_decode(buf, len(items), width))

    def decode_forward(self, ids, positions, ctx_lens, kv_rows, tables) -> torch.Tensor:
        """The static decode forward: shapes depend only on (batch, table width); nothing reads the device."""
        batch, width = tables.shape
        meta = AttentionMetadata(
            kv_caches=self.kv_layers,
            block_size=self.block_size,
            slot_blocks=self._empty,  # unused: native layers write K/V at kv_rows
            slot_offsets=self._empty,
            seqs=[],
            decode_indices=list(range(batch)),
            prefill_indices=[],
            decode_block_tables=tables,
            decode_context_lens=ctx_lens,
            backend=self.backend,
            decode_rows=slice(0, batch),
        )
        cos, sin = self.model.cos_sin.index_select(0, positions).unbind(1)
        step = NativeStep(meta, kv_rows, cos, sin, self.row_views)
        if self.lean:
            step.head_views = self.head_views
            bs, hkv = self.block_size, self.num_kv_heads
            idx = torch.add(self._gather_base, tables.view(1, batch, 1, width, 1), alpha=2 * bs * hkv)
            step.gather_idx = idx.view(-1)
            key_pos = self._key_pos[: width * bs]
            ctx = ctx_lens.view(batch, 1, 1, 1)
            visible = key_pos < ctx
            for w in self.windows:
                step.masks[w] = visible if not w else visible & (key_pos >= ctx - w)
        return self.model(ids, step, None)
