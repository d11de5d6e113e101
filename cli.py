"""The ``pdserve`` command: up | router | gateway | prefill | decode | generate."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pdserve.deploy import cli_checks as checks
from pdserve.deploy import cli_classes, cli_models, deathsig
from pdserve.deploy.cli_checks import OneLineParser, UsageError
from pdserve.engine import env
from pdserve.engine.models import DEFAULT_MODEL

EPILOG = "Every process binds 127.0.0.1 unless --host says otherwise. Port 0 picks a free port."


def _setup_logging(role: str, fmt: str = "text") -> None:
    from pdserve.serving.observability import setup_logging

    setup_logging(role, env.log_level(), fmt)
    if role not in ("prefill", "decode"):
        return  # only workers load transformers; importing it here would pull torch into the router
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _setup_tracing(role: str, a: argparse.Namespace) -> None:
    if getattr(a, "otlp_endpoint", ""):
        from pdserve.serving import tracing

        tracing.setup(f"pdserve-{role}", a.otlp_endpoint)


def _cluster_secret(role: str, host: str) -> str | None:
    """The cluster secret; refuses a non-loopback --host without one and warns loudly on loopback."""
    secret = env.cluster_secret()
    if not checks.check_cluster_secret(role, host, secret):
        import logging

        logging.getLogger("pdserve.cli").warning(
            "NO CLUSTER SECRET: %s is not set, so this %s takes internal RPCs and KV handshakes from any process on "
            "this host without authentication (development only; pdserve up makes one by itself)",
            env.CLUSTER_SECRET, role)
    return secret


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="preset name (tiny-chat, the default: trained, readable; tiny, tiny-qwen2, ...: random), local HF directory or hub id")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16")
    p.add_argument("--block-size", type=checks.positive_int, default=16, help="tokens per KV block")
    p.add_argument("--num-blocks", type=checks.non_negative_int, default=0, help="KV blocks per layer (0: from --kv-cache-mib)")
    p.add_argument("--kv-cache-mib", type=checks.positive_int, default=256, help="KV cache size, MiB")
    p.add_argument("--max-model-len", type=checks.non_negative_int, default=0, help="longest sequence (0: the model's)")
    p.add_argument("--max-num-batched-tokens", type=checks.positive_int, default=2048, help="tokens per engine step at most")
    p.add_argument("--max-num-seqs", type=checks.positive_int, default=64, help="sequences per engine step at most")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights")
    p.add_argument("--model-impl", default="auto", choices=["auto", "native", "hf"], help="native models or HF modules")
    p.add_argument("--cuda-graphs", default="on", choices=["on", "off"], help="CUDA graphs for native decode")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the native model's norms, projections, RoPE and MLP for prefill (at start-up)")
    p.add_argument("--async-output", default="auto", choices=["auto", "on", "off"],
                   help="make a step's outputs while the next step runs (auto: on a GPU; on CPU it measured no gain)")
    p.add_argument("--transfer", default="tcp", choices=["tcp", "ucx", "nccl"], help="KV transfer backend")
    p.add_argument("--transfer-timeout", type=float, default=30.0, help="seconds a KV transfer may take")
    p.add_argument("--transfer-checksum", action="store_true", help="checksum every KV frame")
    p.add_argument("--no-shm", action="store_true", help="tcp: disable the same-host shared-memory path")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=checks.port, default=0, help="gRPC port (0: any free port)")
    p.add_argument("--router", action="append", default=[], help="router host:port to register with (repeatable)")
    p.add_argument("--advertise-host", default="", help="address peers dial, e.g. the pod IP when --host 0.0.0.0 "
                   "(default: --host)")
    p.add_argument("--debug-step-delay-ms", type=float, default=0.0, help="fault injection: sleep after each step")
    p.add_argument("--debug-kv-cut-every", type=int, default=0, metavar="N",
                   help="fault injection: cut the KV connection midway through every Nth transfer sent (0: never)")
    cli_classes.add_worker_args(p)
    cli_models.add_worker_args(p)
    _ops_args(p)
    _drain_arg(p, 30.0, "in-flight requests")


def _configs(a: argparse.Namespace):
    from pdserve.engine.config import EngineConfig
    from pdserve.kvtransfer.base import TransferConfig

    engine = EngineConfig(
        model=a.model,
        device=a.device,
        dtype=a.dtype,
        block_size=a.block_size,
        num_blocks=a.num_blocks,
        kv_cache_bytes=a.kv_cache_mib * 1024 * 1024,
        max_model_len=a.max_model_len,
        max_num_batched_tokens=a.max_num_batched_tokens,
        max_num_seqs=a.max_num_seqs,
        enable_prefix_caching=not a.no_prefix_caching,
        load_format=a.load_format,
        model_impl=a.model_impl, cuda_graphs=a.cuda_graphs == "on", compile=a.compile,
        async_output=a.async_output, priority_aging_s=a.priority_aging_s,
        **cli_models.engine_kwargs(a),
    )
    transfer = TransferConfig(
        backend=a.transfer,
        host=a.host,
        timeout_s=a.transfer_timeout,
        checksum=a.transfer_checksum,
        secret=env.cluster_secret(),
        allow_shm=not a.no_shm,
        debug_cut_every=a.debug_kv_cut_every,
        advertise_host=getattr(a, "advertise_host", "") or "",
    )
    return engine, transfer


def _run(coro) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def cmd_worker(a: argparse.Namespace) -> int:
    checks.check_model(a.model)
    checks.check_port_free("--port", a.host, a.port)
    checks.check_port_free("--metrics-port", a.host, a.metrics_port)
    checks.check_device(a.device)
    checks.check_cluster_secret(f"{a.cmd} worker", a.host, env.cluster_secret())  # before any output
    _setup_logging(a.cmd, a.log_format)
    _setup_tracing(a.cmd, a)
    served = cli_models.served_model(a)
    secret = _cluster_secret(f"{a.cmd} worker", a.host)
    engine, transfer = _configs(a)
    if a.cmd == "prefill":
        from pdserve.prefill.server import serve
    else:
        from pdserve.decode.server import serve
    _run(serve(engine, transfer, f"{a.host}:{a.port}", routers=tuple(a.router), step_delay_s=a.debug_step_delay_ms / 1000,
                 metrics_port=a.metrics_port, tls=_tls(a), advertise_host=a.advertise_host, cluster_secret=secret,
                 served_model=served, grace_s=a.drain_timeout_s))
    return 0


def cmd_router(a: argparse.Namespace) -> int:
    models = cli_models.router_kwargs(a)
    checks.check_port_free("--port", a.host, a.port)
    checks.check_port_free("--metrics-port", a.host, a.metrics_port)
    checks.check_cluster_secret("router", a.host, env.cluster_secret())
    _setup_logging("router", a.log_format)
    _setup_tracing("router", a)
    secret = _cluster_secret("router", a.host)
    from pdserve.router.admission import parse_tenant_rates
    from pdserve.router.auth import load_api_keys
    from pdserve.router.server import RouterConfig, load_worker_config, serve

    prefill, decode = load_worker_config(a.config, a.prefill, a.decode)
    dns = tuple(("prefill", t) for t in a.prefill_dns) + tuple(("decode", t) for t in a.decode_dns)
    default_rate = None
    if a.default_rate:
        default_rate = parse_tenant_rates([f"*={a.default_rate}"])["*"]
    cfg = RouterConfig(
        **models,
        prefill=tuple(prefill),
        decode=tuple(decode),
        addr=f"{a.host}:{a.port}",
        policy=a.policy,
        local_prefill_tokens=a.local_prefill_tokens,
        saturation_s=a.saturation_ms / 1000,
        shed_ttft_s=a.shed_ttft_ms / 1000,
        tenant_rates=parse_tenant_rates(a.tenant_rate),
        default_rate=default_rate,
        max_retries=a.max_retries,
        metrics_port=a.metrics_port,
        tls=_tls(a),
        api_keys=load_api_keys(a.api_keys) if a.api_keys else {},
        dns=dns,
        cluster_secret=secret,
        drain_timeout_s=a.drain_timeout_s,
        **cli_classes.router_kwargs(a),
    )
    _run(serve(cfg))
    return 0


def cmd_gateway(a: argparse.Namespace) -> int:
    from pdserve.deploy.cli_gateway import config_from

    cfg = config_from(a, _tls(a))
    _setup_logging("gateway", a.log_format)
    _setup_tracing("gateway", a)
    from pdserve.router.gateway.server import serve

    _run(serve(cfg))
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from pdserve.deploy.cli_client import api_key, run_and_print, sampling_from

    return run_and_print(a.router, a.prompt, sampling_from(a), a.json, _tls(a), api_key(a), model=a.model,
                         session_id=a.session_id)


def cmd_bench(a: argparse.Namespace) -> int:
    _setup_logging("bench")
    from pdserve.bench.run import main as bench_main

    a.api_key = a.api_key or env.api_key()  # as pdserve generate: the flag, else PDSERVE_API_KEY
    return bench_main(args=a)


def cmd_up(a: argparse.Namespace) -> int:
    _setup_logging("up")
    from pdserve.deploy.cli_up import cmd_up as up

    return up(a)


def _tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", default="", help="PEM certificate: serve TLS (and present it as a client)")
    p.add_argument("--tls-key", default="", help="PEM private key for --tls-cert")
    p.add_argument("--tls-ca", default="", help="PEM CA: verify peers; servers then require client certs (mTLS)")
    p.add_argument("--tls-server-name", default="", help="name to check in peers' certificates")


def _tls(a: argparse.Namespace):
    from pdserve.serving.rpc import TlsConfig

    tls = TlsConfig(a.tls_cert, a.tls_key, a.tls_ca, a.tls_server_name)
    return tls if tls.enabled else None


def _ops_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=checks.metrics_port, default=0,
                   help="serve Prometheus /metrics on this port (0: off, -1: any free port)")
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="log line format")
    p.add_argument("--otlp-endpoint", default="", help="export OpenTelemetry traces to this OTLP/gRPC collector "
                   "(host:port; needs pip install pdserve[otel]; empty: tracing off)")
    _tls_args(p)


def _drain_arg(p: argparse.ArgumentParser, default: float, what: str) -> None:
    p.add_argument("--drain-timeout-s", type=checks.non_negative_seconds, default=default,
                   help=f"after SIGTERM, seconds to let {what} finish before stopping (fit it in the pod's "
                   "terminationGracePeriodSeconds minus its preStop sleep)")


def _router_policy_args(p: argparse.ArgumentParser) -> None:
    from pdserve.router.policy import POLICIES

    p.add_argument("--policy", default="cache_aware", choices=POLICIES, help="how a (prefill, decode) pair is picked")
    p.add_argument(
        "--local-prefill-tokens", type=checks.non_negative_int, default=16,
        help="decode workers prefill locally when the uncached prompt is at most this long (0: never)",
    )
    p.add_argument("--saturation-ms", type=float, default=0.0, help="prefill locally when the prefill queue exceeds this")
    p.add_argument("--shed-ttft-ms", type=float, default=0.0, help="refuse requests whose predicted TTFT exceeds this")
    p.add_argument("--tenant-rate", action="append", default=[], help="NAME=RATE[:BURST] requests/s (repeatable)")
    p.add_argument("--default-rate", default="", help="RATE[:BURST] for tenants without their own limit")
    p.add_argument("--max-retries", type=checks.non_negative_int, default=3,
                   help="times a failed request is retried or migrated to other workers")
    p.add_argument("--api-keys", default="", help='JSON file {"<key>": "<tenant>"}: require API keys')


def build_parser() -> argparse.ArgumentParser:
    from pdserve.deploy.cli_client import add_generate_parser
    from pdserve.deploy.cli_gateway import add_gateway_parser
    from pdserve.deploy.cli_up import add_up_parser

    parser = OneLineParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving", epilog=EPILOG)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    add_up_parser(sub, _router_policy_args, _tls_args).set_defaults(fn=cmd_up)

    for role in ("prefill", "decode"):
        w = sub.add_parser(role, help=f"run one {role} worker")
        _engine_args(w)
        w.set_defaults(fn=cmd_worker)

    r = sub.add_parser("router", help="run the router")
    cli_models.add_router_args(r)
    r.add_argument("--prefill", action="append", default=[], help="prefill worker host:port (repeatable)")
    r.add_argument("--decode", action="append", default=[], help="decode worker host:port (repeatable)")
    r.add_argument("--config", help='JSON file {"prefill": [...], "decode": [...]}')
    r.add_argument("--prefill-dns", action="append", default=[], metavar="HOST:PORT",
                   help="discover prefill workers by resolving HOST (a headless Service) every poll")
    r.add_argument("--decode-dns", action="append", default=[], metavar="HOST:PORT",
                   help="discover decode workers by resolving HOST every poll")
    _router_policy_args(r)
    cli_classes.add_router_args(r)
    _ops_args(r)
    _drain_arg(r, 5.0, "in-flight streams")
    r.add_argument("--host", default="127.0.0.1", help="address to bind")
    r.add_argument("--port", type=checks.port, default=0, help="gRPC port (0: any free port)")
    r.set_defaults(fn=cmd_router)

    add_gateway_parser(sub, _tls_args).set_defaults(fn=cmd_gateway)

    b = sub.add_parser("bench", help="load-test a cluster over the public API (see bench/run.py)")
    from pdserve.bench.run import build_parser as bench_parser

    bench_parser(b)
    b.set_defaults(fn=cmd_bench)

    add_generate_parser(sub, _tls_args).set_defaults(fn=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    deathsig.arm_from_env()  # a child of a pdserve launcher dies with it
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (UsageError, ValueError) as e:
        print(f"pdserve {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
