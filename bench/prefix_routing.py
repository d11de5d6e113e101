"""Prefix hit rate and TTFT of routing policies on a multi-turn shared-prefix chat workload (issue 4).

    python -m bench.prefix_routing --out bench/out/prefix_routing.json

Workload: ``--num-system`` system prompts shared by ``--users`` sessions (user u uses system prompt
u % num_system), ``--turns`` turns each. Turn k's prompt = turn k-1's prompt + the answer the model actually
streamed back + a new user message, so both the shared system prompt and each session's own history can be
reused. Requests go out in one fixed, seeded order (turn by turn, users shuffled within each turn); a turn is
sent only after the same user's previous turn has finished, and at most ``--concurrency`` are in flight. No
sleeps: KV events reach the router as fast as they reach it for any client.

Every policy runs on a fresh local cluster (``--prefill`` + ``--decode`` workers, ``--num-blocks`` KV blocks
each, small enough that placement matters), with the same workload and arrival order.

Prefix hit rate = cached prompt tokens / prompt tokens over all requests. Cached tokens are what the worker
that ran the prefill reused from its prefix cache (``usage.cached_prompt_tokens``; full blocks only, and
capped so at least one prompt token is computed). A prompt that the router sends to a decode worker for a
local prefill (conditional disaggregation) counts the hits on that decode worker.

Oracle (offline upper bound, computed from each run's own prompts and answers in send order): ONE shared
prefix cache of infinite size. Request i's hit = the number of leading full blocks of its prompt that any
earlier-sent request computed KV for (its prompt, and its answer except the last token), with the engine's
cap (at most (prompt_len - 1) // block_size blocks). No router over any number of finite caches can beat it
(``requests_over_oracle`` counts requests that did: only possible if a later-sent request's prefill ran first).
``oracle_prompts`` is the same bound counting prompt KV only (what the prefill pool ever holds: a router
that always prefills on the prefill pool cannot beat it either).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import grpc

from pdserve.bench.prefix_workload import (
    ORACLE_DEFINITION,
    TurnRecord,
    Workload,
    WorkloadConfig,
    oracle_hits,
    summarize,
)
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving.rpc import worker_channel

logger = logging.getLogger(__name__)

# the workload half lives in bench.prefix_workload; these names stay importable from here
__all__ = ["ORACLE_DEFINITION", "TurnRecord", "Workload", "WorkloadConfig", "drive", "format_table", "main",
           "measure", "oracle_hits", "run_policy", "summarize"]


# ---- driving one run --------------------------------------------------------------------------------
async def _one(stub, rec: TurnRecord, out_len: int, rid: str, t0: float, timeout_s: float) -> TurnRecord:
    sampling = pb.SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    req = pb.GenerateRequest(request_id=rid, token_ids=rec.prompt, sampling=sampling, session_id=f"user{rec.user}")
    start = time.perf_counter()
    rec.send_s = start - t0
    try:
        async for resp in stub.Generate(req, timeout=timeout_s):
            if not rec.output and resp.token_ids:
                rec.ttft_s = time.perf_counter() - start
            rec.output.extend(resp.token_ids)
            if resp.finish_reason:
                rec.cached_tokens = resp.usage.cached_prompt_tokens
                rec.prefill_worker, rec.decode_worker = resp.prefill_worker, resp.decode_worker
    except grpc.aio.AioRpcError as e:
        rec.status = e.code().name
        logger.warning("%s failed: %s: %s", rid, rec.status, e.details())
    rec.e2e_s = time.perf_counter() - start
    if rec.status == "OK" and not rec.output:
        rec.status = "EMPTY"
    return rec


async def drive(address: str, wl: Workload, concurrency: int, timeout_s: float = 120.0) -> list[TurnRecord]:
    """Send the workload in its fixed order, at most ``concurrency`` in flight; a user's turn k+1 is built from
    (and sent after) turn k's answer. Returns the records in send order."""
    if concurrency < 1:
        raise ValueError(f"concurrency: must be >= 1, got {concurrency}")
    slots = asyncio.Semaphore(concurrency)
    pending: dict[tuple[int, int], asyncio.Task] = {}
    tasks: list[asyncio.Task] = []
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        await asyncio.wait_for(ch.channel_ready(), 15)
        t0 = time.perf_counter()

        async def run(rec: TurnRecord, out_len: int, rid: str) -> TurnRecord:
            try:
                return await _one(stub, rec, out_len, rid, t0, timeout_s)
            finally:
                slots.release()

        for i, (u, k) in enumerate(wl.order):
            if k == 0:
                history = list(wl.systems[u % len(wl.systems)])
            else:
                prev = await pending.pop((u, k - 1))
                history = prev.prompt + prev.output
            await slots.acquire()
            rec = TurnRecord(u, k, history + wl.user_texts[u][k])
            task = asyncio.ensure_future(run(rec, wl.out_lens[u][k], f"pr-{i}-u{u}-t{k}"))
            pending[(u, k)] = task
            tasks.append(task)
        return list(await asyncio.gather(*tasks))


