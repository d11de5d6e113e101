"""``pdserve bench`` / ``python -m bench.run``: load-test a pdserve cluster over the public gRPC API.

    pdserve bench --router 127.0.0.1:50051 --workload chat --request-rate 4 --num-prompts 200
    pdserve bench --local 1,1 --workload uniform --input-len-range 64,1024 --output-len 128 --max-concurrency 8
    pdserve bench --local 0,1 --rates 1,2,4 --num-prompts 60 --burstiness 2    # sweep, one run per rate
    pdserve bench --router ADDR --workload trace --trace requests.jsonl
    pdserve bench --local 1,1 --workload shared-prefix --num-system-prompts 2 --num-users 8 --num-turns 3

Open loop (gamma arrivals, --burstiness = CV of the gaps, 1 = Poisson) when --request-rate or --rates is
given, closed loop at --max-concurrency otherwise; a trace is replayed at its own timestamps. The same --seed gives the
same requests and send times; run i of a sweep draws its prompts with seed + 1000*i, so no run warms the
prefix cache for the next. Writes one JSON per run (config, summary, per-request records) and PNG plots
(latency CDFs; throughput and goodput vs offered rate for a sweep) into --result-dir.

Flag names follow ``vllm bench serve`` where the meaning is the same (--num-prompts, --request-rate,
--max-concurrency, --result-dir, --seed, --burstiness); the older --num-requests, --rate, --concurrency and
--out-dir still work and are not shown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pdserve.bench import workloads
from pdserve.bench.arrivals import gamma_arrivals
from pdserve.bench.metrics import Record, summarize
from pdserve.bench.workloads import BenchRequest, LengthDist

logger = logging.getLogger(__name__)

WORKLOADS = ("chat", "uniform", "shared-prefix", "long-context", "trace")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written; every flag's default shown."""


