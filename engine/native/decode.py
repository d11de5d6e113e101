"""Persistent buffers of the native static decode step, one set per (batch rows, block-table width).

Everything a decode step reads or writes besides the weights and the KV cache lives here and is allocated once:
- the host inputs (ids, positions, context lengths, K/V rows, block tables and, for the lean torch attention,
  the K/V block rows to gather and the attention masks) in one byte buffer filled with numpy: on CPU the step's
  tensors are views of that very buffer (no copy, no dispatched op), elsewhere one copy a step;
- the work buffers every layer writes with ``out=`` (QKV and RoPE, gate-up, gathered context, RoPE matrices),
  with their views made once, so a layer dispatches no view or slice op of its own.

On CPU the torch backend's gathered context is resident: each layer keeps its own gathered K/V, and a step whose
rows are the previous step's sequences one token further (the same block-table objects, positions + 1) writes
just the new token into it instead of gathering the whole context again (the blocks of running sequences change
only by their own decode writes). It costs at most the KV cache's size in memory: one shape at a time, in one
arena the executor keeps (so a new shape does not fault in fresh pages).

Flush: when the KV cache is one storage (CPU, engine.kv_cache), a layer writes its new K/V only into its
gathered context, which its attention reads; each layer keeps its own QKV buffer, and the step writes every
layer's K/V to the paged cache with one ``index_put_`` after the last layer. Nothing reads the paged cache in
between, and the next step (or a transfer, or the prefix cache) reads it only after.

The QKV buffer ``z`` of one row is ``[Q' K' | V Q K]``: the fused projection writes ``[V Q K]`` (its weight's
column order), the RoPE matmul reads ``[Q K]`` and writes ``[Q' K']`` in front of V, so the new token's K' and V
sit side by side and reach the cache in one ``index_put_``.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.lora.dense import LoRADecodeBuffers

MAX_CACHED = 2  # shapes kept by an executor: decode batches change shape slowly


class LayerViews:
    """One layer's views into a QKV buffer ``z`` of ``r`` rows (see the module docstring)."""

    def __init__(self, buf: torch.Tensor, offset: int, r: int, spec):
        d, nh, nkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
        a, k, g = nh * d, nkv * d, nh // nkv
        zw = 2 * a + 3 * k
        self.qkv = buf.as_strided((r, a + 2 * k), (zw, 1), offset + a + k)  # projection out: [V Q K]
        self.qk = buf.as_strided((r, nh + nkv, d), (zw, d, 1), offset + a + 2 * k)  # RoPE in: Q and K heads
        self.qk_rot = buf.as_strided((r, nh + nkv, d), (zw, d, 1), offset)  # RoPE out: Q' and K' heads
        self.kv_new = buf.as_strided((r, 2, nkv, d), (zw, k, d, 1), offset + a)  # K' then V: the cache rows kv_rows
        self.q_heads = buf.as_strided((r, nh, d), (zw, d, 1), offset)
        self.q_groups = buf.as_strided((r, nkv, g, d), (zw, g * d, d, 1), offset)  # the query heads of each KV head


