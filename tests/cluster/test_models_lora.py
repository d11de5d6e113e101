"""LoRA adapters in a cluster (real processes): loaded at start (--lora), generation equal to the offline LLM with
that adapter (through the disaggregated path), and LoadAdapter/UnloadAdapter at run time under load with no
failed request: running requests finish, new ones for an unloaded adapter get NOT_FOUND."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file

from pdserve import LLM, SamplingParams
from pdserve.deploy.cli_models import ModelPool
from pdserve.deploy.local import LocalCluster
from pdserve.engine.models import PRESETS
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc

PROMPTS = [list(range(3, 40)), [7, 8, 9] * 11]
MAX_TOKENS = 8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_lora(out: Path, seed: int, rank: int = 8, model: str = "tiny", std: float = 0.1) -> str:
    """A PEFT LoRA directory for preset ``model``: adapter_config.json + adapter_model.safetensors, random A and B."""
    c = PRESETS[model].config
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * hidden // c["num_attention_heads"]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(c["num_hidden_layers"]):
        for t in TARGETS:
            fan_in, fan_out = shapes[t]
            part = "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{t}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * std
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": model}))
    return str(out)


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loras")
    return {name: make_lora(root / name, seed) for name, seed in (("a1", 1), ("a2", 2))}


@pytest.fixture(scope="module")
def expected(loras) -> dict[str, list[list[int]]]:
    llm = LLM("tiny", enable_lora=True, lora_modules=loras)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    out = {name: [o.token_ids for o in llm.generate(PROMPTS, params, lora_name=name)] for name in loras}
    out["tiny"] = [o.token_ids for o in llm.generate(PROMPTS, params)]
    return out


@pytest.fixture(scope="module")
def cluster(loras):
    pools = [ModelPool("tiny", "tiny", 1, 1, loras=(("a1", loras["a1"]),))]
    with LocalCluster(pools=pools, max_loras=2, enable_lora=True, extra_worker_args=["--debug-step-delay-ms", "10"],
                      router_args=["--local-prefill-tokens", "0", "--route", "canary=tiny:50,a1:50"]) as c:
        yield c


def _req(model: str, i: int = 0, max_tokens: int = MAX_TOKENS, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=PROMPTS[i], model=model, **kw,
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


async def _complete(stub, req):
    try:
        return await stub.Complete(req, timeout=120)
    except grpc.aio.AioRpcError as e:
        return e


def _run(address: str, fn):
    async def go():
        async with grpc.aio.insecure_channel(address) as ch:
            return await fn(pb_grpc.GenerationStub(ch), pb_grpc.AdminStub(ch))

    return asyncio.run(go())


def test_an_adapter_loaded_at_start_answers_like_the_offline_llm(cluster, expected):
    assert expected["a1"] != expected["tiny"] and expected["a1"] != expected["a2"]  # the adapters matter

    async def go(gen, admin):
        cases = [(m, i) for m in ("a1", "tiny", "a1") for i in range(len(PROMPTS))]  # twice: prefix cache hit
        answers = await asyncio.gather(*(_complete(gen, _req(m, i)) for m, i in cases))
        for (m, i), r in zip(cases, answers, strict=True):
            assert not isinstance(r, Exception), r
            assert r.model == m and list(r.token_ids) == expected[m][i], (m, i)
        assert any(r.prefill_worker for r in answers)  # the disaggregated path ran
        rows = {m.name: m for m in (await admin.ListModels(pb.ListModelsRequest(), timeout=10)).models}
        a1 = rows["a1"]
        assert a1.kind == pb.MODEL_KIND_ADAPTER and a1.base_model == "tiny" and a1.state == "ready"
        assert len(a1.worker_ids) == 2  # the prefill and the decode worker
        canary = await asyncio.gather(*(_complete(gen, _req("canary", session_id=f"s{k}")) for k in range(12)))
        assert {r.model for r in canary} == {"tiny", "a1"}
        assert all(list(r.token_ids) == expected[r.model][0] for r in canary)

    _run(cluster.router_address, go)


def test_load_and_unload_at_run_time_under_load_lose_no_request(cluster, expected, loras):
    async def go(gen, admin):
        base = [asyncio.create_task(_complete(gen, _req("tiny", i % 2, max_tokens=32))) for i in range(6)]
        await asyncio.sleep(0.2)
        loaded = await admin.LoadAdapter(pb.LoadAdapterRequest(name="a2", path=loras["a2"]), timeout=60)
        assert len(loaded.worker_ids) == 2  # the prefill and the decode worker
        a2 = await asyncio.gather(*(_complete(gen, _req("a2", i)) for i in range(len(PROMPTS))))
        assert [list(r.token_ids) for r in a2] == expected["a2"]
        running = [asyncio.create_task(_complete(gen, _req("a1", i % 2, max_tokens=48))) for i in range(4)]
        await asyncio.sleep(0.2)
        assert not any(t.done() for t in running)  # still running when the unload starts
        unloaded = await admin.UnloadAdapter(pb.UnloadAdapterRequest(name="a1"), timeout=120)
        assert unloaded.unloaded and len(unloaded.worker_ids) == 2
        for i, r in enumerate(await asyncio.gather(*running)):
            assert not isinstance(r, Exception), r  # no request lost
            assert r.finish_reason == "length" and len(r.token_ids) == 48 and r.model == "a1"
            assert list(r.token_ids)[:MAX_TOKENS] == expected["a1"][i % 2]
        for i, r in enumerate(await asyncio.gather(*base)):
            assert not isinstance(r, Exception), r
            assert len(r.token_ids) == 32 and list(r.token_ids)[:MAX_TOKENS] == expected["tiny"][i % 2]
        after = await _complete(gen, _req("a1"))
        assert isinstance(after, grpc.aio.AioRpcError) and after.code() == grpc.StatusCode.NOT_FOUND
        assert "'a1'" in after.details()
        rows = {m.name: m for m in (await admin.ListModels(pb.ListModelsRequest(), timeout=10)).models}
        assert "a1" not in rows and rows["a2"].state == "ready"
        assert [list(r.token_ids) for r in await asyncio.gather(*(_complete(gen, _req("a2", i)) for i in range(2)))
                ] == expected["a2"]  # the other adapter keeps serving

    _run(cluster.router_address, go)


def test_a_bad_adapter_is_refused_and_the_cluster_keeps_serving(cluster, expected):
    async def go(gen, admin):
        try:
            await admin.LoadAdapter(pb.LoadAdapterRequest(name="a3", path="/no/such/adapter"), timeout=60)
        except grpc.aio.AioRpcError as e:
            error = e
        else:
            raise AssertionError("a missing adapter directory was accepted")
        rows = {m.name for m in (await admin.ListModels(pb.ListModelsRequest(), timeout=10)).models}
        return error, rows, await _complete(gen, _req("tiny"))

    error, rows, answer = _run(cluster.router_address, go)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "/no/such/adapter" in error.details()
    assert "a3" not in rows
    assert list(answer.token_ids) == expected["tiny"][0]
