"""The CLI's surface: one-line usage errors with exit status 2, help with defaults, torch-free client paths."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pdserve.cli import build_parser, main


def _pdserve(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PDSERVE_API_KEY": ""})


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


BAD = [
    (["up", "--port", "70000"], "--port"),
    (["up", "--port", "-5"], "--port"),
    (["up", "--metrics-port", "65536"], "--metrics-port"),
    (["router", "--port", "x"], "--port"),
    (["up", "--decode", "0"], "--decode"),
    (["up", "--model", "/no/such/model-dir"], "--model"),
    (["decode", "--model", "./missing-model", "--port", "0"], "--model"),
    (["up", "--api-keys", "/no/such/keys.json"], "--api-keys"),
    (["bench", "--router", "127.0.0.1:1", "--num-prompts", "0"], "--num-prompts"),
    (["generate"], "prompt"),
    (["gateway", "--port", "70000"], "--port"),
    (["gateway", "--router", "127.0.0.1:1", "--timeout", "0"], "--timeout"),
    (["gateway", "--router", "", "--port", "0"], "--router:"),  # was blamed on --https-cert/--https-key
    (["gateway", "--port", "0", "--https-cert", "c.pem"], "--https-cert/--https-key: give both"),
    (["up", "--http-port", "-1"], "--http-port"),
]


@pytest.mark.parametrize("argv,flag", BAD, ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_bad_input_is_one_line_naming_the_flag_and_exit_2(argv, flag):
    t0 = time.monotonic()
    r = _pdserve(*argv)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert time.monotonic() - t0 < 30, "a bad flag fails at once, before any process starts"


@pytest.mark.parametrize("cmd", [["up"], ["router"], ["decode"], ["gateway"]])
def test_busy_port_is_refused_up_front(cmd, busy_port):
    r = _pdserve(*cmd, "--port", str(busy_port))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "--port" in lines[0] and "in use" in lines[0], lines


@pytest.mark.skipif(_cuda(), reason="this machine has CUDA")
@pytest.mark.parametrize("cmd", [["up"], ["prefill"]])
def test_missing_cuda_is_one_line(cmd):
    r = _pdserve(*cmd, "--device", "cuda")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--device" in lines[0], r.stderr


def test_up_and_generate_agree_on_the_router_port():
    p = build_parser()
    up = p.parse_args(["up"])
    gen = p.parse_args(["generate", "hi"])
    assert up.port == 50051 and gen.router.endswith(f":{up.port}")
    assert up.metrics_port == -1 and up.host == "127.0.0.1"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_has_help_and_shows_its_default():
    for name, sub in _subparsers(build_parser()).items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"pdserve {name} {action.option_strings}: no help"
            if action.option_strings and action.default not in (None, argparse.SUPPRESS):
                assert "default" in sub.formatter_class(prog="x")._get_help_string(action), \
                    f"pdserve {name} {action.option_strings[0]}: default not shown"
        assert "default" in text
    up_help = _subparsers(build_parser())["up"].format_help()
    for flag in ("--host", "--port", "--metrics-port", "--api-keys", "--log-format", "--tls-cert", "--tls-key",
                 "--tls-ca", "--dtype", "--max-num-seqs", "--max-num-batched-tokens", "--kv-cache-mib",
                 "--no-restart", "--generate", "--prefill", "--decode", "--transfer"):
        assert flag in up_help, flag
    assert "50051" in up_help


def test_bench_uses_vllm_flag_names_and_keeps_the_old_ones_hidden():
    bench = _subparsers(build_parser())["bench"]
    text = bench.format_help()
    for flag in ("--num-prompts", "--request-rate", "--max-concurrency", "--result-dir"):
        assert flag in text, flag
    hidden = {o for a in bench._actions if a.help == argparse.SUPPRESS for o in a.option_strings}
    assert {"--num-requests", "--rate", "--concurrency", "--out-dir"} <= hidden
    new = bench.parse_args(["--router", "x", "--num-prompts", "7", "--request-rate", "2", "--max-concurrency", "3",
                            "--result-dir", "d"])
    old = bench.parse_args(["--router", "x", "--num-requests", "7", "--rate", "2", "--concurrency", "3",
                            "--out-dir", "d"])
    for a in (new, old):
        assert (a.num_requests, a.rate, a.concurrency, a.out_dir) == (7, 2.0, 3, "d")


def test_generate_takes_sampling_flags():
    a = build_parser().parse_args(["generate", "hi", "--seed", "3", "--top-p", "0.5", "--top-k", "4", "--stop", "x",
                                   "--stop", "y", "--temperature", "0.7", "--api-key", "k", "--json"])
    assert (a.seed, a.top_p, a.top_k, a.stop, a.temperature, a.api_key, a.json) == (3, 0.5, 4, ["x", "y"], 0.7, "k", True)


def test_generate_json_on_rpc_error_parses(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["generate", "hi", "--router", f"127.0.0.1:{port}", "--json"]) == 1
    out = capsys.readouterr().out.strip()
    assert json.loads(out)["error"] == "UNAVAILABLE"


@pytest.mark.parametrize("args, flag", [
    (["hi", "--seed", str(1 << 64)], "--seed"), (["hi", "--max-tokens", str(1 << 40)], "--max-tokens"),
    (["hi", "--top-k", str(-(1 << 40))], "--top-k"), (["\udcff\udcfe"], "prompt"),  # argv bytes ff fe
    (["hi", "--stop", "\udcff"], "--stop"),
])
def test_generate_json_on_a_bad_flag_is_one_json_object_naming_it(capsys, args, flag):
    """Values protobuf refuses were a plain "Value out of range" / UnicodeEncodeError line even with --json."""
    assert main(["generate", *args, "--router", "127.0.0.1:1", "--json"]) == 2
    captured = capsys.readouterr()
    err = json.loads(captured.out.strip())
    assert err["error"] == "INVALID_ARGUMENT" and err["details"].startswith(flag + ":")
    assert captured.err.startswith(f"pdserve generate: error: {flag}:")


def test_client_and_parser_import_no_torch():
    code = ("import sys; from pdserve.cli import build_parser; build_parser(); "
            "from pdserve.deploy import cli_client, cli_up, cli_checks, supervisor, local; "
            "cli_checks.check_device('cpu'); cli_checks.check_model('tiny'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_up_forwards_the_request_class_flags_to_its_router_and_workers():
    from pdserve.cli import build_parser
    from pdserve.deploy.cli_up import _router_args, _worker_args

    a = build_parser().parse_args(["up", "--response-cache-mib", "16", "--response-cache-ttl-s", "30",
                                   "--cache-shared-tenants", "a,b", "--semantic-cache-threshold", "0.9",
                                   "--batch-db", "/tmp/x.sqlite3", "--batch-concurrency", "3",
                                   "--priority-aging-s", "5"])
    r = _router_args(a)
    for flag, value in (("--response-cache-mib", "16"), ("--response-cache-ttl-s", "30.0"),
                        ("--cache-shared-tenants", "a,b"), ("--semantic-cache-threshold", "0.9"),
                        ("--batch-db", "/tmp/x.sqlite3"), ("--batch-concurrency", "3")):
        assert r[r.index(flag) + 1] == value, flag
    w = _worker_args(a)
    assert w[w.index("--priority-aging-s") + 1] == "5.0"
    # the forwarded flags parse as the router's own
    routed = build_parser().parse_args(["router", *r])
    assert routed.semantic_cache_threshold == 0.9 and routed.response_cache_mib == 16


def test_up_forwards_the_engine_flags_to_every_worker():
    from pdserve.cli import _configs, build_parser
    from pdserve.deploy.cli_up import _worker_args

    a = build_parser().parse_args(["up", "--block-size", "32", "--max-model-len", "512", "--model-impl", "hf",
                                   "--cuda-graphs", "off", "--no-prefix-caching", "--compile", "--async-output", "on"])
    w = _worker_args(a)
    for flag, value in (("--block-size", "32"), ("--max-model-len", "512"), ("--model-impl", "hf"),
                        ("--cuda-graphs", "off"), ("--async-output", "on")):
        assert w[w.index(flag) + 1] == value, flag
    assert "--no-prefix-caching" in w
    worker = build_parser().parse_args(["prefill", *w])  # they parse as the workers' own flags
    assert (worker.block_size, worker.max_model_len, worker.model_impl, worker.no_prefix_caching) == (32, 512, "hf", True)
    assert worker.async_output == "on"
    engine = _configs(build_parser().parse_args(["prefill", "--async-output", "on"]))[0]
    assert engine.async_output == "on" and engine.use_async_output()
    assert worker.compile and "--compile" not in _worker_args(build_parser().parse_args(["up"]))


def test_stop_signals_are_raised_only_where_the_launcher_checks():
    """A handler that raised anywhere could land inside Popen.poll holding its waitpid lock (and then no
    later wait could reap that child): pdserve up notes the signal and raises at its own check points."""
    import os
    import signal

    import pytest

    from pdserve.deploy.cli_up import Stop, StopSignals

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        signals = StopSignals().install()
        os.kill(os.getpid(), signal.SIGHUP)  # handled between bytecodes, here: it must not raise
        with pytest.raises(Stop, match="SIGHUP"):
            signals.check()
        os.kill(os.getpid(), signal.SIGTERM)  # later signals are ignored
        with pytest.raises(Stop, match="SIGHUP"):
            signals.check()
        eager = StopSignals().install()
        eager.raise_now = True
        with pytest.raises(Stop, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
