"""Churn, CI size: 15 s of adding, killing (-9), restarting and draining workers under a closed loop of clients.
Every request ends before its deadline with OK or a clean status, and no block leaks (the 120 s run:
``python -m bench.churn``, bench/RESULTS.md)."""

from __future__ import annotations

import pytest

from pdserve.bench.churn import ACTIONS, churn, report
from pdserve.deploy.local import LocalCluster


@pytest.mark.timeout(420)
def test_churn_fast():
    with LocalCluster(2, 2, policy="round_robin", router_args=["--local-prefill-tokens", "0"]) as c:
        res = churn(c, seconds=15, concurrency=3, deadline_s=30.0, max_tokens=8)
    print(report(res))
    assert res.num_requests > 0 and res.ends["OK"] > 0
    assert sum(res.actions.values()) >= 6 and res.actions["kill"] >= 1, res.actions  # the churn did happen
    assert res.hung == 0, res.ends
    assert res.unclean == 0, res.ends
    assert sum(res.ends.values()) + res.no_end == res.num_requests
    assert res.leaked_blocks == 0 and not res.integrity_errors, (res.leaked_blocks, res.integrity_errors)
    assert set(res.actions) <= set(ACTIONS)
