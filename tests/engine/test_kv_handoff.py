"""KV hand-off: per-layer views with no repacking, import, fingerprints, shared caches, engine to engine."""

from __future__ import annotations

import os

import pytest
import torch

from engine import LLM, SamplingParams
from engine.kv_cache import (
    KVCache,
    KVCacheSpec,
    LayoutFingerprint,
    block_runs,
    export_block_views,
    import_blocks,
)


def spec():
    return KVCacheSpec(2, 10, 4, 2, 3, torch.float32, "cpu")


def test_views_share_storage_and_runs():
    cache = KVCache(spec())
    views = export_block_views(cache.layers[0], [3, 4, 5, 8, 1, 2])
    assert [v.shape[0] for v in views] == [3, 1, 2]
    assert block_runs([3, 4, 5, 8, 1, 2]) == [(3, 3), (8, 1), (1, 2)]
    views[0].fill_(1.0)  # writes through to the cache: a view, not a copy
    assert cache.layers[0][3:6].eq(1.0).all() and cache.layers[0][0].eq(0).all()
    base = cache.layers[0].data_ptr()
    assert all(base <= v.data_ptr() < base + cache.layers[0].nbytes for v in views)
    assert all(v.is_contiguous() for v in views)


def test_import_roundtrip_and_shape_check():
    cache = KVCache(spec())
    data = torch.randn(3, 2, 4, 2, 3)
    import_blocks(cache.layers[1], [7, 2, 3], data)
    assert torch.equal(cache.layers[1][[7, 2, 3]], data)
    with pytest.raises(ValueError, match="does not fit"):
        import_blocks(cache.layers[1], [1, 2], data)


def test_fingerprint_json_diff_and_garbage():
    fp = LayoutFingerprint("tiny", "main", 4, 2, 32, 16, "float32", 0)
    assert LayoutFingerprint.from_json(fp.to_json()) == fp
    other = LayoutFingerprint("tiny", "main", 4, 2, 64, 16, "bfloat16", 0)
    assert fp.diff(other) == ["head_dim: 32 != 64", "dtype: 'float32' != 'bfloat16'"]
    assert fp.block_bytes() == 2 * 16 * 2 * 32 * 4
    for bad in ("not json", "{}", '{"model_id": 1}'):
        with pytest.raises(ValueError, match="fingerprint"):
            LayoutFingerprint.from_json(bad)


def test_shared_cache_file_lifecycle():
    cache = KVCache(spec(), shared=True)
    path = cache.shm_path
    assert path and os.path.exists(path)
    cache.layers[1][4].fill_(3.0)
    mapped = torch.from_file(path, shared=True, size=cache.spec.layer_bytes() // 4 * 2, dtype=torch.float32)
    assert mapped.view(2, *spec().layer_shape())[1][4].eq(3.0).all()
    cache.close()
    assert not os.path.exists(path)


def test_engine_to_engine_handoff_matches_a_single_engine():
    prompt = list(range(40, 90))
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    single = LLM("tiny", num_blocks=64).generate([prompt], params)[0].token_ids

    a, b = LLM("tiny", num_blocks=64).engine, LLM("tiny", num_blocks=64).engine
    a.add_request("r", prompt, params, prefill_only=True)
    first = None
    while a.has_unfinished():
        for out in a.step():
            first = out.new_token_ids[0]
    src = a.held["r"]
    dst = b.reserve("r", len(prompt))
    assert len(src) == len(dst) == 4
    for layer in range(len(a.runner.kv.layers)):
        data = torch.cat(export_block_views(a.runner.kv.layers[layer], src))
        import_blocks(b.runner.kv.layers[layer], dst, data)
    tokens = b.add_prefilled_request("r", prompt, first, params).new_token_ids
    while b.has_unfinished():
        for out in b.step():
            tokens += out.new_token_ids
    assert tokens == single
    assert a.release("r") and not a.release("r")
    a.check_integrity()
    b.check_integrity()
    assert a.live_block_refs() == {} and b.live_block_refs() == {}
