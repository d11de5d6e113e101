"""Triton paged attention over the block cache: backend ``triton``, a drop-in for ``torch_paged_attention``.

This module checks the inputs, picks the launch parameters (GQA grouping, flash-decoding splits, tile
sizes) and launches the kernels of ``engine.kernels.triton_kernels``: a decode kernel (one query token per
sequence, batched, with an optional split-merge pass) and a prefill kernel (causal over cached prefix +
new tokens). Sliding window and logit softcap are done in the kernels (no torch fallback). fp32 inputs use
IEEE fp32 dots (no TF32), so fp32 results match the reference closely.

Triton is optional: without it this module imports fine, ``TRITON_AVAILABLE`` is False and no backend is
registered. Under ``TRITON_INTERPRET=1`` (set before triton is first imported) the kernels run on CPU
tensors through Triton's interpreter: that is how the CPU test suite checks them.
"""

from __future__ import annotations

import functools

import torch

from pdserve.engine.attention import AttentionMetadata, decode_rows, register_backend
from pdserve.engine.kernels import triton_kernels as kernels
from pdserve.engine.kernels.triton_kernels import TRITON_AVAILABLE

_INTERPRETED = kernels.INTERPRETED
BACKEND_NAME = "triton"

LOG2E = 1.4426950408889634
_MIN_ROWS = 16  # tl.dot wants M, N, K >= 16


def interpreter_enabled() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETED


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_inputs(cache: torch.Tensor, q: torch.Tensor) -> None:
    if cache.dim() != 5 or cache.shape[1] != 2:
        raise ValueError(f"triton attention: cache must be [blocks, 2, block_size, kv_heads, dim], got {tuple(cache.shape)}")
    if cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("triton attention: the head_dim axis of cache and q must be contiguous")
    if q.shape[1] % cache.shape[3] != 0:
        raise ValueError(f"triton attention: {q.shape[1]} query heads are not a multiple of {cache.shape[3]} KV heads")
    if q.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError("triton attention: CPU tensors need TRITON_INTERPRET=1 set before triton is imported")


def _common(cache: torch.Tensor, q: torch.Tensor, scaling: float, sliding_window, softcap):
    head_dim = q.shape[2]
    use_softcap = bool(softcap)
    use_window = bool(sliding_window)
    return dict(
        head_dim=head_dim,
        qk_scale=float(scaling) * (1.0 if use_softcap else LOG2E),
        softcap=float(softcap) if use_softcap else 0.0,
        window=int(sliding_window) if use_window else 0,
        BLOCK_SIZE=cache.shape[2],
        HEAD_PAD=max(_MIN_ROWS, _next_pow2(head_dim)),
        USE_SOFTCAP=use_softcap,
        USE_WINDOW=use_window,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or _INTERPRETED else "tf32",
        INTERPRET=_INTERPRETED,
    )


def _cache_strides(cache: torch.Tensor) -> dict:
    return dict(
        stride_blk=cache.stride(0), stride_kv=cache.stride(1), stride_tok=cache.stride(2), stride_head=cache.stride(3)
    )