async def _count_events(address: str, role: str, counts: dict, secret: str | None = None) -> None:
    """Count the stored / evicted block hashes a worker reports (the same stream the router indexes)."""
    async with worker_channel(address, secret, "prefix-routing-bench") as ch:
        stub = pb_grpc.PrefillStub(ch) if role == "prefill" else pb_grpc.DecodeStub(ch)
        try:
            async for batch in stub.KVEvents(pb.KVEventsRequest()):
                counts["stored"] += len(batch.stored)
                counts["evicted"] += len(batch.evicted)
        except grpc.aio.AioRpcError as e:
            logger.debug("KV events of %s ended: %s", address, e.code().name)


async def _loads(workers: list[tuple[str, str]], secret: str | None = None) -> dict[str, pb.WorkerLoad]:
    out = {}
    for address, role in workers:
        async with worker_channel(address, secret, "prefix-routing-bench") as ch:
            stub = pb_grpc.PrefillStub(ch) if role == "prefill" else pb_grpc.DecodeStub(ch)
            out[address] = await stub.GetLoad(pb.LoadRequest(), timeout=10)
    return out


async def run_policy(address: str, workers: list[tuple[str, str]], wl: Workload, concurrency: int,
                     timeout_s: float, secret: str | None = None) -> tuple[list[TurnRecord], dict]:
    """Drive the workload while counting every worker's KV events; -> (records, per-worker stats). ``secret``: the
    cluster's, for the direct calls to workers."""
    counts = {a: {"role": r, "stored": 0, "evicted": 0} for a, r in workers}
    watchers = [asyncio.ensure_future(_count_events(a, r, counts[a], secret)) for a, r in workers]
    try:
        records = await drive(address, wl, concurrency, timeout_s)
        await asyncio.sleep(0.2)  # the last events (after the run, not between requests)
    finally:
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    for a, load in (await _loads(workers, secret)).items():
        counts[a].update(prefix_hit_tokens=load.prefix_hit_tokens, prompt_tokens=load.prompt_tokens)
    return records, counts


# ---- the benchmark ----------------------------------------------------------------------------------
def measure(policy: str, address: str, workers: list[tuple[str, str]], wl: Workload, concurrency: int,
            timeout_s: float, block_size: int, secret: str | None = None) -> dict:
    """One run against a running cluster (router ``address``, ``workers`` as (address, role), ``secret`` its
    cluster secret) -> a JSON-ready dict: policy, summary, per-request records (without token ids)."""
    t0 = time.perf_counter()
    records, per_worker = asyncio.run(run_policy(address, workers, wl, concurrency, timeout_s, secret))
    summary = summarize(records, block_size, time.perf_counter() - t0)
    summary["workers"] = per_worker
    summary["evicted_blocks"] = {role: sum(w["evicted"] for w in per_worker.values() if w["role"] == role)
                                 for role in ("prefill", "decode")}
    rows = [{k: v for k, v in asdict(r).items() if k not in ("prompt", "output")}
            | {"prompt_len": len(r.prompt), "output_len": len(r.output)} for r in records]
    return {"policy": policy, "summary": summary, "records": rows}


def run_one(policy: str, wl: Workload, a: argparse.Namespace) -> dict:
    """``measure`` on a fresh local cluster, so no run starts with another's cache."""
    from pdserve.deploy.local import LocalCluster

    worker_args = ["--block-size", str(a.block_size), "--num-blocks", str(a.num_blocks), *a.worker_arg]
    router_args = ["--local-prefill-tokens", str(a.local_prefill_tokens), *a.router_arg]
    c = LocalCluster(a.prefill, a.decode, model=a.model, policy=policy, extra_worker_args=worker_args,
                     router_args=router_args).start()
    try:
        workers = [(p.address, p.role) for p in c.procs if p.role in ("prefill", "decode")]
        return measure(policy, c.router_address, workers, wl, a.concurrency, a.timeout, a.block_size, c.secret)
    finally:
        c.stop(grace_s=a.stop_grace)


def _ratio(x: float, y: float) -> float:
    return x / y if y else float("nan")


