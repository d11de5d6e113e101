"""Chained block hashes: pinned values, full blocks only, seeds and extra keys, identical across processes."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve import SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.hashing import ROOT_HASH, block_hashes, hash_block

HASHING_PY = Path(__file__).resolve().parents[2] / "engine" / "hashing.py"


def test_pinned_values():
    # Computed once. Routers, prefill and decode workers of different versions must agree on these, so
    # any change to H, the seed handling or the token encoding has to show up here.
    assert hash_block(0, [1, 2, 3], 0) == 0xB0D508103F092067
    assert block_hashes(list(range(32)), 16, seed=0) == [0x5E379098FD4A83EC, 0x3B8AD58AA9EE95E7]


def test_matches_the_written_construction():
    """h_i = BLAKE2b-64(key=seed as <q)(h_{i-1} as <Q || token ids as <i... || extra), little-endian int."""

    def spec(parent, tokens, seed, extra=b""):
        h = hashlib.blake2b(digest_size=8, key=struct.pack("<q", seed))
        h.update(struct.pack("<Q", parent) + struct.pack(f"<{len(tokens)}i", *tokens) + extra)
        return int.from_bytes(h.digest(), "little")

    tokens = [7, 300, 0, 2**31 - 1, 5, 6, 7, 8]
    assert hash_block(123, tokens, 9, b"x") == spec(123, tokens, 9, b"x")
    chain = block_hashes(tokens, 4, seed=-3)
    first = spec(ROOT_HASH, tokens[:4], -3)
    assert chain == [first, spec(first, tokens[4:], -3)]


def test_only_full_blocks_are_hashed_and_chains_extend():
    h = block_hashes(list(range(40)), 16)
    assert len(h) == 2
    assert block_hashes(list(range(15)), 16) == []
    assert block_hashes(list(range(47)), 16) == h, "a partial block adds no hash"
    full = block_hashes(list(range(48)), 16)
    assert len(full) == 3 and full[:2] == h
    assert block_hashes(list(range(48)), 16, start=h) == full, "extending a chain equals recomputing it"
    assert block_hashes(list(range(48)), 16, start=full) == full


def test_chaining_position_and_order_matter():
    a = block_hashes([1] * 16 + [2] * 16, 16)
    b = block_hashes([3] * 16 + [2] * 16, 16)
    assert a[1] != b[1], "the same block after a different prefix hashes differently"
    assert hash_block(0, [1, 2], 0) != hash_block(0, [2, 1], 0)
    assert hash_block(0, [1], 0) != hash_block(1, [1], 0)
    assert len({hash_block(0, [t], 0) for t in range(1000)}) == 1000


def test_seed_and_extra_keys_change_hashes():
    base = block_hashes([5] * 32, 16, seed=0)
    seeded = block_hashes([5] * 32, 16, seed=1)
    extra = block_hashes([5] * 32, 16, seed=0, extra=b"lora-a")
    assert len({base[0], seeded[0], extra[0]}) == 3 and len({base[1], seeded[1], extra[1]}) == 3
    assert block_hashes([5] * 32, 16, extra=b"lora-b") != extra
    assert block_hashes([5] * 32, 16, seed=0) == base


@pytest.mark.parametrize("hashseed", ["0", "4242"])
def test_identical_across_processes(hashseed):
    """A fresh interpreter with another PYTHONHASHSEED (str/bytes hash() differ) gets the same chain.

    hashing.py is loaded on its own so the child does not pay for importing torch.
    """
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('h', {str(HASHING_PY)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.block_hashes(list(range(64)), 16, seed=3, extra=b'k'), hash('probe'))\n"
    )
    env = {"PYTHONHASHSEED": hashseed, "PATH": os.environ.get("PATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    chain, probe = out.stdout.rsplit(" ", 1)
    assert chain == str(block_hashes(list(range(64)), 16, seed=3, extra=b"k"))
    assert int(probe) != hash("probe") or hashseed == os.environ.get("PYTHONHASHSEED")


def test_engine_caches_blocks_under_the_routers_hashes():
    """The hashes in the engine's KV events are exactly block_hashes(tokens, block_size, hash_seed)."""
    eng = LLMEngine(EngineConfig("tiny", num_blocks=32, block_size=8, hash_seed=77), record_events=True)
    prompt = list(range(10, 30))  # 20 tokens: two full blocks of 8
    eng.add_request("r", prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    outs = []
    while eng.has_unfinished():
        outs += [t for o in eng.step() for t in o.new_token_ids]
    stored = [h for e in eng.pool.drain_events() if e.kind == "stored" for h in e.block_hashes]
    # 20 prompt + 6 generated = 26 tokens, 25 computed (the last token is never fed back): 3 full blocks
    assert stored == block_hashes(prompt + outs, 8, seed=77)[:3]
    assert block_hashes(prompt + outs, 8, seed=0)[0] not in stored
    eng.check_integrity()


def test_blocks_computed_in_a_requests_last_step_are_cached():
    """A prefill that finishes its request (max_tokens=1, or a prefill-only hand-off) still leaves its
    full blocks in the prefix cache, so the next request with that prompt hits them."""
    eng = LLMEngine(EngineConfig("tiny", num_blocks=32, block_size=8), record_events=True)
    prompt = list(range(40, 60))  # 20 tokens: two full blocks of 8
    eng.add_request("once", prompt, SamplingParams(max_tokens=1, temperature=0))
    outs = eng.step()
    assert outs[0].finished and not eng.has_unfinished()
    assert [e.block_hashes[0] for e in eng.pool.drain_events()] == block_hashes(prompt, 8)
    eng.add_request("again", prompt, SamplingParams(max_tokens=1, temperature=0))
    assert eng.step()[0].num_cached_tokens == 16
    eng.check_integrity()