def _pick_num_splits(q: torch.Tensor, batch: int, num_kv_heads: int, span_bound: int, block_n: int) -> int:
    """Flash-decoding splits: enough programs to fill the GPU, each split >= 256 context tokens. A power of
    two, so the merge kernel compiles for few SPLITS_PAD values."""
    if q.device.type != "cuda":
        return 1
    programs = batch * num_kv_heads
    want = -(-2 * _num_sms(q.device.index or 0) // programs)
    n = max(1, min(want, span_bound // max(256, block_n), 32))
    return 1 << (n.bit_length() - 1)


def _decode(cache, meta: AttentionMetadata, q, out, scaling, sliding_window, softcap, num_splits, block_n):
    rows = decode_rows(meta)  # built once per step, shared by every layer
    batch = len(meta.decode_indices)
    if isinstance(rows, slice):  # the usual case: decode rows are one run
        q_dec, out_dec, idx_t = q[rows], out[rows], None
    else:
        idx_t = rows
        q_dec = q[idx_t]
        out_dec = torch.empty_like(q_dec)
    tables = meta.decode_block_tables
    ctx_lens = meta.decode_context_lens
    num_heads, num_kv_heads = q.shape[1], cache.shape[3]
    group = num_heads // num_kv_heads
    args = _common(cache, q, scaling, sliding_window, softcap)
    span_bound = tables.shape[1] * cache.shape[2]  # >= every context length, with no device sync
    if sliding_window:
        span_bound = min(span_bound, int(sliding_window))
    if num_splits is None:
        num_splits = _pick_num_splits(q, batch, num_kv_heads, span_bound, block_n)
    num_splits = max(1, min(num_splits, -(-span_bound // block_n)))
    head_pad = args["HEAD_PAD"]
    if num_splits > 1:
        part_acc = torch.empty(batch, num_heads, num_splits, head_pad, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(batch, num_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out_dec  # unused
    kernels._decode_kernel[(batch, num_kv_heads, num_splits)](
        q_dec, out_dec, cache, tables, ctx_lens, part_acc, part_ml,
        q_dec.stride(0), q_dec.stride(1), out_dec.stride(0), out_dec.stride(1), tables.stride(0),
        **_cache_strides(cache),
        num_heads=num_heads, group=group, span_bound=span_bound, num_splits=num_splits,
        BLOCK_M=max(_MIN_ROWS, _next_pow2(group)), BLOCK_N=block_n, SPLIT_K=num_splits > 1,
        **args,
    )
    if num_splits > 1:
        kernels._decode_merge_kernel[(batch, num_heads)](
            out_dec, part_acc, part_ml, out_dec.stride(0), out_dec.stride(1), num_heads, args["head_dim"],
            num_splits, SPLITS_PAD=_next_pow2(num_splits), HEAD_PAD=head_pad, INTERPRET=_INTERPRETED,
        )
    if idx_t is not None:
        out[idx_t] = out_dec


def _prefill(cache, meta: AttentionMetadata, q, out, scaling, sliding_window, softcap, block_q_rows, block_n):
    seqs = [meta.seqs[i] for i in meta.prefill_indices]
    # the runner builds both once per step; metadata made elsewhere (tests, the self-check) may lack them
    tables = meta.prefill_block_tables
    if tables is None:
        tables = meta.derived.get("triton_prefill_tables")
    if tables is None:
        if len(seqs) == 1:
            tables = seqs[0].block_table.view(1, -1)
        else:
            tables = torch.nn.utils.rnn.pad_sequence([s.block_table for s in seqs], batch_first=True)
        meta.derived["triton_prefill_tables"] = tables
    info = meta.prefill_info
    if info is None:
        info = meta.derived.get("triton_prefill_info")
    if info is None:
        info = meta.derived["triton_prefill_info"] = torch.tensor(
            [[s.query_start, s.query_len, s.context_len] for s in seqs], dtype=torch.int32, device=q.device
        )
    num_heads, num_kv_heads = q.shape[1], cache.shape[3]
    group = num_heads // num_kv_heads
    group_pad = _next_pow2(group)
    block_q = max(1, max(block_q_rows, _MIN_ROWS) // group_pad)
    max_q = max(s.query_len for s in seqs)
    kernels._prefill_kernel[(len(seqs), -(-max_q // block_q), num_kv_heads)](
        q, out, cache, tables, info,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
        **_cache_strides(cache),
        group=group, BLOCK_Q=block_q, GROUP_PAD=group_pad, BLOCK_N=block_n, BLOCK_M=block_q * group_pad,
        **_common(cache, q, scaling, sliding_window, softcap),
    )


def paged_attention(
    cache: torch.Tensor,
    meta: AttentionMetadata,
    q: torch.Tensor,
    scaling: float,
    sliding_window: int | None,
    softcap: float | None,
    *,
    num_splits: int | None = None,
    decode_block_n: int = 64,
    prefill_block_m: int = 64,
    prefill_block_n: int = 64,
) -> torch.Tensor:
    """``triton_paged_attention`` with its tuning knobs exposed (tests force ``num_splits``).

    num_splits: decode context splits (flash-decoding); None picks from the GPU size (1 on CPU).
    Block sizes are in tokens (decode_block_n, prefill_block_n) and rows (prefill_block_m); powers of 2,
    >= 16.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("triton attention: triton is not installed")
    if q.stride(-1) != 1:
        q = q.contiguous()
    _check_inputs(cache, q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if meta.decode_indices:
        _decode(cache, meta, q, out, scaling, sliding_window, softcap, num_splits, decode_block_n)
    if meta.prefill_indices:
        _prefill(cache, meta, q, out, scaling, sliding_window, softcap, prefill_block_m, prefill_block_n)
    return out


def triton_paged_attention(
    cache: torch.Tensor,
    meta: AttentionMetadata,
    q: torch.Tensor,
    scaling: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Paged attention with torch_paged_attention's signature and semantics. q: [T, H, D] -> [T, H, D]."""
    return paged_attention(cache, meta, q, scaling, sliding_window, softcap)


if TRITON_AVAILABLE:
    register_backend(BACKEND_NAME, triton_paged_attention)

__all__ = ["BACKEND_NAME", "TRITON_AVAILABLE", "interpreter_enabled", "paged_attention", "triton_paged_attention"]
