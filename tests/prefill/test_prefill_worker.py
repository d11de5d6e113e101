"""A real prefill worker with a real decode worker, in this process: KV pushed layer by layer, load, KV events."""

from __future__ import annotations

import asyncio
import dataclasses
import re

from pdserve.engine.hashing import block_hashes
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from tests.prefill.helpers import ENGINE, greedy, run, running

PROMPT = [(7 * i + 3) % 300 + 10 for i in range(40)]  # 2 full blocks + 8 tokens
OTHER_PROMPT = [(11 * i + 5) % 300 + 10 for i in range(33)]
# tiny preset: 4 layers x (K, V) x 16 tokens x 2 KV heads x 32 dims x float32, for each of 3 blocks
PROMPT_KV_BYTES = 4 * 2 * 16 * 2 * 32 * 4 * 3
NO_PREFIX_CACHE = dataclasses.replace(ENGINE, enable_prefix_caching=False)


async def decode(stub: pb_grpc.DecodeStub, rid: str, tokens: list[int], max_tokens: int, prefill: str = ""):
    req = pb.DecodeRequest(request_id=rid, token_ids=tokens, sampling=greedy(max_tokens), prefill_address=prefill)
    return [c async for c in stub.Decode(req, timeout=60)]


async def next_batch(events) -> pb.KVEventBatch:
    return await asyncio.wait_for(events.read(), 20)


def test_ready_lines_keep_the_launcher_format(capsys):
    async def go():
        async with running("prefill") as p, running("decode") as d:
            return p.address, d.address

    p_addr, d_addr = run(go())
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("PDSERVE_READY")]
    assert lines[0] == f"PDSERVE_READY prefill {p_addr} metrics=0"
    assert re.fullmatch(rf"PDSERVE_READY decode {d_addr} kv=tcp://127\.0\.0\.1:\d+ metrics=0", lines[1]), lines


def test_disaggregated_request_matches_local_decode_and_moves_each_layer_once():
    async def go():
        async with running("prefill") as p, running("decode", NO_PREFIX_CACHE) as d:
            stub = pb_grpc.DecodeStub(d.channel)
            remote = await decode(stub, "remote", PROMPT, 8, prefill=p.address)
            local = await decode(stub, "local", PROMPT, 8)
            p_load = await pb_grpc.PrefillStub(p.channel).GetLoad(pb.LoadRequest(check_integrity=True), timeout=10)
            d_load = await stub.GetLoad(pb.LoadRequest(check_integrity=True), timeout=10)
            return p.address, remote, local, p_load, d_load

    p_addr, remote, local, p_load, d_load = run(go())
    assert [t for c in remote for t in c.token_ids] == [t for c in local for t in c.token_ids]
    assert len([t for c in remote for t in c.token_ids]) == 8
    head = remote[0]
    assert head.prefill_worker == p_addr and head.transfer_path
    assert head.transfer_bytes == PROMPT_KV_BYTES, "every layer of every prompt block, exactly once"
    assert remote[-1].finish_reason == "length"
    for load in (p_load, d_load):
        assert (load.integrity_error, load.num_live_blocks, load.num_reserved) == ("", 0, 0)
    assert p_load.prompt_tokens == len(PROMPT)


def test_get_load_describes_the_worker():
    async def go():
        async with running("prefill") as p, running("decode") as d:
            p_load = await pb_grpc.PrefillStub(p.channel).GetLoad(pb.LoadRequest(), timeout=10)
            d_load = await pb_grpc.DecodeStub(d.channel).GetLoad(pb.LoadRequest(), timeout=10)
            return p.address, d.address, p_load, d_load

    p_addr, d_addr, p_load, d_load = run(go())
    for load, role, addr in ((p_load, "prefill", p_addr), (d_load, "decode", d_addr)):
        assert (load.role, load.address, load.draining) == (role, addr, False)
        assert load.worker_id.startswith(f"{role}-")
        assert (load.transfer_backend, load.device) == ("tcp", "cpu")
        assert (load.num_total_blocks, load.num_free_blocks) == (ENGINE.num_blocks, ENGINE.num_blocks)
        assert (load.fingerprint.num_layers, load.fingerprint.block_size) == (4, ENGINE.block_size)
        assert load.vocab_size > 0 and load.max_model_len > 0
    assert p_load.kv_endpoint == "" and d_load.kv_endpoint.startswith("tcp://127.0.0.1:")
    assert p_load.worker_id != d_load.worker_id


def test_kv_events_start_with_a_snapshot_then_deltas_in_order():
    async def go():
        async with running("prefill") as p, running("decode") as d:
            stub = pb_grpc.DecodeStub(d.channel)
            await decode(stub, "first", PROMPT, 2, prefill=p.address)
            worker_id = (await pb_grpc.PrefillStub(p.channel).GetLoad(pb.LoadRequest(), timeout=10)).worker_id
            events = pb_grpc.PrefillStub(p.channel).KVEvents(pb.KVEventsRequest(), timeout=60)
            snapshot = await next_batch(events)
            await decode(stub, "second", OTHER_PROMPT, 2, prefill=p.address)
            delta = await next_batch(events)
            events.cancel()
            return worker_id, snapshot, delta

    worker_id, snapshot, delta = run(go())
    assert (snapshot.worker_id, snapshot.snapshot, snapshot.seq) == (worker_id, True, 1)
    assert sorted(snapshot.stored) == sorted(block_hashes(PROMPT, ENGINE.block_size, ENGINE.hash_seed))
    assert (delta.snapshot, delta.seq, list(delta.evicted)) == (False, 2, [])
    assert list(delta.stored) == block_hashes(OTHER_PROMPT, ENGINE.block_size, ENGINE.hash_seed)
