"""The torch attention backend's fresh-prompt path: a prefill chunk that is its sequence's whole context attends
over the step's new K/V (``new_kv``) instead of gathering its blocks back out of the paged cache. Same output as
the gather on a mixed step (fresh prompt, continued chunk, decode row), and the fresh rows really read ``new_kv``."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.attention import AttentionMetadata, SeqAttnInfo, torch_paged_attention, write_kv

BS, H, HKV, D, NUM_BLOCKS = 4, 4, 2, 8, 16


def _step(window):
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(NUM_BLOCKS, 2, BS, HKV, D, generator=g)  # earlier tokens' K/V: random, already cached
    # (query_start, query_len, context_len, blocks): a fresh 7-token prompt, a 3-token chunk after 7 cached
    # tokens, one decode token after 5 cached tokens
    layout = [(0, 7, 7, [0, 1]), (7, 3, 10, [2, 3, 4]), (10, 1, 6, [5, 6])]
    seqs, slot_blocks, slot_offsets = [], [], []
    for start, n, ctx, blocks in layout:
        seqs.append(SeqAttnInfo(start, n, ctx, torch.tensor(blocks)))
        for pos in range(ctx - n, ctx):
            slot_blocks.append(blocks[pos // BS])
            slot_offsets.append(pos % BS)
    t = len(slot_blocks)
    q, k, v = (torch.randn(t, heads, D, generator=g) for heads in (H, HKV, HKV))

    def meta():
        return AttentionMetadata(
            kv_caches=[cache], block_size=BS, slot_blocks=torch.tensor(slot_blocks),
            slot_offsets=torch.tensor(slot_offsets), seqs=seqs, decode_indices=[2], prefill_indices=[0, 1],
            decode_block_tables=torch.tensor([[5, 6]]), decode_context_lens=torch.tensor([6]),
        )

    write_kv(cache, meta(), k, v)
    return cache, meta, q, k, v


@pytest.mark.parametrize("window", [None, 3])
def test_fresh_prompt_over_new_kv_matches_the_gather(window):
    cache, meta, q, k, v = _step(window)
    gathered = torch_paged_attention(cache, meta(), q, D**-0.5, window, None)
    direct = torch_paged_attention(cache, meta(), q, D**-0.5, window, None, new_kv=(k, v))
    torch.testing.assert_close(direct, gathered, rtol=0, atol=1e-6)


def test_fresh_prompt_reads_new_kv_not_the_cache():
    cache, meta, q, k, v = _step(None)
    before = torch_paged_attention(cache, meta(), q, D**-0.5, None, None, new_kv=(k, v))
    cache[0:2] = 0.0  # the fresh prompt's blocks: only the gather path would see this
    after_direct = torch_paged_attention(cache, meta(), q, D**-0.5, None, None, new_kv=(k, v))
    after_gather = torch_paged_attention(cache, meta(), q, D**-0.5, None, None)
    assert torch.equal(after_direct, before)
    assert not torch.allclose(after_gather[:7], before[:7])  # the gather path reads the (now zeroed) cache
    torch.testing.assert_close(after_gather[7:], before[7:], rtol=0, atol=1e-6)  # other rows: cache as before
