"""``pdserve bench --batch``: submit each run's workload as one batch job (router Batch service) instead of
streaming it, wait for the job, read every result once, and report the job's wall time and throughput.

Arrival flags (--request-rate, --max-concurrency) do not apply: the router decides when each request runs
(in spare capacity, router.batch_runner). One JSON per run: the config, the summary and per-request results
(index, output tokens, error).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import grpc

from pdserve.bench.batch_client import BatchClient
from pdserve.bench.client import to_proto
from pdserve.bench.run import request_options


def _progress(enabled: bool):
    def show(job) -> None:
        if enabled:
            done = job.num_succeeded + job.num_failed
            sys.stderr.write(f"\r  batch {job.job_id}: {done}/{job.num_requests} done, {job.num_failed} failed   ")
    return show


async def run_job(address: str, plan, a) -> dict:
    options = request_options(a)
    requests = [to_proto(r, f"bench-{a.seed}-{plan.tag}-{i}", options=options) for i, r in enumerate(plan.requests)]
    async with BatchClient(address, api_key=a.api_key, timeout_s=max(30.0, a.timeout)) as client:
        t0 = time.perf_counter()
        job_id = await client.submit(requests)
        job = await client.wait(job_id, timeout_s=a.duration, on_poll=_progress(not a.no_progress))
        if not a.no_progress:
            sys.stderr.write("\n")
        wall_s = time.perf_counter() - t0
        results, resumes = await client.read_all(job_id, timeout_s=max(60.0, a.timeout))
    indices = [r.index for r in results]
    out_tokens = sum(len(r.response.token_ids) for r in results)
    return {
        "job_id": job_id, "status": job.status, "num_requests": len(requests), "num_succeeded": job.num_succeeded,
        "num_failed": job.num_failed, "num_results": len(results), "num_duplicate_results": len(indices) - len(set(indices)),
        "num_missing_results": len(set(range(len(requests))) - set(indices)), "results_resumes": resumes,
        "wall_s": wall_s, "requests_per_s": len(requests) / wall_s if wall_s else 0.0,
        "output_tokens_per_s": out_tokens / wall_s if wall_s else 0.0,
        "results": [{"index": r.index, "output_len": len(r.response.token_ids), "error": r.error_code}
                    for r in results],
    }


def format_batch(label: str, s: dict) -> str:
    return (f"== {label} (batch job {s['job_id']}): {s['status']}, {s['num_succeeded']}/{s['num_requests']} ok, "
            f"{s['num_failed']} failed, in {s['wall_s']:.1f}s\n"
            f"   throughput {s['requests_per_s']:.2f} req/s, {s['output_tokens_per_s']:.1f} output tok/s; results "
            f"{s['num_results']} ({s['num_duplicate_results']} duplicate, {s['num_missing_results']} missing)")


def run_batch(plans, a, address: str, out_dir: Path, name: str, config: dict, label: str) -> int:
    files = []
    for plan in plans:
        try:
            summary = asyncio.run(run_job(address, plan, a))
        except grpc.RpcError as e:  # refused or unreachable: one line, as the streaming bench says it
            print(f"pdserve bench: router {address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        print(format_batch(f"{label} {plan.tag}", summary), flush=True)
        path = out_dir / f"{name}-batch-{plan.tag}-seed{a.seed}.json"
        path.write_text(json.dumps({"config": config, "summary": summary}, indent=1, allow_nan=False))
        files.append(path)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0 if all(json.loads(f.read_text())["summary"]["status"] == "completed" for f in files) else 1