class WorkBuffers:
    """The buffers every layer writes ``out=`` for ``batch`` rows (one allocation, views made once). ``layers``
    > 1: a QKV buffer per layer, so every layer's new K/V is still there when the step writes them all to the
    cache at its end (``kv_new_all``: [layers, r, 2, Hkv, D])."""

    def __init__(self, spec, batch: int, dtype, device, layers: int = 1):
        r, d, i = batch, spec.head_dim, spec.intermediate_size
        a, k = spec.num_heads * d, spec.num_kv_heads * d
        zw = 2 * a + 3 * k
        n_z, n_rope, n_ug = layers * r * zw, r * d * d, r * 2 * i
        buf = torch.empty(n_z + n_rope + n_ug + r * i, dtype=dtype, device=device)
        views = [LayerViews(buf, j * r * zw, r, spec) for j in range(layers)]
        self.z = views * (spec.num_layers // layers)  # indexed by layer
        self.layers = layers
        self.kv_new_all = buf.as_strided((layers, r, 2, spec.num_kv_heads, d), (r * zw, zw, k, d, 1), a)
        self.rope = buf.as_strided((r, d, d), (d * d, d, 1), n_z)  # one rotation matrix per row
        self.up_gate = buf.as_strided((r, 2 * i), (2 * i, 1), n_z + n_rope)
        self.up = buf.as_strided((r, i), (2 * i, 1), n_z + n_rope)
        self.gate = buf.as_strided((r, i), (2 * i, 1), n_z + n_rope + i)
        self.act = buf.as_strided((r, i), (i, 1), n_z + n_rope + n_ug)
        self.rope_idx = torch.empty(r, d, d, dtype=torch.int64, device=device)


class DecodeBuffers:
    def __init__(self, executor, batch: int, width: int, work: WorkBuffers | None = None):
        ex, spec, model = executor, executor.model.spec, executor.model
        r, w, bs = batch, width, executor.block_size
        nkv = spec.num_kv_heads
        dev = model.device
        self.batch, self.width, self.block_size, self.device = r, w, bs, dev
        self.lean, self.windows = ex.lean, ex.windows
        self.row_views, self.block_views = ex.row_views, ex.block_views
        # flush: the lean attention reads each layer's new K/V from its gathered context, so the paged cache can
        # take every layer's at the step's end in one op (when the cache is one storage: CPU, engine.kv_cache)
        self.flush = self.lean and ex.flat_rows is not None
        layers = spec.num_layers if self.flush else 1
        if work is None or work.layers != layers:
            work = WorkBuffers(spec, r, model.dtype, dev, layers)
        self.work, self.z, self.flat_rows = work, work.z, ex.flat_rows
        self.rope, self.rope_idx = work.rope, work.rope_idx
        self.up_gate, self.up, self.gate, self.act = work.up_gate, work.up, work.gate, work.act
        # ---- inputs, int64: ids [r], pos [r], ctx [r], kv rows [r, 2], tables [r, w] and (lean) the K/V block
        # rows to gather [2, r, w], then (lean) one bool mask [r, 1, 1, w * bs] per sliding window: one copy off CPU
        c = w * bs
        n_lean = 2 * r * w + 2 * r * nkv if self.lean else 0
        n_flush = spec.num_layers * r * 2 if self.flush else 0
        n_int = 5 * r + r * w + n_lean + n_flush
        n_mask = len(self.windows) * r * c if self.lean else 0
        n_words = n_int + -(-n_mask // 8)
        if dev.type == "cpu":  # the step reads these very tensors: filled in place, no copy and no op
            flat = torch.empty(n_words, dtype=torch.int64)
            host = flat.numpy()
        else:
            flat = torch.empty(n_words, dtype=torch.int64, device=dev)
            host = np.zeros(n_words, dtype=np.int64)
        self.flat, self.host = flat, host
        self.h_ids, self.h_pos, self.h_ctx = host[:r], host[r : 2 * r], host[2 * r : 3 * r]
        self.h_kv = host[3 * r : 5 * r].reshape(r, 2)
        self.h_tables = host[5 * r : 5 * r + r * w].reshape(r, w)
        lean0 = 5 * r + r * w
        self.h_blocks = host[lean0 : lean0 + 2 * r * w].reshape(2, r, w) if self.lean else None
        flush0 = lean0 + 2 * r * w + 2 * r * nkv
        self.h_append = host[lean0 + 2 * r * w : flush0].reshape(r, 2, nkv) if self.lean else None
        self.h_flush = host[flush0 : n_int].reshape(-1, r, 2) if self.flush else None
        # each layer's first row in ``flat_rows`` (the flush's row of a token is its layer's offset + its row)
        self.layer_offsets = (np.arange(spec.num_layers) * ex.layer_rows)[:, None, None] if self.flush else None
        self.h_masks = host[n_int:].view(bool)[:n_mask].reshape(-1, r, c)
        self.key_pos = np.arange(c)
        self.ids = flat.as_strided((r,), (1,), 0)
        self.pos3 = flat.as_strided((r, 1, 1), (1, 1, 1), r)
        self.ctx = flat.as_strided((r,), (1,), 2 * r)
        self.kv_rows = flat.as_strided((r, 2), (2, 1), 3 * r)
        self.tables = flat.as_strided((r, w), (w, 1), 5 * r)
        self.masks = {}
        self.resident, self.append, self.prev_lists = False, False, None
        # each row's LoRA slot (engine.lora.dense), when the engine serves adapters
        self.lora = LoRADecodeBuffers(ex.lora_slots, r, dev) if ex.lora_slots is not None else None
        if self.lean:
            self.block_rows = flat.as_strided((2 * r * w,), (1,), lean0)
            self.append_rows = flat.as_strided((r, 2, nkv), (2 * nkv, nkv, 1), lean0 + 2 * r * w)
            self.flush_rows = flat.as_strided((spec.num_layers, r, 2), (2 * r, 2, 1), flush0) if self.flush else None
            as_bool = flat.view(torch.bool)
            for j, win in enumerate(self.windows):
                self.masks[win] = as_bool.as_strided((r, 1, 1, c), (c, c, c, 1), 8 * n_int + j * r * c)
            self._context_buffers(ex, spec, model.dtype)
        self.meta = AttentionMetadata(
            kv_caches=ex.kv_layers,
            block_size=bs,
            slot_blocks=ex.empty,  # unused: native layers write K/V at kv_rows
            slot_offsets=ex.empty,
            seqs=[],
            decode_indices=list(range(r)),
            prefill_indices=[],
            decode_block_tables=self.tables,
            decode_context_lens=self.ctx,
            backend=ex.backend,
            decode_rows=slice(0, r),
        )

    def _context_buffers(self, ex, spec, dtype) -> None:
        """Gathered K and V blocks, [2, r, w, bs, Hkv, D] seen by SDPA as [r, Hkv, w * bs, D]: one buffer per layer
        when resident (CPU, big enough, within the KV cache's size), else one shared by every layer."""
        r, w, bs, dev = self.batch, self.width, self.block_size, self.device
        nkv, d = spec.num_kv_heads, spec.head_dim
        k, c = nkv * d, w * bs
        numel = 2 * r * w * bs * k
        layer_bytes = numel * torch.empty((), dtype=dtype).element_size()
        self.resident = dev.type == "cpu" and layer_bytes <= ex.kv_bytes // spec.num_layers
        n = spec.num_layers if self.resident else 1
        buf = ex.context_arena(n * numel, dtype) if self.resident else torch.empty(numel, dtype=dtype, device=dev)
        shape, strides = (r, nkv, c, d), (c * k, d, k, 1)
        self.gathered = [buf.as_strided((2 * r * w, bs * k), (bs * k, 1), j * numel) for j in range(n)]
        self.k_ctx = [buf.as_strided(shape, strides, j * numel) for j in range(n)]
        self.v_ctx = [buf.as_strided(shape, strides, j * numel + r * c * k) for j in range(n)]
        # resident: one token's K and V heads per row go to their position, rows of a [2 * r * c * Hkv, D] view
        rows = (numel // d, d)
        self.context_rows = [buf.as_strided(rows, (d, 1), j * numel) for j in range(n)]
        if not self.resident:  # every layer reads the one shared buffer
            n = spec.num_layers
            self.gathered, self.k_ctx, self.v_ctx = self.gathered * n, self.k_ctx * n, self.v_ctx * n
            self.context_rows *= n

    def fill(self, items, lora_slots: list[int] | None = None) -> None:
        """Write one step's inputs on the host. Rows past ``len(items)`` repeat row 0 (a padded graph bucket:
        the same inputs, the same KV written to the same slot). ``lora_slots``: each row's adapter slot (-1:
        base), None when no adapter runs."""
        if self.lora is not None:
            self.lora.fill(lora_slots)
        bs, w = self.block_size, self.width
        ids, pos, kv, tables = [], [], [], []
        for it in items:
            p = it.start_pos
            ids.append(it.token_ids[0])
            pos.append(p)
            row = it.block_ids[p // bs] * 2 * bs + p % bs
            kv += (row, row + bs)
            table = it.block_ids[: p // bs + 1]
            tables += table
            tables += [0] * (w - len(table))
        pad = self.batch - len(items)
        if pad:
            ids += ids[:1] * pad
            pos += pos[:1] * pad
            kv += kv[:2] * pad
            tables += tables[:w] * pad
        if self.resident:
            self._check_append(items, pos, tables)
        self.h_ids[:] = ids
        self.h_pos[:] = pos
        np.add(self.h_pos, 1, out=self.h_ctx)
        self.h_kv.reshape(-1)[:] = kv
        if self.flush:  # every layer's K and V rows in the one-storage cache
            np.add(self.h_kv, self.layer_offsets, out=self.h_flush)
        self.h_tables.reshape(-1)[:] = tables
        if self.lean:
            np.multiply(self.h_tables, 2, out=self.h_blocks[0])  # K of block b is row 2b of the block view
            np.add(self.h_blocks[0], 1, out=self.h_blocks[1])
            if self.append or self.flush:  # row (kv, b, p, h) of a layer's [2, r, w * bs, Hkv] context
                r, nkv, c = self.batch, self.h_append.shape[2], w * bs
                kv_b = np.arange(2)[None, :, None] * r + np.arange(r)[:, None, None]
                self.h_append[:] = (kv_b * c + self.h_pos[:, None, None]) * nkv + np.arange(nkv)
            ctx = self.h_ctx[:, None]
            for i, win in enumerate(self.windows):
                mask = self.h_masks[i]
                np.less(self.key_pos, ctx, out=mask)  # decode: causal and in-context are one test
                if win:
                    mask &= self.key_pos >= ctx - win
        self.meta.derived.clear()

    def _check_append(self, items, pos: list[int], tables: list[int]) -> None:
        """Whether this step only appends to the resident context: the same sequences in the same rows (the
        previous step's block-table objects), each one token further, their old blocks unchanged. Called before
        the host arrays are overwritten (they still hold the previous step)."""
        prev, self.prev_lists = self.prev_lists, [it.block_ids for it in items]  # held: their ids stay unique
        self.append = (
            prev is not None
            and len(items) == self.batch
            and all(a is b for a, b in zip(self.prev_lists, prev, strict=True))
            and np.array_equal(self.h_pos + 1, pos)
        )
        if self.append:
            new = np.asarray(tables, dtype=np.int64).reshape(self.batch, self.width)
            old_cols = self.key_pos[: self.width][None, :] * self.block_size < self.h_ctx[:, None]
            self.append = bool(np.array_equal(new[old_cols], self.h_tables[old_cols]))

    def upload(self) -> None:
        """Off CPU: one copy of the host inputs into the device buffers (on CPU the step reads them in place)."""
        if self.device.type != "cpu":
            self.flat.copy_(torch.from_numpy(self.host).pin_memory(), non_blocking=True)
        if self.lora is not None and self.lora.active:
            self.lora.upload()


class BufferCache:
    """The executor's DecodeBuffers by (batch, width) and their WorkBuffers by batch (a new width reuses the
    batch's work buffers), least recently used dropped past ``MAX_CACHED``."""

    def __init__(self, executor):
        self.executor = executor
        self.entries: OrderedDict[tuple[int, int], DecodeBuffers] = OrderedDict()
        self.work: OrderedDict[int, WorkBuffers] = OrderedDict()

    def get(self, batch: int, width: int) -> DecodeBuffers:
        key = (batch, width)
        bufs = self.entries.get(key)
        if bufs is None:
            if any(e.resident for e in self.entries.values()):
                self.entries.clear()  # one resident context at a time: its memory goes before the next is made
            work = self.work.get(batch)
            bufs = self.entries[key] = DecodeBuffers(self.executor, batch, width, work)
            self.work[batch] = bufs.work
            _trim(self.entries)
        self.entries.move_to_end(key)
        self.work.move_to_end(batch)
        _trim(self.work)
        return bufs


def _trim(entries: OrderedDict) -> None:
    while len(entries) > MAX_CACHED:
        entries.popitem(last=False)
