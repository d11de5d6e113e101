"""Triton paged attention over the block cache: backend ``triton``, a drop-in for ``torch_paged_attention``.

Two kernels read K/V straight from the paged cache (layer tensor [num_blocks, 2, block_size, kv_heads,
head_dim]) through the block tables, with no gather copy and no per-head K/V expansion:

- decode (one query token per sequence, batched): one program per (sequence, KV head, split). Its rows are
  the query heads sharing that KV head (GQA grouping, padded to 16 rows for ``tl.dot``). Online softmax over
  tiles of ``BLOCK_N`` context tokens; with ``num_splits > 1`` the context is cut into splits (flash-decoding)
  whose partial (acc, max, sum) a second kernel merges.
- prefill with a prefix (one or more sequences, each attending causally over its whole cached context:
  prefix blocks + the step's new tokens, already written by ``write_kv``): one program per (sequence,
  query tile, KV head); its rows are (query token, query head of the group) pairs.

Tiles span pages: each context token finds its block through the table, so any power-of-two block size
works (4 as well as 16) and ``tl.dot`` always sees >= 16 columns. Scores, softmax and the accumulator are
fp32; P is cast to the K/V dtype for the PV product (as flash attention does); the output has q's dtype.
Sliding window and logit softcap are done in the kernels (no torch fallback). fp32 inputs use IEEE fp32
dots (no TF32), so fp32 results match the reference closely.

Triton is optional: without it this module imports fine, ``TRITON_AVAILABLE`` is False and no backend is
registered. Under ``TRITON_INTERPRET=1`` (set before triton is first imported) the kernels run on CPU
tensors through Triton's interpreter: that is how the CPU test suite checks them.
"""

from __future__ import annotations

import functools

import torch

from pdserve.engine.attention import AttentionMetadata, decode_rows, register_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

TRITON_AVAILABLE = triton is not None
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


