"""End to end: greedy outputs through router -> prefill -> KV transfer -> decode equal offline LLM.generate."""

from __future__ import annotations

import random

import pytest

from pdserve import LLM, SamplingParams
from pdserve.deploy.local import LocalCluster
from pdserve.protos import pdserve_pb2 as pb
from tests.cluster.conftest import direct_load, generate_many

NUM_REQUESTS = 16
MAX_TOKENS = 12
ALL_DISAGG = ["--local-prefill-tokens", "0"]  # no conditional disaggregation: every request crosses


@pytest.fixture(scope="module")
def workload():
    rng = random.Random(1234)
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randint(1, 200))] for _ in range(NUM_REQUESTS)]
    # a shared prefix so the prefill worker's prefix cache is exercised
    prompts[1] = prompts[0][:48] + prompts[1][:20]
    prompts[2] = prompts[0][:48] + prompts[2][:5]
    llm = LLM("tiny", num_blocks=512)
    expected = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))]
    return prompts, expected


def _requests(prompts):
    return [
        pb.GenerateRequest(
            request_id=f"e2e-{i}", token_ids=p, sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
        )
        for i, p in enumerate(prompts)
    ]


def _check(cluster: LocalCluster, prompts, expected, disaggregated: bool = True):
    reqs = _requests(prompts)
    # the first request warms the prefix cache for the two that share its prefix; the rest go concurrently
    results = generate_many(cluster.router_address, reqs[:1]) + generate_many(cluster.router_address, reqs[1:])
    prefill_workers, decode_workers = set(), set()
    for i, res in enumerate(results):
        assert not isinstance(res, Exception), f"request {i} failed: {res}"
        tokens = [t for r in res for t in r.token_ids]
        assert tokens == expected[i], f"request {i}: got {tokens}, want {expected[i]}"
        last = res[-1]
        assert last.finish_reason in ("stop", "length")
        assert last.usage.prompt_tokens == len(prompts[i])
        assert last.usage.completion_tokens == len(tokens)
        prefill_workers.add(last.prefill_worker)
        decode_workers.add(last.decode_worker)
    if disaggregated:
        assert "" not in prefill_workers, "every request should have gone through a prefill worker"
    assert len(decode_workers) == cluster.num_decode
    assert len(prefill_workers) == max(1, cluster.num_prefill)
    # nothing stranded: every decode block is free again, no reservation left
    for p in cluster.workers("decode"):
        load = direct_load(p.address, "decode")
        assert load.num_running == 0 and load.num_reserved == 0
        assert load.num_free_blocks == load.num_total_blocks
    return results


@pytest.mark.parametrize(
    "transfer,extra",
    [("tcp", []), ("tcp", ["--no-shm"]), ("nccl", []), ("ucx", [])],
    ids=["tcp-shm", "tcp-stream", "nccl-gloo", "ucx"],
)
def test_1p1d_matches_offline(workload, transfer, extra):
    prompts, expected = workload
    with LocalCluster(1, 1, transfer=transfer, extra_worker_args=extra, router_args=ALL_DISAGG) as c:
        results = _check(c, prompts, expected)
    cached = [r[-1].usage.cached_prompt_tokens for r in results]
    assert sum(cached) > 0, "shared prefixes should hit the prefill worker's prefix cache"


def test_2p2d_matches_offline(workload):
    prompts, expected = workload
    with LocalCluster(2, 2, transfer="tcp", policy="round_robin", router_args=ALL_DISAGG) as c:
        _check(c, prompts, expected)


def test_colocated_matches_offline(workload):
    """No prefill pool: decode workers prefill locally (the colocated baseline)."""
    prompts, expected = workload
    with LocalCluster(0, 1, transfer="tcp") as c:
        _check(c, prompts, expected, disaggregated=False)


def test_conditional_disaggregation_mixes_paths(workload):
    """Default router: short prompts prefill on the decode worker, long ones go through the prefill pool."""
    prompts, expected = workload
    with LocalCluster(1, 1, transfer="tcp") as c:
        results = generate_many(c.router_address, _requests(prompts))
        paths = {}
        for i, res in enumerate(results):
            assert [t for r in res for t in r.token_ids] == expected[i]
            paths[i] = res[-1].prefill_worker
        assert all(paths[i] == "" for i, p in enumerate(prompts) if len(p) <= 16)
        assert all(paths[i] != "" for i, p in enumerate(prompts) if len(p) > 16 and i > 2)
