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
from dataclasses import dataclass

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


def write_kv(cache: torch.Tensor, meta: AttentionMetadata, k: torch.Tensor, v: torch.Tensor) -> None:
    """k, v: [T, kv_heads, head_dim]."""
    cache[meta.slot_blocks, 0, meta.slot_offsets] = k.to(cache.dtype)
    cache[meta.slot_blocks, 1, meta.slot_offsets] = v.to(cache.dtype)


def _attend(q, k, v, q_pos, k_pos, k_valid, scaling, sliding_window, softcap):
    """q: [B, L, H, D]; k, v: [B, C, Hkv, D]; q_pos [B, L]; k_pos [C]; k_valid [B, C] -> [B, L, H, D].

    GQA is handled by grouping query heads, never by copying K/V per head.
    """
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
    if sliding_window:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D], [B, Hkv, C, D]
    if not softcap:
        out = F.scaled_dot_product_attention(
            qh, kh.to(qh.dtype), vh.to(qh.dtype), attn_mask=mask[:, None], scale=scaling,
            enable_gqa=qh.shape[1] != kh.shape[1],
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
    """Context K, V for a block table: [..., C, Hkv, D] (KV heads not expanded)."""
    k = cache[:, 0][block_table]  # one gather copy each: [..., nblk, bs, hkv, d], contiguous
    v = cache[:, 1][block_table]
    shape = k.shape
    return k.view(*shape[:-4], shape[-4] * shape[-3], *shape[-2:]), v.view(*shape[:-4], shape[-4] * shape[-3], *shape[-2:])


def torch_paged_attention(
    cache: torch.Tensor,
    meta: AttentionMetadata,
    q: torch.Tensor,
    scaling: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Reference paged attention. q: [T, H, D] -> [T, H, D] in q's dtype."""
    out = torch.empty_like(q)
    device = q.device
    if meta.decode_indices:
        idx = [meta.seqs[i].query_start for i in meta.decode_indices]
        qd = q[idx].unsqueeze(1)  # [B, 1, H, D]
        k, v = _gather(cache, meta.decode_block_tables)  # [B, C, Hkv, D]
        ctx = meta.decode_context_lens
        k_pos = torch.arange(k.shape[1], device=device)
        valid = k_pos[None, :] < ctx[:, None]
        o = _attend(qd, k, v, (ctx - 1)[:, None], k_pos, valid, scaling, sliding_window, softcap)
        out[idx] = o[:, 0].to(q.dtype)
    for i in meta.prefill_indices:
        s = meta.seqs[i]
        qs = q[s.query_start : s.query_start + s.query_len].unsqueeze(0)
        k, v = _gather(cache, s.block_table)
        k, v = k[: s.context_len].unsqueeze(0), v[: s.context_len].unsqueeze(0)
        k_pos = torch.arange(s.context_len, device=device)
        q_pos = torch.arange(s.context_len - s.query_len, s.context_len, device=device)[None, :]
        valid = torch.ones(1, s.context_len, dtype=torch.bool, device=device)
        o = _attend(qs, k, v, q_pos, k_pos, valid, scaling, sliding_window, softcap)
        out[s.query_start : s.query_start + s.query_len] = o[0].to(q.dtype)
    return out


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
    q = query[0].transpose(0, 1)
    write_kv(cache, meta, key[0].transpose(0, 1), value[0].transpose(0, 1))
    if meta.layer_hook is not None:
        meta.layer_hook(layer)
    if scaling is None:
        scaling = q.shape[-1] ** -0.5
    out = BACKENDS[meta.backend](cache, meta, q, scaling, kwargs.get("sliding_window"), kwargs.get("softcap"))
    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs):
    return None


def register_with_transformers() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPL, pdserve_attention)
    AttentionMaskInterface.register(ATTN_IMPL, _no_mask)
