"""Chaos under load (fast form): every fault ends recovered or cleanly reported, no wrong token, no leak."""

from __future__ import annotations

import pytest

from pdserve.bench.chaos import FAULTS, expected, run_fault, workload

PROMPTS = workload(12)


@pytest.fixture(scope="module")
def want():
    return expected(PROMPTS)


@pytest.mark.parametrize("fault", FAULTS)
def test_fault(fault, want):
    r = run_fault(fault, PROMPTS, want)
    assert r.in_flight == len(PROMPTS)
    assert r.wrong == 0, "a request completed with wrong or duplicated tokens"
    assert r.leaked_blocks == 0 and not r.integrity_errors, (r.leaked_blocks, r.integrity_errors)
    if fault == "SIGSTOP decode past the deadline":
        assert set(r.failed) <= {"DEADLINE_EXCEEDED"}, r.failed
        assert r.correct >= len(PROMPTS) // 2 - 1, "requests on the healthy worker complete"
    else:
        assert r.correct == len(PROMPTS), f"{fault}: {r.failed}"
    if fault.startswith("cut KV"):
        assert r.kv_resends >= 2, "the injected cuts hit transfers, and the sender re-sent them"
        assert r.retries >= r.kv_failures, "a transfer that failed even so was retried by the router"
