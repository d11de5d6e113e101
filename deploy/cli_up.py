"""pdserve up: a supervised local cluster (router + prefill + decode processes).

SIGTERM, SIGINT and SIGHUP stop every child; a child that dies is reported (exit code or signal, last log
lines) and restarted with backoff while the rest keep serving, or with --no-restart the cluster is torn
down and up exits 1. Bad flags fail before anything starts, in one line, with exit status 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from pdserve.deploy import cli_checks as checks
from pdserve.deploy import cli_classes, cli_models
from pdserve.deploy.cli_checks import UsageError
from pdserve.deploy.cli_client import DEFAULT_ROUTER_PORT, run_and_print, sampling_args, sampling_from
from pdserve.engine import env


class Stop(BaseException):
    """SIGTERM, SIGINT or SIGHUP arrived (the first; later ones are ignored)."""


class StopSignals:
    """The stop signals, noted by the handler and raised as ``Stop`` only where the main thread checks
    (``check``: the supervisor's loop, the wait for readiness). A handler that raised at any bytecode could
    land inside ``Popen.poll`` while it holds its waitpid lock, and then no later ``wait`` could reap that
    child. While ``raise_now`` is set (one blocking request with --generate) the handler raises at once."""

    def __init__(self) -> None:
        self.name = ""
        self.raise_now = False

    def install(self) -> StopSignals:
        def handler(signum, _frame):
            if self.name:
                return
            self.name = signal.Signals(signum).name
            if self.raise_now:
                raise Stop(self.name)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, handler)
        return self

    def check(self) -> None:
        if self.name:
            raise Stop(self.name)


def add_up_parser(sub, router_policy_args, tls_args) -> argparse.ArgumentParser:
    up = sub.add_parser("up", help="start a supervised local cluster: router + prefill + decode workers",
                        description=__doc__)
    c = up.add_argument_group("cluster")
    c.add_argument("--prefill", type=checks.non_negative_int, default=1,
                   help="prefill workers (0: decode workers prefill locally)")
    c.add_argument("--decode", type=checks.positive_int, default=1, help="decode workers")
    c.add_argument("--host", default="127.0.0.1", help="address every process binds")
    c.add_argument("--port", type=checks.port, default=DEFAULT_ROUTER_PORT,
                   help="router port, where pdserve generate looks (default: %(default)s; 0: any free port)")
    c.add_argument("--http-port", type=checks.port, default=None,
                   help="also serve OpenAI-compatible HTTP (a gateway) on this port (0: any free port; default: off)")
    c.add_argument("--metrics-port", type=checks.metrics_port, default=-1,
                   help="router's Prometheus port (-1: any free port; 0: no metrics anywhere); workers get free ports")
    c.add_argument("--log-format", default="text", choices=["text", "json"], help="every process's log format")
    c.add_argument("--no-restart", action="store_true",
                   help="fail fast: when a process dies, stop the cluster and exit 1 instead of restarting it")
    c.add_argument("--ready-timeout", type=float, default=180.0, help="seconds each process has to become ready")
    c.add_argument("-v", "--verbose", action="store_true", help="echo every process's log lines")
    e = up.add_argument_group("engine (every worker)")
    cli_models.add_up_args(e)  # --model [NAME=]PATH[:PREFILL:DECODE] (repeatable), --lora, --max-loras, --route
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    e.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16")
    e.add_argument("--max-num-seqs", type=checks.positive_int, default=64, help="sequences per engine step at most")
    e.add_argument("--max-num-batched-tokens", type=checks.positive_int, default=2048,
                   help="tokens per engine step at most")
    e.add_argument("--kv-cache-mib", type=checks.positive_int, default=256, help="KV cache per worker, MiB")
    e.add_argument("--block-size", type=checks.positive_int, default=16, help="tokens per KV block")
    e.add_argument("--max-model-len", type=checks.non_negative_int, default=0, help="longest sequence (0: the model's)")
    e.add_argument("--model-impl", default="auto", choices=["auto", "native", "hf"], help="native models or HF modules")
    e.add_argument("--cuda-graphs", default="on", choices=["on", "off"], help="CUDA graphs for native decode")
    e.add_argument("--compile", action="store_true", help="torch.compile the native model's prefill regions")
    e.add_argument("--async-output", default="auto", choices=["auto", "on", "off"],
                   help="make a step's outputs while the next step runs (auto: on a GPU)")
    e.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    e.add_argument("--transfer", default="tcp", choices=["tcp", "ucx", "nccl"], help="KV transfer backend")
    e.add_argument("--no-shm", action="store_true", help="tcp: disable the same-host shared-memory path")
    cli_classes.add_worker_args(e)
    r = up.add_argument_group("router")
    router_policy_args(r)
    cli_classes.add_router_args(up)
    t = up.add_argument_group("TLS (every process)")
    tls_args(t)
    g = up.add_argument_group("one request")
    g.add_argument("--generate", metavar="PROMPT", help="send one request, print it, then shut down")
    sampling_args(g)
    return up


def _tls_flags(a: argparse.Namespace) -> list[str]:
    out = []
    for flag, value in (("--tls-cert", a.tls_cert), ("--tls-key", a.tls_key), ("--tls-ca", a.tls_ca),
                        ("--tls-server-name", a.tls_server_name)):
        if value:
            out += [flag, value]
    return out


def _check(a: argparse.Namespace):
    """Everything that can be checked before a process starts. Returns (TlsConfig | None, api keys)."""
    from pdserve.serving.rpc import TlsConfig

    cli_models.up_pools(a)  # every model, adapter and route flag
    checks.check_device(a.device)
    checks.check_port_free("--port", a.host, a.port)
    if a.metrics_port > 0 and a.metrics_port == a.port:
        raise UsageError(f"--metrics-port: {a.metrics_port} is also the router's --port")
    checks.check_port_free("--metrics-port", a.host, a.metrics_port)
    if a.http_port:
        if a.http_port in (a.port, a.metrics_port):
            raise UsageError(f"--http-port: {a.http_port} is also the router's --port or --metrics-port")
        checks.check_port_free("--http-port", a.host, a.http_port)
    if a.ready_timeout <= 0:
        raise UsageError(f"--ready-timeout: must be > 0, got {a.ready_timeout}")
    cli_classes.router_kwargs(a)  # the router's request-class flags, checked before anything starts
    try:
        tls = TlsConfig(a.tls_cert, a.tls_key, a.tls_ca, a.tls_server_name)
    except ValueError as e:
        raise UsageError(f"--tls-cert/--tls-key/--tls-ca: {e}") from None
    keys = {}
    if a.api_keys:
        from pdserve.router.auth import load_api_keys

        try:
            keys = load_api_keys(a.api_keys)
        except ValueError as e:
            raise UsageError(f"--api-keys: {str(e).removeprefix('api-keys: ')}") from None
    return (tls if tls.enabled else None), keys


def _router_args(a: argparse.Namespace) -> list[str]:
    args = ["--local-prefill-tokens", str(a.local_prefill_tokens), "--max-retries", str(a.max_retries),
            "--metrics-port", str(a.metrics_port), "--log-format", a.log_format, *_tls_flags(a)]
    if a.shed_ttft_ms:
        args += ["--shed-ttft-ms", str(a.shed_ttft_ms)]
    if a.saturation_ms:
        args += ["--saturation-ms", str(a.saturation_ms)]
    for t in a.tenant_rate:
        args += ["--tenant-rate", t]
    if a.default_rate:
        args += ["--default-rate", a.default_rate]
    if a.api_keys:
        args += ["--api-keys", a.api_keys]
    for route in a.route:
        args += ["--route", route]
    args += ["--generation-config", a.generation_config]
    return args + cli_classes.forward_router_args(a)


def _worker_args(a: argparse.Namespace) -> list[str]:
    args = ["--dtype", a.dtype, "--max-num-seqs", str(a.max_num_seqs), "--max-num-batched-tokens",
            str(a.max_num_batched_tokens), "--kv-cache-mib", str(a.kv_cache_mib), "--log-format", a.log_format,
            "--block-size", str(a.block_size), "--max-model-len", str(a.max_model_len), "--model-impl", a.model_impl,
            "--cuda-graphs", a.cuda_graphs, "--async-output", a.async_output, *_tls_flags(a)]
    if a.no_prefix_caching:
        args.append("--no-prefix-caching")
    if a.compile:
        args.append("--compile")
    if a.metrics_port != 0:
        args += ["--metrics-port", "-1"]
    if a.no_shm:
        args.append("--no-shm")
    return args + cli_classes.forward_worker_args(a)


def describe(cluster, host: str) -> list[str]:
    """One line per process: role, address, metrics URL, KV endpoint, pid."""
    from pdserve.deploy.supervisor import Supervisor

    lines = []
    watches = Supervisor(cluster).watches
    for w in sorted(watches, key=lambda w: w.proc.role != "router"):
        p = w.proc
        metrics = (f"metrics http://{host}:{p.metrics_port}/metrics" if p.metrics_port > 0
                   else "metrics on its HTTP port (/metrics)" if p.role == "gateway" else "metrics off")
        kv = f"  kv {p.kv_endpoint}" if p.kv_endpoint else ""
        lines.append(f"  {w.name:<10} {p.address:<22} {metrics}{kv}  pid {p.pid}")
    return lines


def cmd_up(a: argparse.Namespace) -> int:
    from pdserve.deploy.local import LocalCluster, StartupError
    from pdserve.deploy.supervisor import ClusterFailed, Supervisor

    tls, keys = _check(a)
    pools = cli_models.up_pools(a)
    signals = StopSignals().install()
    cluster = LocalCluster(
        a.prefill, a.decode, pools[0].path, a.device, a.transfer, a.policy, extra_worker_args=_worker_args(a),
        router_args=_router_args(a), echo=a.verbose, ready_timeout_s=a.ready_timeout, host=a.host,
        router_port=a.port, http_port=a.http_port, gateway_args=["--log-format", a.log_format, *_tls_flags(a)],
        pools=pools, max_loras=a.max_loras, enable_lora=a.enable_lora, stop_check=signals.check,
    )
    t0 = time.monotonic()
    try:
        with cluster:
            sizes = ", ".join(f"model {p.name}: {p.num_prefill} prefill, {p.num_decode} decode" for p in pools)
            print(f"pdserve up: cluster ready in {time.monotonic() - t0:.1f}s ({sizes}, transfer {a.transfer})",
                  flush=True)
            print("\n".join(describe(cluster, a.host)), flush=True)
            if cluster.gateway_url:
                print(f"pdserve up: OpenAI-compatible API at {cluster.gateway_url}", flush=True)
            if a.generate is not None:
                key = env.api_key() or next((k for k, tenant in keys.items() if tenant != "admin"), next(iter(keys), ""))
                signals.check()
                signals.raise_now = True  # a blocking gRPC call: no poll of children to corrupt meanwhile
                return run_and_print(cluster.router_address, a.generate, sampling_from(a), False, tls, key,
                                     prog="pdserve up")
            hint = "" if a.port == DEFAULT_ROUTER_PORT else f" --router {cluster.router_address}"
            print(f'Ctrl-C (or SIGTERM) stops every process. Try: pdserve generate{hint} "Hello"', flush=True)
            Supervisor(cluster, restart=not a.no_restart, out=sys.stdout).run(stop_check=signals.check)
    except Stop as e:
        print(f"pdserve up: {e} received; stopped every process", file=sys.stderr, flush=True)
        return 0
    except ClusterFailed as e:
        print(f"pdserve up: {e}; stopped every process", file=sys.stderr, flush=True)
        return 1
    except StartupError as e:
        head, _, tail = str(e).partition("\n")
        print(f"pdserve up: {head}", file=sys.stderr)
        if tail.strip():
            print("\n".join(f"    | {line}" for line in tail.splitlines()), file=sys.stderr, flush=True)
        return 1
    return 0
