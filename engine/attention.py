"""Paged attention over the block cache, plugged into transformers' attention interface.

The model runner calls the HF model with ``attn_implementation="pdserve"`` and passes an
``AttentionMetadata`` as the ``pd_meta`` keyword; transformers forwards it to every attention call. The
attention function writes the step's new K/V into the paged cache, calls the layer hook (the KV of that
layer is final now, so the transfer layer can push it while later layers compute), and attends each
sequence's queries over its cached context. Backends are looked up by name in ``BACKENDS``; ``torch`` is the
pure-torch reference that runs on CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTN_IMPL = "pdserve"


@dataclass(slots=True)
class SeqAttnInfo:
    query_start: int
    query_len: int
    context_len: int  # tokens in cache after this step, including the new ones
    block_table: torch.Tensor  # int64 [num_blocks_of_seq]


@dataclass(slots=True)
class AttentionMetadata:
    """One step's attention inputs, built once by the model runner and shared by every layer.

    What a backend derives from them (masks, index tensors) is derived once per step as well: backends memoize
    it in ``derived``, keyed by what it depends on (e.g. the layer's sliding window), so a step pays that host
    work and those small launches once, not once per layer.
    """

    kv_caches: list[torch.Tensor]
    block_size: int
    slot_blocks: torch.Tensor  # int64 [T]: destination block of each new token
    slot_offsets: torch.Tensor  # int64 [T]: offset inside that block
    seqs: list[SeqAttnInfo]
    decode_indices: list[int]  # indices into seqs with query_len == 1, batched together
    prefill_indices: list[int]
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks], padded
    decode_context_lens: torch.Tensor | None = None  # [B]
    backend: str = "torch"
    layer_hook: Callable[[int], None] | None = None
    # optional: the runner fills these from its one host->device copy per step; derived here when None
    decode_rows: slice | torch.Tensor | None = None  # rows of q holding the decode queries, in decode order
    prefill_block_tables: torch.Tensor | None = None  # int64 [P, max_blocks], zero-padded, prefill order
    prefill_info: torch.Tensor | None = None  # int32 [P, 3]: query_start, query_len, context_len
    derived: dict = field(default_factory=dict)  # per-step memo of tensors derived from the fields above


def decode_rows(meta: AttentionMetadata) -> slice | torch.Tensor:
    """Rows of q with the decode queries: a slice when they are one run (the usual case), else an index tensor."""
    if meta.decode_rows is None:
        idx = [meta.seqs[i].query_start for i in meta.decode_indices]
        if idx == list(range(idx[0], idx[0] + len(idx))):
            meta.decode_rows = slice(idx[0], idx[0] + len(idx))
        else:
            meta.decode_rows = torch.tensor(idx, device=meta.kv_caches[0].device)
    return meta.decode_rows


def _slot_rows(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the new tokens' K and V in a layer cache seen as [num_blocks * 2 * block_size, Hkv, D]."""
    rows = meta.derived.get("slot_rows")
    if rows is None:
        k_rows = meta.slot_blocks * (2 * meta.block_size) + meta.slot_offsets
        rows = meta.derived["slot_rows"] = (k_rows, k_rows + meta.block_size)
    return rows


def write_kv(cache: torch.Tensor, meta: AttentionMetadata, k: torch.Tensor, v: torch.Tensor) -> None:
    """k, v: [T, kv_heads, head_dim]."""
    k_rows, v_rows = _slot_rows(meta)
    flat = cache.view(-1, *cache.shape[-2:])
    flat.index_copy_(0, k_rows, k.to(cache.dtype))
    flat.index_copy_(0, v_rows, v.to(cache.dtype))


def _mask(q_pos, k_pos, k_valid, sliding_window):
    """q_pos [B, L], k_pos [C], k_valid [B, C] or None (all valid) -> bool [B, L, C]: may query l see key c."""
    mask = k_pos[None, None, :] <= q_pos[:, :, None]
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    if sliding_window:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    return mask


def _attend(q, k, v, mask, scaling, softcap):
    """q: [B, L, H, D]; k, v: [B, C, Hkv, D]; mask [B, L, C], or None for plain causal (L == C, no softcap)
    -> [B, L, H, D].

    GQA is handled by grouping query heads, never by copying K/V per head.
    """
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D], [B, Hkv, C, D]
    if not softcap:
        out = F.scaled_dot_product_attention(
            qh, kh.to(qh.dtype), vh.to(qh.dtype), attn_mask=None if mask is None else mask[:, None],
            is_causal=mask is None, scale=scaling, enable_gqa=qh.shape[1] != kh.shape[1],
        )
        return out.transpose(1, 2)
    b, h, length, d = qh.shape
    hkv = kh.shape[1]
    qg = qh.reshape(b, hkv, (h // hkv) * length, d).float()
    scores = (qg @ kh.float().transpose(-1, -2)) * scaling
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.view(b, hkv, h // hkv, length, -1).masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(b, hkv, (h // hkv) * length, -1)
    return (probs @ vh.float()).view(b, h, length, d).transpose(1, 2).to(q.dtype)


def _gather(cache: torch.Tensor, block_table: torch.Tensor):
    """Context K, V for a block table: [..., C, Hkv, D] (KV heads not expanded).

    One ``index_select`` copy each (on CPU about twice as fast as advanced indexing of the strided K/V view).
    """
    flat = block_table.reshape(-1)
    k = cache[:, 0].index_select(0, flat)  # [nblk, bs, hkv, d], contiguous
    v = cache[:, 1].index_select(0, flat)
    shape = (*block_table.shape[:-1], block_table.shape[-1] * cache.shape[2], *cache.shape[-2:])
    return k.view(shape), v.view(shape)


def _decode_mask(meta: AttentionMetadata, width: int, sliding_window) -> torch.Tensor:
    """bool [B, 1, width]: for decode, causal and in-context are one test (key position < context length)."""
    key = ("decode_mask", sliding_window)
    mask = meta.derived.get(key)
    if mask is None:
        ctx = meta.decode_context_lens
        k_pos = torch.arange(width, device=ctx.device)
        mask = meta.derived[key] = _mask((ctx - 1)[:, None], k_pos, None, sliding_window)
    return mask


def _prefill_mask(meta: AttentionMetadata, i: int, s: SeqAttnInfo, device, sliding_window) -> torch.Tensor:
    key = ("prefill_mask", i, sliding_window)
    mask = meta.derived.get(key)
    if mask is None:
        k_pos = torch.arange(s.context_len, device=device)
        q_pos = k_pos[s.context_len - s.query_len :][None, :]
        mask = meta.derived[key] = _mask(q_pos, k_pos, None, sliding_window)
    return mask


def torch_paged_attention(
    cache: torch.Tensor,
    meta: AttentionMetadata,
    q: torch.Tensor,
    scaling: float,
    sliding_window: int | None,
    softcap: float | None,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Reference paged attention. q: [T, H, D] -> [T, H, D] in q's dtype.

    ``new_kv``: the step's new K and V, [T, Hkv, D] each, as just written to the cache. A prefill chunk that is
    its sequence's whole context (a fresh prompt, no prefix hit) attends over these directly: no gather of its
    blocks back out of the cache.
    """
    out = None
    if meta.decode_indices:
        rows = decode_rows(meta)
        qd = q[rows]  # [B, H, D]
        k, v = _gather(cache, meta.decode_block_tables)  # [B, C, Hkv, D]
        mask = _decode_mask(meta, k.shape[1], sliding_window)  # [B, 1, C]
        if softcap:
            o = _attend(qd.unsqueeze(1), k, v, mask, scaling, softcap)[:, 0]
        else:
            # one query token per sequence: the query heads sharing a KV head become that head's query rows, so
            # SDPA sees plain MHA over [B, Hkv, group, D] (no GQA expansion of K/V; ~1.5x faster on CPU)
            b, h, d = qd.shape
            hkv = k.shape[2]
            kh, vh = k.transpose(1, 2).to(qd.dtype), v.transpose(1, 2).to(qd.dtype)
            o = F.scaled_dot_product_attention(
                qd.reshape(b, hkv, h // hkv, d), kh, vh, attn_mask=mask[:, None], scale=scaling
            ).reshape(b, h, d)
        o = o.to(q.dtype)
        if not meta.prefill_indices and isinstance(rows, slice) and rows.start == 0 and rows.stop == q.shape[0]:
            return o  # a pure decode step: no scatter into a fresh output
        out = torch.empty_like(q)
        out[rows] = o
    if out is None:
        out = torch.empty_like(q)
    for i in meta.prefill_indices:
        s = meta.seqs[i]
        rows = slice(s.query_start, s.query_start + s.query_len)
        qs = q[rows].unsqueeze(0)
        if new_kv is not None and s.query_len == s.context_len:
            k, v = new_kv[0][rows], new_kv[1][rows]
        else:
            k, v = _gather(cache, s.block_table)
            k, v = k[: s.context_len], v[: s.context_len]
        k, v = k.unsqueeze(0), v.unsqueeze(0)
        if s.query_len == s.context_len and not softcap and (not sliding_window or sliding_window >= s.context_len):
            mask = None  # the whole context is this chunk: plain causal, and SDPA skips the masked-out tiles
        else:
            mask = _prefill_mask(meta, i, s, q.device, sliding_window)
        o = _attend(qs, k, v, mask, scaling, softcap)
        out[rows] = o[0].to(q.dtype)
    return out


def attend(cache: torch.Tensor, meta: AttentionMetadata, q: torch.Tensor, scaling: float,
           sliding_window: int | None, softcap: float | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The step's backend; the torch reference also gets the new K/V (``new_kv``: fresh prompts skip the gather)."""
    if meta.backend == "torch":
        return torch_paged_attention(cache, meta, q, scaling, sliding_window, softcap, (k, v))
    return BACKENDS[meta.backend](cache, meta, q, scaling, sliding_window, softcap)


BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"torch": torch_paged_attention}


def register_backend(name: str, fn: Callable[..., torch.Tensor]) -> None:
    """Plug in a faster backend with torch_paged_attention's signature."""
    BACKENDS[name] = fn


def pdserve_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface entry point. query: [1, H, T, D], key/value: [1, Hkv, T, D]."""
    meta: AttentionMetadata | None = kwargs.get("pd_meta")
    if meta is None:
        raise RuntimeError("pdserve attention called without pd_meta; run the model through ModelRunner")
    layer = module.layer_idx
    cache = meta.kv_caches[layer]
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    write_kv(cache, meta, k, v)
    if meta.layer_hook is not None:
        meta.layer_hook(layer)
    if scaling is None:
        scaling = q.shape[-1] ** -0.5
    out = attend(cache, meta, q, scaling, kwargs.get("sliding_window"), kwargs.get("softcap"), k, v)
    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs):
    return None


def register_with_transformers() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPL, pdserve_attention)
    AttentionMaskInterface.register(ATTN_IMPL, _no_mask)