class _Flag(argparse.Action):
    """Stores like ``store`` and remembers which spelling was given, so errors name the flag the user typed."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        given = dict(getattr(namespace, "_flags", {}))
        given[self.dest] = option_string
        namespace._flags = given


def _alias(group, canonical: str, old: str, **kw) -> None:
    """``canonical`` (vllm bench serve's name) in the help; ``old`` accepted, hidden."""
    group.add_argument(canonical, action=_Flag, **kw)
    group.add_argument(old, action=_Flag, dest=kw["dest"], type=kw.get("type"), default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)


def flag(a: argparse.Namespace, dest: str, canonical: str) -> str:
    """The spelling of a flag the user gave (an old alias included), else its canonical name."""
    return getattr(a, "_flags", {}).get(dest) or canonical


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="pdserve bench")
    p.description, p.formatter_class = __doc__, _HelpFormatter
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--router", metavar="HOST:PORT", help="router host:port of a running cluster")
    target.add_argument("--local", metavar="P,D", help="start a local cluster (P prefill, D decode workers; "
                        "P=0: colocated) for the run and stop it after")
    p.add_argument("--model", default=None, help="--local: the model preset or path the cluster serves (default: "
                   "tiny); --router: the model, adapter or route each request names (default: the router's default)")
    p.add_argument("--cache", default="bypass", choices=["bypass", "use", "refresh"],
                   help="the router's response cache for every request (default bypass: measure the serving path)")
    p.add_argument("--local-arg", action="append", default=[], metavar="FLAG", help="--local: extra worker flag, e.g. "
                   "--local-arg=--max-num-seqs=16 (repeatable)")
    p.add_argument("--local-router-arg", action="append", default=[], metavar="FLAG", help="--local: extra router flag (repeatable)")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", default="chat", choices=WORKLOADS, help="what requests look like")
    w.add_argument("--input-len-range", default="64,1024", metavar="LO,HI", help="uniform: prompt lengths LO,HI (inclusive)")
    w.add_argument("--output-len", type=int, default=128, help="uniform, shared-prefix, long-context: output tokens")
    w.add_argument("--input-len-dist", default="200,0.8,4,1500", metavar="M,S,MIN,MAX", help="chat: lognormal MEDIAN,SIGMA,MIN,MAX")
    w.add_argument("--output-len-dist", default="100,0.7,1,400", metavar="M,S,MIN,MAX", help="chat: lognormal MEDIAN,SIGMA,MIN,MAX")
    w.add_argument("--num-system-prompts", type=int, default=4, help="shared-prefix")
    w.add_argument("--system-prompt-len", type=int, default=256, help="shared-prefix")
    w.add_argument("--num-users", type=int, default=16, help="shared-prefix: sessions")
    w.add_argument("--num-turns", type=int, default=3, help="shared-prefix: turns per session")
    w.add_argument("--user-len", type=int, default=32, help="shared-prefix: new user tokens per turn")
    w.add_argument("--context-len", type=int, default=1800, help="long-context: prompt length")
    w.add_argument("--trace", metavar="FILE", help="trace: JSONL file, see bench/workloads.py")
    w.add_argument("--vocab-range", default="3,259", metavar="LO,HI", help="prompt token ids are drawn from [LO, HI)")
    t = p.add_argument_group("arrivals and bounds")
    _alias(t, "--request-rate", "--rate", dest="rate", type=float, default=0.0,
           help="open loop at this many requests/s (0: closed loop at --max-concurrency)")
    t.add_argument("--rates", default="", metavar="R1,R2,...", help="sweep: comma-separated rates, one open-loop run each")
    t.add_argument("--burstiness", type=float, default=1.0, metavar="CV", help="CV of the gaps (1: Poisson; gamma shape 1/CV^2)")
    _alias(t, "--max-concurrency", "--concurrency", dest="concurrency", type=int, default=8,
           help="closed loop: requests in flight")
    _alias(t, "--num-prompts", "--num-requests", dest="num_requests", type=int, default=100,
           help="requests per run (at most)")
    t.add_argument("--duration", type=float, default=600.0, help="stop sending after this many seconds")
    t.add_argument("--timeout", type=float, default=120.0, help="per-request deadline (s)")
    t.add_argument("--api-key", default="", help="API key sent as 'authorization: Bearer KEY' (pdserve bench: "
                   "default $PDSERVE_API_KEY)")
    m = p.add_argument_group("metrics and output")
    m.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="goodput SLO on time to first token")
    m.add_argument("--slo-tpot-ms", type=float, default=100.0, help="goodput SLO on time per output token")
    m.add_argument("--seed", type=int, default=0, help="same seed, same requests and send times")
    _alias(m, "--result-dir", "--out-dir", dest="out_dir", default="bench/out", help="where JSON results and plots go")
    m.add_argument("--label", default="", help="names the runs in files and plot legends")
    m.add_argument("--no-plots", action="store_true", help="write JSON only")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--batch", action="store_true", help="submit each run's requests as one batch job (router Batch "
                   "service) and report the job's wall time and throughput (bench/batch_run.py)")
    return p


