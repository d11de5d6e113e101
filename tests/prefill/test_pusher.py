"""The engine's KV connector: called once per layer of each step, and the prefill pusher built on it."""

from __future__ import annotations

from pdserve.engine.config import EngineConfig
from pdserve.engine.connector import KVConnector
from pdserve.engine.engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kvtransfer.base import TransferError
from pdserve.prefill.pusher import LayerPusher, TransferPlan

NUM_LAYERS = 4  # the tiny preset
PROMPT = [(7 * i + 3) % 300 + 10 for i in range(40)]  # 2 full blocks of 16 and 8 tokens
ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


class Recorder:
    """A connector that records, per step, the scheduled request ids and the layers it was told about."""

    def __init__(self, only: str | None = None):
        self.only = only
        self.steps: list[tuple[list[str], list[int]]] = []

    def layer_ready(self, scheduled):
        ids = [s.seq.request_id for s in scheduled]
        if self.only is not None and self.only not in ids:
            return None
        layers: list[int] = []
        self.steps.append((ids, layers))
        return layers.append


class FakeHandle:
    def __init__(self, fail_at_layer: int | None = None):
        self.fail_at_layer = fail_at_layer
        self.pushes: list[tuple[int, list[int], list[int]]] = []

    def push_layer(self, layer, src_block_ids, dst_block_ids, ready=None):
        if layer == self.fail_at_layer:
            raise TransferError("link cut")
        self.pushes.append((layer, list(src_block_ids), list(dst_block_ids)))


def engine(connector, **kw) -> LLMEngine:
    cfg = EngineConfig("tiny", num_blocks=32, block_size=16, **kw)
    return LLMEngine(cfg, kv_connector=connector)


def run_to_end(eng: LLMEngine, max_steps: int = 50) -> int:
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
        assert steps <= max_steps, "the engine did not finish"
    return steps


def test_recorder_is_a_connector():
    assert isinstance(Recorder(), KVConnector)
    assert isinstance(LayerPusher(16, cuda=False), KVConnector)


def test_connector_is_called_once_per_layer_of_every_step():
    rec = Recorder()
    eng = engine(rec, max_num_batched_tokens=16)  # the 40-token prompt runs in chunks of 16, 16, 8
    eng.add_request("a", PROMPT, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    num_steps = run_to_end(eng)
    assert num_steps == 5  # 3 prefill chunks, then 2 decode steps
    assert rec.steps == [(["a"], list(range(NUM_LAYERS)))] * num_steps
    eng.check_integrity()


def test_a_step_the_connector_declines_runs_without_a_callback():
    rec = Recorder(only="b")
    eng = engine(rec)
    eng.add_request("a", PROMPT, ONE_TOKEN)
    run_to_end(eng)
    assert rec.steps == []
    eng.add_request("b", PROMPT[:20], ONE_TOKEN)
    run_to_end(eng)
    assert rec.steps == [(["b"], list(range(NUM_LAYERS)))]


def prefill(eng: LLMEngine, pusher: LayerPusher, rid: str, handle: FakeHandle, dst: list[int]) -> list[int]:
    """Prefill ``PROMPT`` as a prefill worker does; returns the request's own block ids."""
    pusher.plans[rid] = TransferPlan(handle, dst)
    eng.add_request(rid, PROMPT, ONE_TOKEN, prefill_only=True)
    run_to_end(eng)
    src = list(eng.held[rid])
    pusher.plans.pop(rid)
    assert eng.release(rid)
    return src


def test_pusher_sends_each_chunk_layer_by_layer_to_the_reserved_blocks():
    pusher = LayerPusher(16, cuda=False)
    eng = engine(pusher, max_num_batched_tokens=16)
    handle = FakeHandle()
    src = prefill(eng, pusher, "a", handle, dst=[20, 21, 22])
    expected = [
        (layer, [src[block]], [20 + block]) for block in range(3) for layer in range(NUM_LAYERS)
    ]
    assert handle.pushes == expected
    eng.check_integrity()


def test_pusher_first_chunk_also_sends_prefix_cached_blocks():
    pusher = LayerPusher(16, cuda=False)
    eng = engine(pusher)
    eng.add_request("warm", PROMPT, ONE_TOKEN)  # caches the prompt's 2 full blocks; no plan: nothing pushed
    run_to_end(eng)
    handle = FakeHandle()
    src = prefill(eng, pusher, "b", handle, dst=[5, 6, 7])
    assert handle.pushes == [(layer, src, [5, 6, 7]) for layer in range(NUM_LAYERS)]
    eng.check_integrity()


def test_a_dead_link_stops_only_its_own_transfer():
    pusher = LayerPusher(16, cuda=False)
    eng = engine(pusher)
    bad, good = FakeHandle(fail_at_layer=1), FakeHandle()
    pusher.plans["bad"] = TransferPlan(bad, [0, 1, 2])
    pusher.plans["good"] = TransferPlan(good, [3, 4, 5])
    eng.add_request("bad", PROMPT, ONE_TOKEN, prefill_only=True)
    eng.add_request("good", PROMPT[::-1], ONE_TOKEN, prefill_only=True)
    run_to_end(eng)
    assert [p[0] for p in bad.pushes] == [0], "no push after the link died"
    assert [p[0] for p in good.pushes] == list(range(NUM_LAYERS))
    assert eng.release("bad") and eng.release("good")
    eng.check_integrity()