if TRITON_AVAILABLE:
    _INTERPRETED = bool(triton.knobs.runtime.interpret)

    @triton.jit
    def _tanh(x):
        # 1 - 2 / (exp(2x) + 1): exact limits at +-inf, and works in the interpreter (no libdevice)
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _dot(a, b, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
        if INTERPRET:
            # the interpreter keeps bf16 as raw uint16 bits and would multiply those; fp32 holds every bf16
            # value exactly, so this is the same product with fp32 accumulation
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=DOT_PRECISION)

    @triton.jit
    def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
        if INTERPRET:
            if dtype == tl.bfloat16:
                # the interpreter truncates fp32 -> bf16; the GPU rounds to nearest even, so do that by hand
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _attend_tile(
        acc, m_i, l_i, q, k_base, v_base, table_ptr, q_pos, start, hi,
        stride_blk, stride_tok, head_dim, qk_scale, softcap, window,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_PAD: tl.constexpr,
        USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """One online-softmax step of q's rows over context tokens [start, min(start + BLOCK_N, hi)).
        Scores live in the log2 domain (exp2)."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_PAD)
        d_mask = offs_d < head_dim
        tok = start + offs_n
        tok_mask = tok < hi
        blk = tl.load(table_ptr + tok // BLOCK_SIZE, mask=tok_mask, other=0).to(tl.int64)
        off = blk * stride_blk + (tok % BLOCK_SIZE) * stride_tok  # [BLOCK_N] element offsets
        kt = tl.load(k_base + off[None, :] + offs_d[:, None], mask=d_mask[:, None] & tok_mask[None, :], other=0.0)
        s = _dot(q, kt.to(q.dtype), DOT_PRECISION, INTERPRET)  # [M, BLOCK_N] fp32
        if USE_SOFTCAP:
            s = (softcap * 1.4426950408889634) * _tanh(s * (qk_scale / softcap))
        else:
            s = s * qk_scale
        mask = tok_mask[None, :] & (tok[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            mask = mask & (tok[None, :] > q_pos[:, None] - window)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + off[:, None] + offs_d[None, :], mask=tok_mask[:, None] & d_mask[None, :], other=0.0)
        v = v.to(q.dtype)
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, INTERPRET), v, DOT_PRECISION, INTERPRET)
        return acc, m_new, l_i

    @triton.jit
    def _attend_span(
        acc, m_i, l_i, q, k_base, v_base, table_ptr, q_pos, lo, hi,
        stride_blk, stride_tok, head_dim, qk_scale, softcap, window,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_PAD: tl.constexpr,
        USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """Online softmax of q's rows over context tokens [lo, hi)."""
        if INTERPRET:
            # the interpreter's runtime scalars are 1-element arrays, which numpy >= 2.? refuses as range()
            # bounds; a while loop only needs their truth value
            start = lo
            while start < hi:
                acc, m_i, l_i = _attend_tile(
                    acc, m_i, l_i, q, k_base, v_base, table_ptr, q_pos, start, hi,
                    stride_blk, stride_tok, head_dim, qk_scale, softcap, window,
                    BLOCK_SIZE, BLOCK_N, HEAD_PAD, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION, INTERPRET,
                )
                start += BLOCK_N
        else:
            for start in range(lo, hi, BLOCK_N):  # a for loop, so the compiler can pipeline the loads
                acc, m_i, l_i = _attend_tile(
                    acc, m_i, l_i, q, k_base, v_base, table_ptr, q_pos, start, hi,
                    stride_blk, stride_tok, head_dim, qk_scale, softcap, window,
                    BLOCK_SIZE, BLOCK_N, HEAD_PAD, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION, INTERPRET,
                )
        return acc, m_i, l_i

    @triton.jit(do_not_specialize=["stride_qh", "stride_tab", "span_bound", "num_splits"])
    def _decode_kernel(
        q_ptr, out_ptr, cache_ptr, tables_ptr, ctx_lens_ptr, part_acc_ptr, part_ml_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_tab,
        stride_blk, stride_kv, stride_tok, stride_head,
        num_heads, group, head_dim, qk_scale, softcap, window, span_bound, num_splits,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_PAD: tl.constexpr,
        SPLIT_K: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
        DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(ctx_lens_ptr + seq).to(tl.int32)
        rows = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_PAD)
        row_mask = rows < group
        d_mask = offs_d < head_dim
        heads = kvh * group + rows
        q = tl.load(
            q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
            mask=row_mask[:, None] & d_mask[None, :], other=0.0,
        )
        q_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + (ctx - 1)
        first = 0
        if USE_WINDOW:
            first = tl.maximum(ctx - window, 0)
        # split s covers [first + s * split_len, first + (s + 1) * split_len), split_len a multiple of BLOCK_N
        split_len = tl.cdiv(tl.cdiv(span_bound, num_splits), BLOCK_N) * BLOCK_N
        lo = first + split * split_len
        hi = tl.minimum(lo + split_len, ctx)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        k_base = cache_ptr + kvh * stride_head
        acc, m_i, l_i = _attend_span(
            acc, m_i, l_i, q, k_base, k_base + stride_kv, tables_ptr + seq * stride_tab, q_pos, lo, hi,
            stride_blk, stride_tok, head_dim, qk_scale, softcap, window,
            BLOCK_SIZE, BLOCK_N, HEAD_PAD, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION, INTERPRET,
        )
        if not SPLIT_K:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(
                out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                _cast(out, out_ptr.dtype.element_ty, INTERPRET), mask=row_mask[:, None] & d_mask[None, :],
            )
        else:
            # partials: acc [B, H, S, HEAD_PAD], (max, sum) [B, H, S, 2]
            part = (seq * num_heads + heads) * num_splits + split
            tl.store(part_acc_ptr + part[:, None] * HEAD_PAD + offs_d[None, :], acc, mask=row_mask[:, None])
            tl.store(part_ml_ptr + part * 2, m_i, mask=row_mask)
            tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_mask)

    @triton.jit(do_not_specialize=["num_splits"])
    def _decode_merge_kernel(
        out_ptr, part_acc_ptr, part_ml_ptr, stride_ot, stride_oh, num_heads, head_dim, num_splits,
        SPLITS_PAD: tl.constexpr, HEAD_PAD: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        splits = tl.arange(0, SPLITS_PAD)
        offs_d = tl.arange(0, HEAD_PAD)
        s_mask = splits < num_splits
        part = (seq * num_heads + head) * num_splits + splits
        m = tl.load(part_ml_ptr + part * 2, mask=s_mask, other=float("-inf"))
        lsum = tl.load(part_ml_ptr + part * 2 + 1, mask=s_mask, other=0.0)
        acc = tl.load(part_acc_ptr + part[:, None] * HEAD_PAD + offs_d[None, :], mask=s_mask[:, None], other=0.0)
        m_max = tl.max(m, 0)
        w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty splits weigh 0
        total = tl.sum(lsum * w, 0)
        out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(
            out_ptr + seq * stride_ot + head * stride_oh + offs_d,
            _cast(out, out_ptr.dtype.element_ty, INTERPRET), mask=offs_d < head_dim,
        )

    @triton.jit(do_not_specialize=["stride_qh", "stride_tab"])
    def _prefill_kernel(
        q_ptr, out_ptr, cache_ptr, tables_ptr, seq_info_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_tab,
        stride_blk, stride_kv, stride_tok, stride_head,
        group, head_dim, qk_scale, softcap, window,
        BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr, HEAD_PAD: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
        DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """BLOCK_M = BLOCK_Q * GROUP_PAD rows: (query token, query head of the group) pairs."""
        seq = tl.program_id(0)
        q_tile = tl.program_id(1)
        kvh = tl.program_id(2)
        q_start = tl.load(seq_info_ptr + seq * 3)
        q_len = tl.load(seq_info_ptr + seq * 3 + 1)
        ctx = tl.load(seq_info_ptr + seq * 3 + 2)
        if q_tile * BLOCK_Q >= q_len:
            return
        rows = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_PAD)
        tok = q_tile * BLOCK_Q + rows // GROUP_PAD  # query token index inside the sequence
        hig = rows % GROUP_PAD  # query head inside the group
        row_mask = (tok < q_len) & (hig < group)
        d_mask = offs_d < head_dim
        heads = kvh * group + hig
        mask2 = row_mask[:, None] & d_mask[None, :]
        q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask2, other=0.0)
        prefix = ctx - q_len
        q_pos = prefix + tok
        hi = tl.minimum(ctx, prefix + (q_tile + 1) * BLOCK_Q)  # causal: nothing past the tile's last query
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(prefix + q_tile * BLOCK_Q - window + 1, 0)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        k_base = cache_ptr + kvh * stride_head
        acc, m_i, l_i = _attend_span(
            acc, m_i, l_i, q, k_base, k_base + stride_kv, tables_ptr + seq * stride_tab, q_pos, lo, hi,
            stride_blk, stride_tok, head_dim, qk_scale, softcap, window,
            BLOCK_SIZE, BLOCK_N, HEAD_PAD, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION, INTERPRET,
        )
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + (q_start + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 _cast(out, out_ptr.dtype.element_ty, INTERPRET), mask=mask2)
else:  # pragma: no cover
    _INTERPRETED = False


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
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q_dec, out_dec, cache, tables, ctx_lens, part_acc, part_ml,
        q_dec.stride(0), q_dec.stride(1), out_dec.stride(0), out_dec.stride(1), tables.stride(0),
        **_cache_strides(cache),
        num_heads=num_heads, group=group, span_bound=span_bound, num_splits=num_splits,
        BLOCK_M=max(_MIN_ROWS, _next_pow2(group)), BLOCK_N=block_n, SPLIT_K=num_splits > 1,
        **args,
    )
    if num_splits > 1:
        _decode_merge_kernel[(batch, num_heads)](
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
    _prefill_kernel[(len(seqs), -(-max_q // block_q), num_kv_heads)](
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