def _pair(text: str, flag: str, cast=int) -> tuple:
    try:
        a, b = (cast(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{flag}: expected two comma-separated numbers, got {text!r}") from None
    return a, b


def _rates(a: argparse.Namespace) -> list[float]:
    """Offered rates, one run each; 0.0 = closed loop (or trace replay)."""
    if a.rates and a.rate:
        raise ValueError(f"--rates: give either {flag(a, 'rate', '--request-rate')} or --rates, not both")
    try:
        rates = [float(x) for x in a.rates.split(",")] if a.rates else [a.rate]
    except ValueError:
        raise ValueError(f"--rates: expected comma-separated numbers, got {a.rates!r}") from None
    if any(not r >= 0 for r in rates) or (a.rates and 0 in rates):
        raise ValueError(f"--rates: rates must be > 0, got {rates}")
    if a.workload == "trace" and any(rates):
        raise ValueError(f"{flag(a, 'rate', '--request-rate')}: a trace is replayed at its own timestamps; "
                         "drop --request-rate/--rates")
    return rates


def make_workload(a: argparse.Namespace, seed: int) -> list[BenchRequest]:
    vocab = _pair(a.vocab_range, "--vocab-range")
    n = a.num_requests
    if a.workload == "uniform":
        return workloads.uniform(n, _pair(a.input_len_range, "--input-len-range"), a.output_len, seed, vocab)
    if a.workload == "chat":
        return workloads.chat(n, seed, vocab, LengthDist.parse(a.input_len_dist, "--input-len-dist"),
                              LengthDist.parse(a.output_len_dist, "--output-len-dist"))
    if a.workload == "shared-prefix":
        return workloads.shared_prefix(n, a.num_system_prompts, a.system_prompt_len, a.num_users, a.num_turns,
                                       a.user_len, a.output_len, seed, vocab)
    if a.workload == "long-context":
        return workloads.long_context(n, a.context_len, a.output_len, seed, vocab)
    if not a.trace:
        raise ValueError("--trace: --workload trace needs --trace FILE")
    reqs = workloads.trace(a.trace, seed, vocab)
    if len(reqs) > n:
        logger.warning("trace %s: replaying the first %d of %d requests (%s)", a.trace, n, len(reqs),
                       flag(a, "num_requests", "--num-prompts"))
    return reqs[:n]


@dataclass(frozen=True, slots=True)
class RunPlan:
    """One run, fully decided before it starts: what to send and (open loop) when."""

    index: int
    tag: str  # "rate4", "conc8" or "trace"
    offered_rate: float  # requests/s; 0 for closed loop and trace replay
    workload_seed: int
    requests: list[BenchRequest]
    send_at: list[float] | None  # None: closed loop


def plan_runs(a: argparse.Namespace) -> list[RunPlan]:
    """Pure and deterministic for the arguments: same --seed, same requests and send times."""
    if a.num_requests < 1:
        raise ValueError(f"{flag(a, 'num_requests', '--num-prompts')}: must be >= 1, got {a.num_requests}")
    if a.concurrency < 1:
        raise ValueError(f"{flag(a, 'concurrency', '--max-concurrency')}: must be >= 1, got {a.concurrency}")
    if not a.duration > 0 or not a.timeout > 0:
        raise ValueError("--duration, --timeout: must be > 0")
    plans = []
    for i, rate in enumerate(_rates(a)):
        seed = a.seed + 1000 * i
        reqs = make_workload(a, seed)
        if a.workload == "trace":
            plans.append(RunPlan(i, "trace", 0.0, seed, reqs, [r.send_at for r in reqs]))
        elif rate > 0:
            plans.append(RunPlan(i, f"rate{rate:g}", rate, seed, reqs, gamma_arrivals(rate, len(reqs), a.burstiness, a.seed)))
        else:
            plans.append(RunPlan(i, f"conc{a.concurrency}", 0.0, seed, reqs, None))
    return plans


def request_options(a: argparse.Namespace):
    """The model and cache mode every request carries (with --local the cluster serves --model as its default)."""
    from pdserve.bench.client import RequestOptions

    return RequestOptions(model="" if a.local else (a.model or ""), cache=a.cache)


def execute(plan: RunPlan, a: argparse.Namespace, address: str) -> tuple[dict, list[Record]]:
    from pdserve.bench.client import run_closed_loop, run_open_loop

    progress, prefix = not a.no_progress, f"bench-{a.seed}-{plan.tag}"
    t0 = time.perf_counter()
    if plan.send_at is None:
        coro = run_closed_loop(address, plan.requests, a.concurrency, a.duration, a.timeout, progress, prefix,
                               a.api_key, request_options(a))
    else:
        coro = run_open_loop(address, plan.requests, plan.send_at, a.duration, a.timeout, progress, prefix,
                             a.api_key, request_options(a))
    records = asyncio.run(coro)
    summary = summarize(records, None, a.slo_ttft_ms / 1000, a.slo_tpot_ms / 1000)
    summary["wall_s"] = time.perf_counter() - t0
    return summary, records


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def format_summary(label: str, s: dict) -> str:
    t, g = s["throughput"], s["goodput"]
    lines = [f"== {label}: {s['num_ok']}/{s['num_requests']} ok in {s['duration_s']:.1f}s, "
             f"errors {s['errors'] or 'none'}" + (f", {s['num_short']} short outputs" if s["num_short"] else "")]
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        d = s[key]
        lines.append(f"   {name:4} ms   mean {_ms(d['mean']):>8}  p50 {_ms(d['p50']):>8}  p90 {_ms(d['p90']):>8}  "
                     f"p99 {_ms(d['p99']):>8}")
    lines.append(f"   throughput {t['requests_per_s']:.2f} req/s, {t['input_tokens_per_s']:.0f} input tok/s, "
                 f"{t['output_tokens_per_s']:.1f} output tok/s")
    lines.append(f"   goodput (TTFT <= {g['slo_ttft_s'] * 1e3:g} ms, TPOT <= {g['slo_tpot_s'] * 1e3:g} ms): "
                 f"{g['share']:.0%} of requests, {g['requests_per_s']:.2f} req/s; "
                 f"cached prompt tokens {s['cached_prompt_token_share']:.1%}, "
                 f"prefilled on a prefill worker {s['remote_prefill_share']:.0%}")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def write_run(out_dir: Path, name: str, config: dict, plan: RunPlan, summary: dict, records: list[Record]) -> Path:
    path = out_dir / f"{name}-{plan.tag}-seed{config['seed']}.json"
    run = {"index": plan.index, "tag": plan.tag, "offered_rate": plan.offered_rate,
           "mode": "closed" if plan.send_at is None else "open", "workload_seed": plan.workload_seed,
           "num_planned": len(plan.requests), "started_at_unix": time.time() - summary["wall_s"]}
    doc = {"config": config, "run": run, "summary": summary, "records": [r.to_dict() for r in records]}
    path.write_text(json.dumps(doc, indent=1, allow_nan=False))
    return path


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """Bad flags raise ValueError (the CLI prints it, exit 2); an unreadable trace or unreachable router
    prints the reason and returns 1."""
    a = args or build_parser().parse_args(argv)
    try:
        return _main(a)
    except OSError as e:  # FileNotFoundError for --trace, ConnectionError from the client
        print(f"pdserve bench: {e}", file=sys.stderr)
        return 1


def _main(a: argparse.Namespace) -> int:
    plans = plan_runs(a)  # validates everything before a cluster starts
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(a).items() if k not in ("fn", "cmd", "_flags")}
    label = a.label or (f"local {a.local}" if a.local else a.router)
    name = _slug(a.label) if a.label else a.workload
    cluster = None
    try:
        if a.local:
            from pdserve.deploy.local import LocalCluster

            num_prefill, num_decode = _pair(a.local, "--local")
            cluster = LocalCluster(num_prefill, num_decode, model=a.model or "tiny", extra_worker_args=a.local_arg,
                                   router_args=a.local_router_arg)
            logger.info("starting a local cluster: %d prefill, %d decode", num_prefill, num_decode)
            cluster.start()
        address = cluster.router_address if cluster else a.router
        if a.batch:
            from pdserve.bench.batch_run import run_batch

            return run_batch(plans, a, address, out_dir, name, config, label)
        points, cdf_runs, files = [], {}, []
        for plan in plans:
            summary, records = execute(plan, a, address)
            print(format_summary(f"{label} {plan.tag}", summary), flush=True)
            files.append(write_run(out_dir, name, config, plan, summary, records))
            points.append((plan.offered_rate, summary))
            cdf_runs[plan.tag] = records
    finally:
        if cluster is not None:
            cluster.stop()
    if not a.no_plots:
        from pdserve.bench import plots

        files.append(plots.latency_cdfs(cdf_runs, out_dir / f"{name}-latency_cdf.png", f"{label}, {a.workload} workload",
                                        a.slo_ttft_ms / 1000, a.slo_tpot_ms / 1000))
        if len(plans) > 1 and all(p.offered_rate > 0 for p in plans):
            files += plots.sweep({label: points}, out_dir, prefix=name)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(main())
    except ValueError as e:
        print(f"pdserve bench: {e}", file=sys.stderr)
        sys.exit(2)
