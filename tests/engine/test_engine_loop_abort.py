"""EngineLoop.abort counts an abort on the engine thread, in the same command that frees the blocks.

A worker's GetLoad reads the loop's published stats, so a reader that sees the blocks free also sees the abort
counted (a counter bumped by the service after awaiting the abort lagged the freed blocks: a flaky cluster test).
"""

from __future__ import annotations

from pdserve.engine.engine_loop import EngineLoop


def test_an_abort_is_counted_with_its_freed_blocks_and_an_unknown_id_is_not(tiny_llm):
    loop = EngineLoop(tiny_llm.engine, name="abort-test").start()
    try:
        loop.call(lambda e: e.reserve("r1", 40)).result(10)
        loop.call(lambda e: None).result(10)  # the stats are published after each command
        assert loop.stats.num_free_blocks < loop.stats.num_total_blocks
        assert loop.num_aborted == 0
        assert loop.abort("r1").result(10) is True
        assert loop.num_aborted == 1
        assert loop.abort("r1").result(10) is False  # already gone: not counted twice
        assert loop.abort("no-such-request").result(10) is False
        assert loop.num_aborted == 1
        loop.call(lambda e: None).result(10)
        assert loop.stats.num_free_blocks == loop.stats.num_total_blocks
    finally:
        loop.stop()
