"""The ``pdserve`` command: up | router | prefill | decode | generate."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from pdserve.engine import env

EPILOG = "Workers bind 127.0.0.1 unless --host says otherwise. Port 0 picks a free port."


def _setup_logging(role: str, fmt: str = "text") -> None:
    from pdserve.serving.observability import setup_logging

    setup_logging(role, env.log_level(), fmt)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="preset name, local HF directory or hub id (default: tiny)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=0, help="KV blocks per layer (0: from --kv-cache-mib)")
    p.add_argument("--kv-cache-mib", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=0)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--transfer", default="tcp", choices=["tcp", "ucx", "nccl"], help="KV transfer backend")
    p.add_argument("--transfer-timeout", type=float, default=30.0)
    p.add_argument("--transfer-checksum", action="store_true")
    p.add_argument("--no-shm", action="store_true", help="tcp: disable the same-host shared-memory path")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--router", action="append", default=[], help="router host:port to register with (repeatable)")
    p.add_argument("--advertise-host", default="", help="address peers dial (e.g. the pod IP when --host 0.0.0.0)")
    p.add_argument("--debug-step-delay-ms", type=float, default=0.0, help="fault injection: sleep after each step")
    p.add_argument("--debug-kv-cut-every", type=int, default=0, metavar="N",
                   help="fault injection: cut the KV connection midway through every Nth transfer sent (0: never)")
    _ops_args(p)


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
    )
    transfer = TransferConfig(
        backend=a.transfer,
        host=a.host,
        timeout_s=a.transfer_timeout,
        checksum=a.transfer_checksum,
        secret=env.cluster_secret(),
        allow_shm=not a.no_shm,
        debug_cut_every=a.debug_kv_cut_every,
    )
    return engine, transfer


def _run(coro) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def cmd_worker(a: argparse.Namespace) -> int:
    _setup_logging(a.cmd, a.log_format)
    engine, transfer = _configs(a)
    if a.cmd == "prefill":
        from pdserve.prefill.server import serve
    else:
        from pdserve.decode.server import serve
    _run(serve(engine, transfer, f"{a.host}:{a.port}", routers=tuple(a.router), step_delay_s=a.debug_step_delay_ms / 1000,
                 metrics_port=a.metrics_port, tls=_tls(a), advertise_host=a.advertise_host))
    return 0


def cmd_router(a: argparse.Namespace) -> int:
    _setup_logging("router", a.log_format)
    from pdserve.router.admission import parse_tenant_rates
    from pdserve.router.auth import load_api_keys
    from pdserve.router.server import RouterConfig, load_worker_config, serve

    prefill, decode = load_worker_config(a.config, a.prefill, a.decode)
    dns = tuple(("prefill", t) for t in a.prefill_dns) + tuple(("decode", t) for t in a.decode_dns)
    default_rate = None
    if a.default_rate:
        default_rate = parse_tenant_rates([f"*={a.default_rate}"])["*"]
    cfg = RouterConfig(
        model=a.model,
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
    )
    _run(serve(cfg))
    return 0


async def _generate(address: str, prompt: str, max_tokens: int, temperature: float, out=sys.stdout,
                    tls=None, api_key: str = "") -> dict:
    from pdserve.protos import pdserve_pb2 as pb
    from pdserve.protos import pdserve_pb2_grpc as pb_grpc
    from pdserve.serving.rpc import channel

    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    async with channel(address, tls) as ch:
        stub = pb_grpc.GenerationStub(ch)
        req = pb.GenerateRequest(
            prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=temperature)
        )
        last = None
        async for resp in stub.Generate(req, timeout=120, metadata=metadata):
            out.write(resp.text)
            out.flush()
            last = resp
        out.write("\n")
        return {
            "finish_reason": last.finish_reason,
            "usage": (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.cached_prompt_tokens),
            "prefill_worker": last.prefill_worker,
            "decode_worker": last.decode_worker,
            "ttft_s": last.timings.first_token_s,
        }


def cmd_generate(a: argparse.Namespace) -> int:
    import grpc

    try:
        info = asyncio.run(_generate(a.router, a.prompt, a.max_tokens, a.temperature, tls=_tls(a),
                                     api_key=env.api_key()))
    except grpc.aio.AioRpcError as e:
        print(f"pdserve generate: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(f"[{info}]", file=sys.stderr)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    _setup_logging("bench")
    from pdserve.bench.run import main as bench_main

    return bench_main(args=a)


def cmd_up(a: argparse.Namespace) -> int:
    _setup_logging("up")
    from pdserve.deploy.local import LocalCluster

    extra = []
    if a.no_shm:
        extra.append("--no-shm")
    router_args = ["--local-prefill-tokens", str(a.local_prefill_tokens), "--max-retries", str(a.max_retries)]
    if a.shed_ttft_ms:
        router_args += ["--shed-ttft-ms", str(a.shed_ttft_ms)]
    if a.saturation_ms:
        router_args += ["--saturation-ms", str(a.saturation_ms)]
    for t in a.tenant_rate:
        router_args += ["--tenant-rate", t]
    if a.default_rate:
        router_args += ["--default-rate", a.default_rate]
    cluster = LocalCluster(
        a.prefill, a.decode, a.model, a.device, a.transfer, a.policy,
        extra_worker_args=extra, router_args=router_args, echo=a.verbose,
    )
    t0 = time.monotonic()
    with cluster:
        print(f"pdserve cluster up in {time.monotonic() - t0:.1f}s: router at {cluster.router_address} "
              f"({a.prefill} prefill, {a.decode} decode, transfer {a.transfer}, model {a.model})", flush=True)
        if a.generate is not None:
            info = asyncio.run(_generate(cluster.router_address, a.generate, a.max_tokens, a.temperature))
            print(f"[{info}]", flush=True)
            return 0
        print("Ctrl-C to stop. Try: pdserve generate --router " + cluster.router_address + ' "Hello"', flush=True)
        try:
            while all(p.popen.poll() is None for p in cluster.procs):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


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
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this port (0: off, -1: any free port)")
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    _tls_args(p)


def _router_policy_args(p: argparse.ArgumentParser) -> None:
    from pdserve.router.policy import POLICIES

    p.add_argument("--policy", default="cache_aware", choices=POLICIES)
    p.add_argument(
        "--local-prefill-tokens", type=int, default=16,
        help="decode workers prefill locally when the uncached prompt is at most this long (0: never)",
    )
    p.add_argument("--saturation-ms", type=float, default=0.0, help="prefill locally when the prefill queue exceeds this")
    p.add_argument("--shed-ttft-ms", type=float, default=0.0, help="refuse requests whose predicted TTFT exceeds this")
    p.add_argument("--tenant-rate", action="append", default=[], help="NAME=RATE[:BURST] requests/s (repeatable)")
    p.add_argument("--default-rate", default="", help="RATE[:BURST] for tenants without their own limit")
    p.add_argument("--max-retries", type=int, default=3)
    p.add_argument("--api-keys", default="", help='JSON file {"<key>": "<tenant>"}: require API keys')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving", epilog=EPILOG)
    sub = parser.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="start router + prefill + decode workers locally")
    up.add_argument("--prefill", type=int, default=1, help="prefill workers (0: decode workers prefill locally)")
    up.add_argument("--decode", type=int, default=1)
    up.add_argument("--model", default="tiny")
    up.add_argument("--device", default="cpu")
    up.add_argument("--transfer", default="tcp", choices=["tcp", "ucx", "nccl"])
    up.add_argument("--no-shm", action="store_true")
    _router_policy_args(up)
    up.add_argument("--generate", metavar="PROMPT", help="send one request, print it, then shut down")
    up.add_argument("--max-tokens", type=int, default=32)
    up.add_argument("--temperature", type=float, default=0.0)
    up.add_argument("-v", "--verbose", action="store_true", help="echo worker logs")
    up.set_defaults(fn=cmd_up)

    for role in ("prefill", "decode"):
        w = sub.add_parser(role, help=f"run one {role} worker")
        _engine_args(w)
        w.set_defaults(fn=cmd_worker)

    r = sub.add_parser("router", help="run the router")
    r.add_argument("--model", default="tiny", help="for the tokenizer")
    r.add_argument("--prefill", action="append", default=[], help="prefill worker host:port (repeatable)")
    r.add_argument("--decode", action="append", default=[], help="decode worker host:port (repeatable)")
    r.add_argument("--config", help='JSON file {"prefill": [...], "decode": [...]}')
    r.add_argument("--prefill-dns", action="append", default=[], metavar="HOST:PORT",
                   help="discover prefill workers by resolving HOST (a headless Service) every poll")
    r.add_argument("--decode-dns", action="append", default=[], metavar="HOST:PORT",
                   help="discover decode workers by resolving HOST every poll")
    _router_policy_args(r)
    _ops_args(r)
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=0)
    r.set_defaults(fn=cmd_router)

    b = sub.add_parser("bench", help="load-test a cluster over the public API (see bench/run.py)")
    from pdserve.bench.run import build_parser as bench_parser

    bench_parser(b)
    b.set_defaults(fn=cmd_bench)

    g = sub.add_parser("generate", help="stream a completion from a running cluster")
    g.add_argument("prompt")
    g.add_argument("--router", default="127.0.0.1:50051")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    _tls_args(g)
    g.set_defaults(fn=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"pdserve {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
