"""Prometheus metrics from a live cluster, and SIGTERM during load losing no request."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pdserve import LLM, SamplingParams
from pdserve.deploy.local import LocalCluster
from pdserve.protos import pdserve_pb2 as pb
from tests.cluster.conftest import generate_many

S = pb.SamplingParams


DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pdserve-dashboard.json"


def scrape(port: int) -> dict[str, float]:
    """Every sample, keyed ``name{label="v",...}`` (labels sorted), from the text format parser."""
    return {key(s): s.value for fam in families(port) for s in fam.samples}


def families(port: int) -> list:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return list(text_string_to_metric_families(text))


def key(sample) -> str:
    if not sample.labels:
        return sample.name
    return sample.name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items())) + "}"


def total(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def check_families(fams: list, role: str) -> None:
    for fam in fams:
        assert fam.samples, f"{role}: empty family {fam.name} (HELP/TYPE only)"
        for s in fam.samples:
            assert "role" not in s.labels, f"{role}: {s.name} has a role label"
            if role != "router" and fam.name.startswith(("pdserve_worker", "pdserve_kv")):
                assert s.labels.get("worker", "").startswith(f"{role}-"), f"{role}: {s.name} lacks worker"
            assert "tcp://" not in s.labels.get("peer", ""), f"{role}: peer label {s.labels} is an address"


def test_metrics_exist_and_move():
    args = ["--metrics-port", "-1"]
    with LocalCluster(1, 1, extra_worker_args=args, router_args=[*args, "--local-prefill-tokens", "0"]) as c:
        ports = {p.role: p.metrics_port for p in c.procs}
        assert all(ports.values()), ports
        before = {role: scrape(port) for role, port in ports.items()}
        r0 = before["router"]
        # labelled counters exist at 0 before their first event
        for k in ('pdserve_router_requests_total{status="RESOURCE_EXHAUSTED"}', 'pdserve_router_shed_total{reason="slo"}',
                  'pdserve_router_shed_total{reason="capacity"}', 'pdserve_router_requests_total{status="OK"}',
                  'pdserve_router_shed_by_class_total{request_class="high"}'):
            assert r0[k] == 0, k
        assert any(k.startswith("pdserve_router_routing_decisions_total{") for k in r0)
        reqs = [pb.GenerateRequest(token_ids=list(range(10 + i, 60 + i)), sampling=S(max_tokens=6, ignore_eos=True))
                for i in range(6)]  # exactly 36 tokens: no early eos
        assert all(not isinstance(r, Exception) for r in generate_many(c.router_address, reqs))
        after = {role: scrape(port) for role, port in ports.items()}
        r1 = after["router"]
        assert total(r1, 'pdserve_router_requests_total{status="OK"}') - total(r0, 'pdserve_router_requests_total{status="OK"}') == 6
        assert total(r1, "pdserve_router_generated_tokens_total") - total(r0, "pdserve_router_generated_tokens_total") == 36
        for name in ("pdserve_router_ttft_seconds_count", "pdserve_router_e2e_seconds_count",
                     "pdserve_router_tpot_seconds_count", "pdserve_router_prompt_tokens_total"):
            assert total(r1, name) > total(r0, name), name
        assert total(r1, "pdserve_router_routing_decisions_total") >= 6
        for role in ("prefill", "decode"):
            w0, w1 = before[role], after[role]
            assert total(w1, "pdserve_worker_steps_total") > total(w0, "pdserve_worker_steps_total"), role
            assert total(w1, "pdserve_worker_step_seconds_count") > total(w0, "pdserve_worker_step_seconds_count")
            assert total(w1, "pdserve_worker_generated_tokens_total") > total(w0, "pdserve_worker_generated_tokens_total")
            assert any(k.startswith("pdserve_worker_info{") and f'pdserve_role="{role}"' in k for k in w1)
            for name in ("pdserve_worker_kv_blocks", "pdserve_worker_waiting_requests",
                         "pdserve_worker_running_requests", "pdserve_worker_drain_ready",
                         "pdserve_worker_prefix_hit_tokens_total"):
                assert any(k.startswith(name) for k in w1), f"{role} lacks {name}"
        p1 = after["prefill"]
        assert total(p1, "pdserve_kv_transfer_bytes_total") > 0
        assert total(p1, "pdserve_kv_transfer_seconds_total") > 0
        assert total(p1, "pdserve_kv_transfers_total") >= 6
        assert not any(k.startswith("pdserve_kv_transfer_bandwidth") for k in p1)
        peers = {s.labels["peer"] for f in families(ports["prefill"]) for s in f.samples if "peer" in s.labels}
        assert peers and all(p.startswith("decode-") for p in peers), peers
        for role, port in ports.items():
            check_families(families(port), role)
        # every dashboard query names only metrics some process exports
        exported = {name for m in after.values() for k in m for name in (k.split("{")[0],)}
        for name in set(re.findall(r"pdserve_\w+", DASHBOARD.read_text())):
            assert name in exported, f"dashboard queries {name}, which nothing exports"


def test_sigterm_during_load_loses_no_request():
    prompts = [list(range(20 + i, 80 + i)) for i in range(24)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in LLM("tiny").generate(prompts, params)]
    args = ["--debug-step-delay-ms", "10"]
    with LocalCluster(2, 2, policy="round_robin", extra_worker_args=args,
                      router_args=["--local-prefill-tokens", "0"]) as c:
        reqs = [pb.GenerateRequest(token_ids=p, sampling=S(max_tokens=24, temperature=0, ignore_eos=True))
                for p in prompts]
        victims = [c.workers("decode")[0], c.workers("prefill")[0]]

        def terminate():
            time.sleep(0.6)  # mid-load
            for v in victims:
                os.kill(v.popen.pid, signal.SIGTERM)

        t = threading.Thread(target=terminate)
        t.start()
        results = generate_many(c.router_address, reqs)
        t.join()
        for i, r in enumerate(results):
            assert not isinstance(r, Exception), f"request {i} failed during the rolling stop: {r}"
            assert [x for m in r for x in m.token_ids] == expected[i], f"request {i} tokens differ"
        for v in victims:
            assert v.popen.wait(30) == 0, "a SIGTERMed worker exits cleanly within its grace period"
