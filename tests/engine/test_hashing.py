"""Chained block hashes: stable values, full blocks only, seeds and extra keys, identical across processes."""

from __future__ import annotations

import subprocess
import sys

from engine.hashing import block_hashes, hash_block


def test_pinned_values():
    # computed once; a change to H, its seed handling or the token encoding would silently break
    # routing between routers and workers of different versions
    assert hash_block(0, [1, 2, 3], 0) == 0xB0D508103F092067
    assert block_hashes(list(range(32)), 16, seed=0) == [0x5E379098FD4A83EC, 0x3B8AD58AA9EE95E7]


def test_only_full_blocks_chain_and_prefix_property():
    h = block_hashes(list(range(40)), 16)
    assert len(h) == 2
    assert block_hashes(list(range(47)), 16) == h
    assert block_hashes(list(range(48)), 16)[:2] == h
    assert block_hashes(list(range(48)), 16, start=h) == block_hashes(list(range(48)), 16)
    # chaining: the same second block after a different first block hashes differently
    a = block_hashes([1] * 16 + [2] * 16, 16)
    b = block_hashes([3] * 16 + [2] * 16, 16)
    assert a[1] != b[1]


def test_seed_and_extra_keys_change_hashes():
    base = hash_block(0, [5] * 16, 0)
    assert hash_block(0, [5] * 16, 1) != base
    assert hash_block(0, [5] * 16, 0, extra=b"lora-a") != base


def test_identical_across_processes_with_different_hash_seeds():
    code = "from engine.hashing import block_hashes; print(block_hashes(list(range(64)), 16, seed=3))"
    outs = set()
    for seed in ("1", "999"):
        env = {"PYTHONHASHSEED": seed, "PATH": ""}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                             cwd=__file__.rsplit("/tests/", 1)[0])
        outs.add(out.stdout.strip())
    assert len(outs) == 1
    assert outs.pop() == str(block_hashes(list(range(64)), 16, seed=3))
