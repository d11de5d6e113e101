"""The router's hot-path shortcuts keep behaviour: lazy prefix hashing, cached sampling validation and
layouts, answering as soon as the decode stream finishes (then draining it), and the Complete aggregation."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from pdserve.engine.hashing import block_hashes
from pdserve.engine.layout import LayoutFingerprint
from pdserve.engine.sampling_params import SamplingParams
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router import metrics
from pdserve.router.load import WorkerLoad
from pdserve.router.membership import Membership, Worker
from pdserve.router.policy import PairPolicy
from pdserve.router.prefix_index import BlockEvents, PrefixIndex
from pdserve.router.request import SAMPLING_CACHE_SIZE, ClientRequest
from pdserve.router.responses import RequestState
from pdserve.router.service import GenerationServicer

FP = LayoutFingerprint(model_id="tiny", revision="main", num_layers=4, num_kv_heads=2, head_dim=32,
                       block_size=4, dtype="float32", hash_seed=7)


class FakeCall:
    """Stands in for a grpc.aio unary-stream call: one async iterator, however often it is iterated."""

    def __init__(self, chunks: list[pb.DecodeChunk], error: grpc.aio.AioRpcError | None = None):
        self.chunks, self.error = chunks, error
        self.cancelled = self.exhausted = False
        self._it = self._gen()

    async def _gen(self):
        for c in self.chunks:
            await asyncio.sleep(0)
            yield c
        if self.error is not None:
            raise self.error
        self.exhausted = True

    def __aiter__(self):
        return self._it

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    async def trailing_metadata(self):
        return ()


class FakeDecodeStub:
    def __init__(self, chunks):
        self.chunks, self.calls, self.requests = chunks, [], []

    def Decode(self, request, timeout=None, metadata=None):
        self.requests.append(request)
        call = FakeCall(self.chunks)
        self.calls.append(call)
        return call


class FakeContext:
    def time_remaining(self):
        return None

    def set_trailing_metadata(self, md):
        pass

    async def abort(self, code, details):
        raise RuntimeError(f"{code.name}: {details}")


def servicer(chunks, index: PrefixIndex | None = None) -> tuple[GenerationServicer, Worker, Worker]:
    m = Membership()
    loads = dict(fingerprint=FP, vocab_size=1000, max_model_len=4096, num_total_blocks=100, num_free_blocks=100,
                 host="h", device="cpu")
    p = Worker("p:1", "prefill", None, None, load=WorkerLoad(address="p:1", **loads), healthy=True)
    d = Worker("d:1", "decode", None, FakeDecodeStub(chunks), load=WorkerLoad(address="d:1", **loads), healthy=True)
    m.workers = {p.address: p, d.address: d}
    return GenerationServicer(m, PairPolicy("cache_aware", index or PrefixIndex()), tokenizer=None), p, d


def chunk(tokens, text, finish=""):
    return pb.DecodeChunk(token_ids=tokens, text=text, finish_reason=finish)


def test_prefix_hashes_stop_after_the_first_block_nobody_holds_and_overlap_is_unchanged():
    rng = random.Random(0)
    for trial in range(200):
        prompt = [rng.randrange(1000) for _ in range(rng.randrange(0, 60))]
        full = block_hashes(prompt, 4, 7)
        idx = PrefixIndex()
        held = full[: rng.randrange(len(full) + 1)]
        if held and rng.random() < 0.3:  # a hole: a later block held, an earlier one not
            held = held[:-2] + held[-1:]
        idx.apply("p:1", BlockEvents(stored=tuple(held), snapshot=True))
        g, _, _ = servicer([], idx)
        st = RequestState.of(ClientRequest("r", tuple(prompt), SamplingParams(max_tokens=4)))
        lazy = g.failover._prefix_hashes(st, 4, 7)
        assert lazy == full[: len(lazy)], trial
        assert idx.overlap(lazy, ["p:1", "d:1"]) == idx.overlap(full, ["p:1", "d:1"]), trial
        # a migration appends tokens: the chain is extended, and matches a fresh computation
        st.sent = [rng.randrange(1000) for _ in range(9)]
        idx.apply("p:1", BlockEvents(stored=tuple(block_hashes(prompt + st.sent, 4, 7)), seq=2))
        assert g.failover._prefix_hashes(st, 4, 7) == block_hashes(prompt + st.sent, 4, 7), trial


def test_sampling_validation_is_cached_but_errors_are_not():
    g, _, _ = servicer([])
    a = g.parser.sampling(pb.SamplingParams(max_tokens=5, temperature=0))
    assert a is g.parser.sampling(pb.SamplingParams(max_tokens=5, temperature=0))
    assert g.parser.sampling(pb.SamplingParams(max_tokens=6)).max_tokens == 6
    for _ in range(2):
        with pytest.raises(ValueError, match="temperature"):
            g.parser.sampling(pb.SamplingParams(temperature=-1))
    for i in range(SAMPLING_CACHE_SIZE + 5):
        g.parser.sampling(pb.SamplingParams(seed=i))
    assert len(g.parser._sampling) <= SAMPLING_CACHE_SIZE


def test_vocabulary_is_checked_against_the_chosen_pair_and_ids_are_generated():
    async def go(token_ids):
        g, _, d = servicer([chunk([5], "a", "stop")])
        # a worker that reports a smaller model but is not available comes first: it is not the one checked
        small = Worker("d:0", "decode", None, None, load=WorkerLoad(vocab_size=10, max_model_len=8), draining=True)
        g.failover.membership.workers = {"d:0": small, **g.failover.membership.workers}
        return await g.Complete(pb.GenerateRequest(token_ids=token_ids), FakeContext())

    assert asyncio.run(go([1, 999, 2])).decode_worker == "d:1"
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT: token_ids: 1000 is outside the vocabulary"):
        asyncio.run(go([1, 1000, 2]))
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT: token_ids: -1 is outside"):
        asyncio.run(go([1, -1]))
    g, _, _ = servicer([])
    ids = {g.parser.parse(pb.GenerateRequest(token_ids=[1])).request_id for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 16 and i.startswith("req-") for i in ids)


def test_complete_answers_at_finish_and_drains_the_decode_stream():
    async def go():
        g, p, d = servicer([chunk([5, 6], "ab"), chunk([7], "c", "length")])
        req = pb.GenerateRequest(token_ids=list(range(3, 20)), sampling=pb.SamplingParams(max_tokens=3))
        resp = await g.Complete(req, FakeContext())
        call = d.stub.calls[0]
        assert (list(resp.token_ids), resp.text, resp.finish_reason) == ([5, 6, 7], "abc", "length")
        assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (17, 3)
        assert resp.decode_worker == "d:1" and resp.prefill_worker == "p:1"
        forwarded = d.stub.requests[0]
        assert forwarded.prefill_address == "p:1" and forwarded.sampling.max_tokens == 3
        assert forwarded.sampling.HasField("top_p"), "the validated params are forwarded, defaults explicit"
        for _ in range(10):
            await asyncio.sleep(0)
        assert call.exhausted and not call.cancelled, "the finished stream is drained, never cancelled"
        assert d.in_flight == 0 and p.in_flight == 0 and not g.failover.leg._draining
        return resp

    asyncio.run(go())


def test_generate_streams_every_chunk_and_one_final():
    async def go():
        g, _, d = servicer([chunk([5], "a"), chunk([6], "b"), chunk([7], "c", "stop")])
        req = pb.GenerateRequest(token_ids=list(range(3, 20)), sampling=pb.SamplingParams(max_tokens=8))
        out = [r async for r in g.Generate(req, FakeContext())]
        await asyncio.sleep(0.01)
        assert [list(r.token_ids) for r in out] == [[5], [6], [7]]
        assert [r.finish_reason for r in out] == ["", "", "stop"] and out[-1].usage.completion_tokens == 3
        assert d.in_flight == 0

    asyncio.run(go())


def test_metric_children_are_cached():
    before = metrics.REQUESTS.labels("OK")._value.get()
    metrics.count_request("OK")
    metrics.count_request("OK")
    assert metrics.REQUESTS.labels("OK")._value.get() == before + 2
    assert metrics._child(metrics.REQUESTS, metrics._requests, "OK") is metrics.REQUESTS.labels("OK")