def format_table(runs: list[dict]) -> str:
    by = {r["policy"]: r["summary"] for r in runs}
    rr = by.get("round_robin", {}).get("hit_rate", 0.0)
    head = (f"{'policy':<18}{'hit rate':>9}{'/ RR':>7}{'/ oracle':>9}{'/ or.pr':>8}{'TTFT p50':>10}{'TTFT p99':>10}"
            f"{'req/s':>7}{'tok/s':>7}{'local':>7}{'evicted P/D':>13}")
    lines = [head, "-" * len(head)]
    for r in runs:
        s = r["summary"]
        ev = s["evicted_blocks"]
        lines.append(
            f"{r['policy']:<18}{s['hit_rate']:>9.3f}{_ratio(s['hit_rate'], rr):>7.2f}"
            f"{_ratio(s['hit_rate'], s['oracle_hit_rate']):>9.3f}{_ratio(s['hit_rate'], s['oracle_prompts_hit_rate']):>8.3f}"
            f"{s['ttft_s']['p50'] * 1e3:>8.0f}ms{s['ttft_s']['p99'] * 1e3:>8.0f}ms{s['requests_per_s']:>7.2f}"
            f"{s['output_tokens_per_s']:>7.0f}{s['local_prefill_share']:>7.0%}{ev['prefill']:>7d}/{ev['decode']:<5d}"
        )
    s0 = runs[0]["summary"]
    lines.append(f"{'oracle (bound)':<18}{s0['oracle_hit_rate']:>9.3f}{_ratio(s0['oracle_hit_rate'], rr):>7.2f}"
                 f"{1.0:>9.3f}   (offline, from the {runs[0]['policy']} run's transcript)")
    lines.append(f"{'oracle_prompts':<18}{s0['oracle_prompts_hit_rate']:>9.3f}"
                 f"{_ratio(s0['oracle_prompts_hit_rate'], rr):>7.2f}")
    return "\n".join(lines)


def _pair(text: str, flag: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag}: expected LO,HI, got {text!r}") from None
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.prefix_routing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default="round_robin,cache_aware,session_affinity",
                   help="comma-separated router policies, one fresh cluster each")
    w = p.add_argument_group("workload")
    w.add_argument("--num-system", type=int, default=4, help="system prompts")
    w.add_argument("--system-len", type=int, default=64, help="tokens per system prompt")
    w.add_argument("--users", type=int, default=48, help="sessions")
    w.add_argument("--turns", type=int, default=5, help="turns per session")
    w.add_argument("--user-len", default="16,48", metavar="LO,HI", help="new user tokens per turn (uniform)")
    w.add_argument("--out-len", default="16,32", metavar="LO,HI", help="answer tokens per turn (uniform)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--no-shuffle", action="store_true", help="send users in the same order every turn")
    c = p.add_argument_group("cluster")
    c.add_argument("--prefill", type=int, default=3, help="prefill workers")
    c.add_argument("--decode", type=int, default=2, help="decode workers")
    c.add_argument("--model", default="tiny")
    c.add_argument("--block-size", type=int, default=16)
    c.add_argument("--num-blocks", type=int, default=384, help="KV blocks per worker (small: placement matters)")
    c.add_argument("--local-prefill-tokens", type=int, default=16, help="router: conditional disaggregation threshold")
    c.add_argument("--worker-arg", action="append", default=[], metavar="FLAG", help="extra worker flag (repeatable)")
    c.add_argument("--router-arg", action="append", default=[], metavar="FLAG", help="extra router flag (repeatable)")
    d = p.add_argument_group("load and output")
    d.add_argument("--concurrency", type=int, default=6, help="requests in flight at most")
    d.add_argument("--timeout", type=float, default=120.0, help="per-request deadline (s)")
    d.add_argument("--stop-grace", type=float, default=5.0, help="seconds a worker gets to exit before SIGKILL")
    d.add_argument("--out", default="bench/out/prefix_routing.json", help="JSON results")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    try:
        cfg = WorkloadConfig(a.num_system, a.system_len, a.users, a.turns, _pair(a.user_len, "--user-len"),
                             _pair(a.out_len, "--out-len"), a.seed, not a.no_shuffle)
    except (ValueError, argparse.ArgumentTypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    policies = [x for x in a.policies.split(",") if x]
    wl = Workload.build(cfg)
    print(ORACLE_DEFINITION, flush=True)
    print(f"workload: {len(wl.order)} requests ({cfg}); cluster: {a.prefill} prefill + {a.decode} decode, "
          f"{a.num_blocks} blocks of {a.block_size} per worker; concurrency {a.concurrency}", flush=True)
    runs = []
    for policy in policies:
        run = run_one(policy, wl, a)
        s = run["summary"]
        print(f"{policy}: hit rate {s['hit_rate']:.3f} (oracle {s['oracle_hit_rate']:.3f}), {s['num_ok']}/"
              f"{s['num_requests']} ok, TTFT p50 {s['ttft_s']['p50'] * 1e3:.0f} ms, {s['duration_s']:.0f} s, "
              f"prefills {s['requests_per_prefill']}, evicted {s['evicted_blocks']}", flush=True)
        runs.append(run)
    table = format_table(runs)
    print(table)
    digests = {r["summary"]["transcript_digest"] for r in runs}
    if len(digests) > 1:
        print("note: the model's answers differed between runs (batching changes float rounding), so later turns' "
              "prompts differ slightly; each run's oracle is computed from its own transcript")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"config": {**vars(a), "workload": asdict(cfg)}, "oracle_definition": ORACLE_DEFINITION, "table": table,
           "runs": runs}
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0 if all(r["summary"]["num_ok"] == r["summary"]["num_requests"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
