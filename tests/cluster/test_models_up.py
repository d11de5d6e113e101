"""``pdserve up`` with several base models: the flags (pool sizes per model, adapters per pool, routes) and one
real ``pdserve up`` serving two base models, each answering like its offline LLM."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import grpc
import pytest

from pdserve import LLM, SamplingParams
from pdserve.cli import build_parser
from pdserve.deploy.cli_checks import UsageError
from pdserve.deploy.cli_models import ModelPool, pool_worker_args, router_kwargs, up_pools
from pdserve.deploy.cli_up import _router_args
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.router.routes import parse_route
from tests.deploy.test_launcher import up_factory  # noqa: F401  (fixture)


def _up(*argv: str):
    return build_parser().parse_args(["up", *argv])


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> tuple[str, str]:
    """Two directories that look like PEFT adapters to the launcher (it checks adapter_config.json only)."""
    dirs = []
    for name in ("a1", "a2"):
        d = tmp_path_factory.mktemp(name)
        (d / "adapter_config.json").write_text("{}")
        dirs.append(str(d))
    return dirs[0], dirs[1]


def test_up_model_flags_give_one_pool_per_model(adapter_dirs):
    d1, d2 = adapter_dirs
    a = _up("--model", "tiny:2:1", "--model", "qwen=tiny-qwen2", "--prefill", "0", "--decode", "3",
            "--lora", f"a1={d1}", "--lora", f"qwen/a2={d2}", "--route", "mix=tiny:90,a1:10")
    pools = up_pools(a)
    assert pools == [ModelPool("tiny", "tiny", 2, 1, (("a1", d1),)),
                     ModelPool("qwen", "tiny-qwen2", 0, 3, (("a2", d2),))]
    assert pool_worker_args(pools[1], 2) == ["--model", "tiny-qwen2", "--served-model-name", "qwen",
                                             "--lora", f"a2={d2}", "--max-loras", "2"]
    r = _router_args(a)
    assert r[r.index("--route") + 1] == "mix=tiny:90,a1:10"
    assert up_pools(_up()) == [ModelPool("tiny-chat", "tiny-chat", 1, 1)]  # the default, --prefill/--decode sizes


@pytest.mark.parametrize("argv, flag", [
    (["--model", "tiny:1"], "--model"),  # one size is not PREFILL:DECODE... it reads as a name
    (["--model", "tiny:1:0"], "--model"),
    (["--model", "tiny", "--model", "tiny"], "--model"),
    (["--model", "bad name=tiny"], "--model"),
    (["--route", "mix=tiny"], "--route"),
    (["--lora", "=x"], "--lora"),
    (["--model", "tiny", "--lora", "tiny=A1"], "--lora: 'tiny' is already a --model name"),
    (["--model", "tiny", "--route", "sup=tiny:1", "--lora", "sup=A1"], "--lora: 'sup' is already a --route name"),
    (["--model", "tiny", "--route", "tiny=tiny:1"], "--route: 'tiny' is also a --model name"),
    (["--model", "tiny", "--model", "q=tiny-qwen3", "--lora", "a=A1", "--lora", "q/a=A2"], "--lora: 'a' is given twice"),
    (["--model", "tiny:a:b"], "--model: 'tiny:a:b' is not a preset, a model directory or a hub id"),
    (["--model", "tiny", "--lora", "nope/x=A1"], "--lora: 'nope' in 'nope/x' is not a --model name"),
    (["--lora", "x=/nonexistent/adapter"], "--lora: no such adapter directory '/nonexistent/adapter'"),
    (["--lora", "x=MODEL_DIR"], "--lora: .* is not a PEFT adapter directory"),
])
def test_bad_model_flags_name_the_flag(argv, flag, adapter_dirs, tmp_path):
    argv = [v.replace("=A1", f"={adapter_dirs[0]}").replace("=A2", f"={adapter_dirs[1]}")
            .replace("MODEL_DIR", str(tmp_path)) for v in argv]
    with pytest.raises(UsageError, match=flag):
        up_pools(_up(*argv))


def test_a_worker_refuses_a_missing_adapter_directory_before_it_starts():
    from pdserve.deploy.cli_models import engine_kwargs

    with pytest.raises(UsageError, match="--lora: no such adapter directory"):
        engine_kwargs(build_parser().parse_args(["decode", "--lora", "x=/nonexistent/adapter"]))


def test_router_model_flags():
    r = build_parser().parse_args(["router", "--model", "a=tiny", "--model", "tiny-qwen2", "--route", "x=a:1"])
    assert router_kwargs(r) == {"model": "tiny", "models": (("a", "tiny"), ("tiny-qwen2", "tiny-qwen2")),
                                "routes": ("x=a:1",), "generation_config": "auto"}
    assert router_kwargs(build_parser().parse_args(["router", "--model", "tiny"]))["model"] == "tiny"
    off = build_parser().parse_args(["router", "--generation-config", "none"])
    assert router_kwargs(off)["generation_config"] == "none"
    with pytest.raises(UsageError, match="--route"):
        router_kwargs(build_parser().parse_args(["router", "--route", "x=a"]))


def test_one_up_serves_two_base_models(up_factory):  # noqa: F811
    prompt = list(range(5, 45))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = {m: LLM(m).generate([prompt], params)[0].token_ids for m in ("tiny", "tiny-qwen2")}
    up = up_factory("--model", "tiny:1:1", "--model", "tiny-qwen2:0:1", "--route", "ab=tiny:50,tiny-qwen2:50",
                    "--metrics-port", "0")
    up.wait_ready()
    assert {"prefill 0", "decode 0", "decode 1"} <= set(up.pids)

    async def go():
        async with grpc.aio.insecure_channel(up.router) as ch:
            gen = pb_grpc.GenerationStub(ch)
            sampling = pb.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
            answers = {m: await gen.Complete(pb.GenerateRequest(token_ids=prompt, model=m, sampling=sampling),
                                             timeout=60) for m in ("tiny", "tiny-qwen2")}
            listed = await pb_grpc.AdminStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
            return answers, {m.name: m for m in listed.models}

    answers, rows = asyncio.run(go())
    for m, r in answers.items():
        assert r.model == m and list(r.token_ids) == expected[m]
    assert rows["tiny"].state == rows["tiny-qwen2"].state == "ready"
    assert len(rows["tiny"].worker_ids) == 2 and len(rows["tiny-qwen2"].worker_ids) == 1
    assert rows["ab"].kind == pb.MODEL_KIND_ROUTE
    r = subprocess.run([sys.executable, "-m", "pdserve", "generate", "--router", up.router, "--json", "--max-tokens",
                        "3", "--model", "ab", "--session-id", "u1", "Hello"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PDSERVE_API_KEY": ""})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == parse_route("ab=tiny:50,tiny-qwen2:50").choose("u1")
