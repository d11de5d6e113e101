"""The driver and CLI against an in-process fake router (no model): planning, wire requests, records, outputs."""

from __future__ import annotations

import asyncio
import json
import threading

import grpc
import pytest

from pdserve.bench import plots
from pdserve.bench.client import run_closed_loop, run_open_loop
from pdserve.bench.metrics import Record, summarize
from pdserve.bench.run import build_parser, main, plan_runs
from pdserve.bench.workloads import BenchRequest
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc

FAIL_TOKEN = 999  # a prompt starting with this is refused


class FakeRouter(pb_grpc.GenerationServicer):
    """Streams max_tokens one-token messages, 2 ms apart; reports half the prompt as cached."""

    def __init__(self):
        self.requests: list[pb.GenerateRequest] = []
        self.authorizations: list[str | None] = []
        self.in_flight = self.max_in_flight = 0

    async def Generate(self, request, context):
        self.requests.append(request)
        self.authorizations.append(dict(context.invocation_metadata()).get("authorization"))
        if request.token_ids and request.token_ids[0] == FAIL_TOKEN:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no room")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            n = request.sampling.max_tokens
            prompt_len = len(request.token_ids) or len(request.prompt.split())
            for i in range(n):
                await asyncio.sleep(0.002)
                last = i == n - 1
                yield pb.GenerateResponse(
                    request_id=request.request_id, token_ids=[7], finish_reason="length" if last else "",
                    usage=pb.Usage(prompt_tokens=prompt_len, completion_tokens=n, cached_prompt_tokens=prompt_len // 2)
                    if last else None,
                )
        finally:
            self.in_flight -= 1


@pytest.fixture
def fake_router():
    """A grpc.aio server on its own event loop thread; yields (address, servicer)."""
    loop = asyncio.new_event_loop()
    servicer = FakeRouter()
    ready = threading.Event()
    box = {}

    async def start():
        server = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(servicer, server)
        box["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        box["server"] = server
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield f"127.0.0.1:{box['port']}", servicer
    asyncio.run_coroutine_threadsafe(box["server"].stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def _args(*extra):
    return build_parser().parse_args(["--router", "127.0.0.1:1", *extra])


def test_plan_is_deterministic_and_sweeps_use_fresh_prompts():
    a = _args("--workload", "uniform", "--input-len-range", "8,32", "--output-len", "4", "--rates", "1,2",
              "--num-requests", "30", "--seed", "5")
    p1, p2 = plan_runs(a), plan_runs(a)
    assert [(p.tag, p.send_at, [r.token_ids for r in p.requests]) for p in p1] == \
           [(p.tag, p.send_at, [r.token_ids for r in p.requests]) for p in p2]
    assert [p.tag for p in p1] == ["rate1", "rate2"] and [p.workload_seed for p in p1] == [5, 1005]
    assert p1[0].requests[0].token_ids != p1[1].requests[0].token_ids
    other = plan_runs(_args("--workload", "uniform", "--input-len-range", "8,32", "--rates", "1,2", "--seed", "6"))
    assert other[0].send_at != p1[0].send_at[:100]
    closed = plan_runs(_args("--concurrency", "3"))
    assert len(closed) == 1 and closed[0].send_at is None and closed[0].tag == "conc3"


@pytest.mark.parametrize("argv,flag", [
    (["--rates", "1,x"], "--rates"),
    (["--rates", "1,0"], "--rates"),
    (["--rate", "2", "--rates", "1,2"], "--rates"),
    (["--workload", "trace"], "--trace"),
    (["--num-requests", "0"], "--num-requests"),
    (["--concurrency", "0"], "--concurrency"),
    (["--workload", "uniform", "--input-len-range", "64"], "--input-len-range"),
    (["--input-len-dist", "1,2"], "--input-len-dist"),
    (["--vocab-range", "9,3"], "vocab"),
])
def test_bad_flags_raise_value_error_naming_the_flag(argv, flag):
    with pytest.raises(ValueError, match=flag):
        plan_runs(_args(*argv))


def test_open_loop_sends_exact_requests_on_schedule(fake_router):
    address, servicer = fake_router
    reqs = [BenchRequest([5] * (i + 3), i + 2) for i in range(5)] + [BenchRequest([], 3, prompt="a b c d")]
    reqs.append(BenchRequest([FAIL_TOKEN, 4], 2))
    send_at = [0.05 * i for i in range(len(reqs))]
    records = asyncio.run(run_open_loop(address, reqs, send_at, 10.0, 10.0, progress=False, id_prefix="t"))
    assert [r.request_id for r in records] == [f"t-{i}" for i in range(7)]
    got = {m.request_id: m for m in servicer.requests}
    for i, r in enumerate(reqs[:5]):
        m = got[f"t-{i}"]
        assert list(m.token_ids) == r.token_ids and m.sampling.max_tokens == r.output_len
        assert m.sampling.ignore_eos and m.sampling.temperature == 0
    assert got["t-5"].prompt == "a b c d" and not got["t-5"].token_ids
    assert [r.output_tokens for r in records[:6]] == [2, 3, 4, 5, 6, 3]
    assert records[5].prompt_len == 4, "a text prompt's length comes from the server's usage"
    assert records[6].status == "RESOURCE_EXHAUSTED" and "no room" in records[6].error
    for r, at in zip(records, send_at, strict=True):
        assert at - 0.001 <= r.send_time < at + 0.1
    s = summarize(records)
    assert s["num_ok"] == 6 and s["errors"] == {"RESOURCE_EXHAUSTED": 1} and s["num_short"] == 0
    assert 0 < s["ttft_s"]["p50"] < 1 and s["cached_prompt_token_share"] == pytest.approx(
        sum(r.prompt_len // 2 for r in records[:6]) / sum(r.prompt_len for r in records[:6]))


def test_open_loop_stops_sending_at_the_duration(fake_router):
    address, servicer = fake_router
    reqs = [BenchRequest([5, 6], 2) for _ in range(10)]
    records = asyncio.run(run_open_loop(address, reqs, [0.02 * i for i in range(10)], 0.07, 10.0, progress=False))
    assert len(records) == 4 and len(servicer.requests) == 4


def test_closed_loop_keeps_concurrency_in_flight(fake_router):
    address, servicer = fake_router
    reqs = [BenchRequest([5, 6, 7], 5) for _ in range(12)]
    records = asyncio.run(run_closed_loop(address, reqs, 3, 30.0, 10.0, progress=False))
    assert len(records) == 12 and all(r.ok and r.output_tokens == 5 for r in records)
    assert servicer.max_in_flight == 3
    assert [r.request_id for r in records] == [f"bench-{i}" for i in range(12)]


def test_cli_sweep_writes_json_and_plots(fake_router, tmp_path, capsys):
    address, _ = fake_router
    rc = main(["--router", address, "--workload", "uniform", "--input-len-range", "4,16", "--output-len", "3",
               "--rates", "20,40", "--num-requests", "12", "--out-dir", str(tmp_path), "--no-progress",
               "--label", "fake router"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "fake router rate20: 12/12 ok" in out and "goodput" in out
    for tag in ("rate20", "rate40"):
        doc = json.loads((tmp_path / f"fake_router-{tag}-seed0.json").read_text())
        assert doc["config"]["rates"] == "20,40" and doc["run"]["mode"] == "open"
        assert doc["summary"]["num_ok"] == 12 and len(doc["records"]) == 12
        assert all(Record.from_dict(r).output_tokens == 3 for r in doc["records"])
    for png in ("latency_cdf", "throughput_vs_rate", "goodput_vs_rate"):
        assert (tmp_path / f"fake_router-{png}.png").stat().st_size > 10_000


def test_plots_render_with_empty_and_failed_runs(tmp_path):
    ok = Record(send_time=0.0, prompt_len=4, chunk_times=[0.1, 0.2], chunk_tokens=[1, 1], end_time=0.2)
    bad = Record(send_time=0.0, prompt_len=4, status="UNAVAILABLE")
    path = plots.latency_cdfs({"a": [ok, bad], "b": [bad]}, tmp_path / "cdf.png", "t", 0.5, 0.05)
    assert path.stat().st_size > 10_000
    s = summarize([ok, bad])
    assert len(plots.sweep({"x": [(1.0, s), (2.0, s)]}, tmp_path, "p")) == 2


def test_the_bench_sends_its_api_key_and_pdserve_bench_defaults_it_to_pdserve_api_key(fake_router, tmp_path,
                                                                                         monkeypatch):
    from pdserve.cli import build_parser as cli_parser
    from pdserve.cli import cmd_bench

    address, servicer = fake_router
    argv = ["--router", address, "--workload", "uniform", "--input-len-range", "4,8", "--output-len", "2",
            "--num-prompts", "3", "--result-dir", str(tmp_path), "--no-progress", "--no-plots"]
    assert main(argv) == 0 and servicer.authorizations == [None] * 3, "no key: no header"
    assert main([*argv, "--api-key", "key-b"]) == 0 and servicer.authorizations[3:] == ["Bearer key-b"] * 3
    monkeypatch.setenv("PDSERVE_API_KEY", "key-a")
    assert cmd_bench(cli_parser().parse_args(["bench", *argv])) == 0
    assert servicer.authorizations[6:] == ["Bearer key-a"] * 3


def test_the_bench_bypasses_the_response_cache_by_default_and_names_the_model_it_asks_for(fake_router, tmp_path):
    address, servicer = fake_router
    argv = ["--router", address, "--workload", "uniform", "--input-len-range", "4,8", "--output-len", "2",
            "--num-prompts", "2", "--result-dir", str(tmp_path), "--no-progress", "--no-plots"]
    assert main(argv) == 0
    assert [(r.model, r.cache) for r in servicer.requests] == [("", pb.CACHE_BYPASS)] * 2
    assert main([*argv, "--model", "chat-route", "--cache", "use"]) == 0
    assert [(r.model, r.cache) for r in servicer.requests[2:]] == [("chat-route", pb.CACHE_USE)] * 2
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--cache", "sometimes"])
