"""KV hand-off: per-layer views with no repacking, import, fingerprints, shared caches, engine to engine."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.kv_cache import (
    KVCache,
    KVCacheSpec,
    LayoutFingerprint,
    block_runs,
    export_block_views,
    import_blocks,
)
from tests.engine.helpers import assert_idle

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def spec(num_blocks=10):
    return KVCacheSpec(num_layers=2, num_blocks=num_blocks, block_size=4, num_kv_heads=2, head_dim=3,
                       dtype=torch.float32, device="cpu")


def test_block_runs():
    assert block_runs([]) == []
    assert block_runs([4]) == [(4, 1)]
    assert block_runs([3, 4, 5, 8, 1, 2]) == [(3, 3), (8, 1), (1, 2)]
    assert block_runs([5, 4, 3]) == [(5, 1), (4, 1), (3, 1)], "only ascending neighbours form a run"
    assert block_runs([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]) == [(0, 10)]


def test_views_share_storage_with_the_cache():
    cache = KVCache(spec())
    layer = cache.layers[0]
    assert layer.shape == (10, 2, 4, 2, 3) and layer.is_contiguous()
    views = export_block_views(layer, [3, 4, 5, 8, 1, 2])
    assert [tuple(v.shape) for v in views] == [(3, 2, 4, 2, 3), (1, 2, 4, 2, 3), (2, 2, 4, 2, 3)]
    block_bytes = layer[0].nbytes
    assert [v.data_ptr() - layer.data_ptr() for v in views] == [3 * block_bytes, 8 * block_bytes, 1 * block_bytes]
    assert all(v.is_contiguous() and v.untyped_storage().data_ptr() == layer.untyped_storage().data_ptr()
               for v in views)
    views[0].fill_(1.0)  # writes through to the cache: a view, not a copy
    views[2][1].fill_(2.0)
    assert layer[3:6].eq(1.0).all() and layer[2].eq(2.0).all()
    assert layer[0].eq(0).all() and layer[1].eq(0).all() and layer[6:].eq(0).all()
    layer[8].fill_(5.0)  # and the other way round
    assert views[1].eq(5.0).all()
    assert cache.layers[1].eq(0).all(), "layers are separate tensors"


def test_import_round_trip_between_caches():
    src, dst = KVCache(spec()), KVCache(spec(num_blocks=12))
    for layer in src.layers:
        layer.copy_(torch.randn(layer.shape))
    src_ids, dst_ids = [2, 3, 4, 9, 0], [11, 5, 6, 7, 1]
    for s_layer, d_layer in zip(src.layers, dst.layers, strict=True):
        data = torch.cat(export_block_views(s_layer, src_ids))
        import_blocks(d_layer, dst_ids, data)
        assert torch.equal(d_layer[dst_ids], s_layer[src_ids])
        untouched = [b for b in range(12) if b not in dst_ids]
        assert d_layer[untouched].eq(0).all()
    with pytest.raises(ValueError, match="does not fit 2 blocks"):
        import_blocks(dst.layers[0], [1, 2], torch.zeros(3, 2, 4, 2, 3))
    with pytest.raises(ValueError, match="does not fit"):
        import_blocks(dst.layers[0], [1, 2], torch.zeros(2, 2, 8, 2, 3))  # another block size


def test_fingerprint_json_round_trip_diff_and_garbage():
    fp = LayoutFingerprint("tiny", "main", 4, 2, 32, 16, "float32", 0)
    assert LayoutFingerprint.from_json(fp.to_json()) == fp
    assert json.loads(fp.to_json())["block_size"] == 16
    assert fp.diff(fp) == []
    other = LayoutFingerprint("tiny", "main", 4, 2, 64, 16, "bfloat16", 7)
    assert fp.diff(other) == ["head_dim: 32 != 64", "dtype: 'float32' != 'bfloat16'", "hash_seed: 0 != 7"]
    assert fp.digest() == LayoutFingerprint.from_json(fp.to_json()).digest() != other.digest()
    assert fp.block_bytes() == 2 * 16 * 2 * 32 * 4
    assert other.block_bytes() == 2 * 16 * 2 * 64 * 2
    good = json.loads(fp.to_json())
    for bad in ("not json", "", "{}", "[]", "null", '{"model_id": 1}',
                json.dumps({**good, "extra": 1}), json.dumps({k: v for k, v in good.items() if k != "dtype"})):
        with pytest.raises(ValueError, match="fingerprint"):
            LayoutFingerprint.from_json(bad)


def test_shared_cache_file_lifecycle():
    cache = KVCache(spec(), shared=True)
    path = cache.shm_path
    assert path and path.startswith("/dev/shm/pdserve-kv-") and os.path.exists(path)
    assert os.path.getsize(path) == 2 * cache.spec.layer_bytes()
    cache.layers[1][4].fill_(3.0)
    mapped = torch.from_file(path, shared=True, size=cache.spec.layer_bytes() // 4 * 2, dtype=torch.float32)
    assert mapped.view(2, *spec().layer_shape())[1][4].eq(3.0).all()
    mapped.view(2, *spec().layer_shape())[0][7].fill_(9.0)  # a peer's write lands in our cache
    assert cache.layers[0][7].eq(9.0).all()
    cache.close()
    assert not os.path.exists(path) and cache.shm_path is None
    cache.close()  # idempotent
    with pytest.raises(ValueError, match="shared"):
        KVCache(KVCacheSpec(1, 1, 4, 1, 1, torch.float32, "cuda"), shared=True)


def test_shared_cache_files_of_dead_workers_are_swept(tmp_path):
    """A SIGKILLed worker leaves its /dev/shm file behind; the next shared cache removes files of dead pids."""
    import subprocess
    import sys

    from pdserve.engine.kv_cache import sweep_stale_shm

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    prefix = str(tmp_path / "pdserve-kv-")
    stale = f"{prefix}{dead_pid}-deadbeef"
    mine = f"{prefix}{os.getpid()}-cafecafe"
    other = str(tmp_path / "unrelated-1")
    for p in (stale, mine, other):
        open(p, "wb").close()
    assert sweep_stale_shm(prefix) == [stale]
    assert not os.path.exists(stale) and os.path.exists(mine) and os.path.exists(other)
    # the real prefix: creating a shared cache sweeps it
    leftover = f"/dev/shm/pdserve-kv-{dead_pid}-0badf00d"
    open(leftover, "wb").close()
    cache = KVCache(spec(), shared=True)
    try:
        assert not os.path.exists(leftover) and os.path.exists(cache.shm_path)
    finally:
        cache.close()


def test_engine_with_shared_kv_cache():
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.engine import LLMEngine

    eng = LLMEngine(EngineConfig("tiny", num_blocks=16), shared_kv=True)
    path = eng.runner.kv.shm_path
    assert path and os.path.exists(path)
    eng.add_request("r", [5, 6, 7], GREEDY)
    while eng.has_unfinished():
        eng.step()
    eng.check_integrity()
    eng.runner.kv.close()
    assert not os.path.exists(path)


def run_to_end(engine, first_tokens=()):
    tokens = list(first_tokens)
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    return tokens


def test_engine_to_engine_handoff_matches_a_single_engine():
    prompt = list(range(40, 90))  # 50 tokens: 4 blocks, the last one partial
    single = LLM("tiny", num_blocks=64).generate([prompt], GREEDY)[0].token_ids

    a, b = LLM("tiny", num_blocks=64).engine, LLM("tiny", num_blocks=64).engine
    assert a.fingerprint == b.fingerprint
    a.add_request("r", prompt, GREEDY, prefill_only=True)
    outs = []
    while a.has_unfinished():
        outs += a.step()
    assert len(outs) == 1 and outs[0].finished and outs[0].finish_reason.value == "length"
    first = outs[0].new_token_ids[0]
    assert first == single[0]
    src = a.held["r"]
    assert src == [0, 1, 2, 3]
    # fragment b's free queue so the destination blocks are neither a's ids nor in one ascending run
    assert b.reserve("j1", 16 * 2) == [0, 1]
    assert b.reserve("j2", 16 * 62) == list(range(2, 64))
    b.cancel_reservation("j1")
    b.cancel_reservation("j2")
    dst = b.reserve("r", len(prompt))
    assert dst == [1, 0, 63, 62] and len(block_runs(dst)) == 4
    for layer in range(len(a.runner.kv.layers)):
        data = torch.cat(export_block_views(a.runner.kv.layers[layer], src))
        import_blocks(b.runner.kv.layers[layer], dst, data)
        assert torch.equal(b.runner.kv.layers[layer][dst], a.runner.kv.layers[layer][src])
    first_out = b.add_prefilled_request("r", prompt, first, GREEDY)
    assert first_out.new_token_ids == [first] and not first_out.finished
    tokens = run_to_end(b, first_out.new_token_ids)
    assert tokens == single
    assert a.release("r") and not a.release("r")
    a.check_integrity()
    b.check_integrity()
    assert a.live_block_refs() == {} and b.live_block_refs() == {}
    assert_idle(a)


def test_aborting_a_running_prefill_only_request_frees_its_blocks():
    eng = LLM("tiny", num_blocks=16, max_num_batched_tokens=16).engine
    eng.add_request("p", list(range(10, 60)), GREEDY, prefill_only=True)
    assert eng.step() == []  # the first 16-token chunk: still prefilling
    assert eng.pool.num_free_blocks == 15
    assert eng.abort("p")
    assert eng.held == {} and eng.pool.num_free_blocks == 16
    assert_idle(eng)
    eng.add_request("q", list(range(10, 60)), GREEDY, prefill_only=True)  # the id is free again
    run_to_end(eng)
    assert list(eng.held) == ["q"] and len(eng.held["q"]) == 4
    assert eng.abort("q"), "abort releases a held prefill too"
    assert_idle(eng)

