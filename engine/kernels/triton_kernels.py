"""The Triton kernels of paged attention (launched by ``engine.kernels.triton_attention``).

Both read K/V straight from the paged cache (layer tensor [num_blocks, 2, block_size, kv_heads, head_dim])
through the block tables, with no gather copy and no per-head K/V expansion:

- ``_decode_kernel`` (one query token per sequence, batched): one program per (sequence, KV head, split).
  Its rows are the query heads sharing that KV head (GQA grouping, padded to 16 rows for ``tl.dot``).
  Online softmax over tiles of ``BLOCK_N`` context tokens; with ``num_splits > 1`` the context is cut into
  splits (flash-decoding) whose partial (acc, max, sum) ``_decode_merge_kernel`` merges.
- ``_prefill_kernel`` (one or more sequences, each attending causally over its whole cached context: prefix
  blocks + the step's new tokens, already written by ``write_kv``): one program per (sequence, query tile,
  KV head); its rows are (query token, query head of the group) pairs.

Tiles span pages: each context token finds its block through the table, so any power-of-two block size
works (4 as well as 16) and ``tl.dot`` always sees >= 16 columns. Scores, softmax and the accumulator are
fp32; P is cast to the K/V dtype for the PV product (as flash attention does); the output has q's dtype.

Without triton this module imports fine and defines no kernel (``TRITON_AVAILABLE`` is False).
``INTERPRETED``: the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at first import).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

TRITON_AVAILABLE = triton is not None
INTERPRETED = bool(triton.knobs.runtime.interpret) if TRITON_AVAILABLE else False


if TRITON_AVAILABLE:
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
