"""A batch job survives a kill -9 of the router, and every result arrives exactly once.

A local cluster (tiny model) whose router keeps batch jobs in a SQLite file. One job of ``--num-requests``
greedy requests is submitted; a client follows ``Batch.Results`` from the start. When the client holds
``--kill-at`` of the results, the router process gets SIGKILL and is started again on the same port (same
database). The client's stream breaks; it calls ``Results`` again from its last index + 1 (the documented way to
resume, bench/batch_client.py) until the job ends. Checked against the baseline of the submitted job: results
received (each index once, none missing, in index order), the database's own count, error results, and, for
every result, the tokens of the offline engine on the same model (greedy, unloaded).

    python -m bench.batch_restart --json /tmp/batch_restart.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import tempfile
import time
from pathlib import Path

from pdserve.bench.batch_client import BatchClient
from pdserve.deploy.local import LocalCluster, _await_ready, kill_group, respawn
from pdserve.protos import pdserve_pb2 as pb


def make_requests(n: int, max_tokens: int, seed: int) -> list[pb.GenerateRequest]:
    rng = random.Random(seed)
    return [pb.GenerateRequest(token_ids=[rng.randrange(3, 259) for _ in range(rng.randint(8, 40))],
                               sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
            for _ in range(n)]


async def drive(c: LocalCluster, requests: list[pb.GenerateRequest], kill_at: int, timeout_s: float) -> dict:
    router = next(p for p in c.procs if p.role == "router")
    async with BatchClient(c.router_address) as client:
        t0 = time.perf_counter()
        job_id = await client.submit(requests)
        got: list[pb.BatchResult] = []
        reader = asyncio.ensure_future(client.read_all(job_id, timeout_s=timeout_s, sink=got))
        while len(got) < kill_at:
            if reader.done():
                raise RuntimeError("the job ended before the kill")
            await asyncio.sleep(0.01)
        t_kill = time.perf_counter()
        held_at_kill = len(got)
        kill_group(router, signal.SIGKILL)
        await asyncio.to_thread(router.popen.wait, 10)
        respawn(router, c.env, c.echo)
        await asyncio.to_thread(_await_ready, router, 120)
        t_back = time.perf_counter()
        results, resumes = await reader
        t_done = time.perf_counter()
        job = await client.get(job_id)
    return {"job": job, "results": results, "resumes": resumes, "held_at_kill": held_at_kill,
            "kill_s": t_kill - t0, "restart_s": t_back - t_kill, "total_s": t_done - t0}


def reference(model: str, requests: list[pb.GenerateRequest]) -> list[list[int]]:
    from pdserve import LLM, SamplingParams

    llm = LLM(model)
    params = [SamplingParams(max_tokens=r.sampling.max_tokens, temperature=0.0, ignore_eos=True) for r in requests]
    return [o.token_ids for o in llm.generate([list(r.token_ids) for r in requests], params)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local", default="1,1", help="P,D workers")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--kill-at", type=int, default=400, help="results the client holds when the router is killed")
    ap.add_argument("--batch-concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    requests = make_requests(a.num_requests, a.max_tokens, a.seed)
    num_prefill, num_decode = (int(x) for x in a.local.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--batch-db", str(Path(tmp) / "jobs.sqlite3"), "--batch-concurrency", str(a.batch_concurrency)]
        with LocalCluster(num_prefill, num_decode, model=a.model, router_args=args) as c:
            res = asyncio.run(drive(c, requests, a.kill_at, a.timeout))
    results, job = res["results"], res["job"]
    indices = [r.index for r in results]
    ref = reference(a.model, requests)
    out = {
        "num_requests": len(requests), "results_received": len(results),
        "duplicates": len(indices) - len(set(indices)), "missing": len(set(range(len(requests))) - set(indices)),
        "in_index_order": indices == sorted(indices), "errors": sum(bool(r.error_code) for r in results),
        "exact_tokens": sum(list(r.response.token_ids) == ref[r.index] for r in results),
        "job_status": job.status, "db_succeeded": job.num_succeeded, "db_failed": job.num_failed,
        "held_at_kill": res["held_at_kill"], "stream_resumes": res["resumes"], "kill_after_s": res["kill_s"],
        "router_restart_s": res["restart_s"], "total_s": res["total_s"],
    }
    print(f"batch job of {len(requests)} requests; router SIGKILLed after {out['kill_after_s']:.1f}s with "
          f"{out['held_at_kill']} results delivered, back in {out['router_restart_s']:.1f}s; job {job.status} "
          f"after {out['total_s']:.1f}s")
    print(f"  results received {len(results)}/{len(requests)} ({len(results) / len(requests):.3f}x the submitted "
          f"requests): duplicates {out['duplicates']}, missing {out['missing']}, in index order "
          f"{out['in_index_order']}, stream resumes {out['stream_resumes']}")
    print(f"  database: {job.num_succeeded} succeeded, {job.num_failed} failed; exact tokens (offline engine) "
          f"{out['exact_tokens']}/{len(results)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
