"""One real cluster per module (router + prefill + decode + gateway, separate processes on 127.0.0.1, port 0)
over a copy of the tiny preset with a chat template, and the clients that drive it."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import grpc
import openai
import pytest

from pdserve.deploy.local import LocalCluster
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}\n"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_model_dir(root) -> str:
    """The tiny preset (random weights) plus a chat template in its tokenizer_config.json."""
    from pdserve.engine.models import resolve_model

    src, _ = resolve_model("tiny")
    out = root / "tiny-with-chat"
    shutil.copytree(src, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return str(out)


def start_cluster(tmp_path_factory, router_args=None) -> LocalCluster:
    model = chat_model_dir(tmp_path_factory.mktemp("model"))
    # each step sleeps 5 ms, so a 1,900-token answer takes >= 9.5 s: the disconnect tests can tell a request
    # aborted by the client going away from one that just finished within their 5 s bound on a slow box
    return LocalCluster(1, 1, model=model, transfer="tcp", http_port=0, router_args=router_args,
                        extra_worker_args=["--debug-step-delay-ms", "5"]).start()


def grpc_call(address: str, method: str, req, metadata=None, timeout: float = 60.0):
    async def go():
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pb_grpc.GenerationStub(ch)
            if method == "Generate":
                return [r async for r in stub.Generate(req, metadata=metadata, timeout=timeout)]
            return await getattr(stub, method)(req, metadata=metadata, timeout=timeout)

    return asyncio.run(go())


def decode_load(cluster: LocalCluster) -> pb.WorkerLoad:
    """The decode worker's load as the router last polled it (every ~0.5 s), through the router's Admin API."""

    async def go():
        async with grpc.aio.insecure_channel(cluster.router_address) as ch:
            return await pb_grpc.AdminStub(ch).ListWorkers(pb.ListWorkersRequest(), timeout=10)

    (worker,) = [w for w in asyncio.run(go()).workers if w.role == "decode"]
    return worker.load


def wait_load(cluster: LocalCluster, done, bound_s: float = 5.0) -> pb.WorkerLoad:
    """Poll ``decode_load`` until ``done(load)`` or ``bound_s`` passed; returns the last load seen."""
    deadline = time.monotonic() + bound_s
    load = decode_load(cluster)
    while not done(load) and time.monotonic() < deadline:
        time.sleep(0.05)
        load = decode_load(cluster)
    return load


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.gateway_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id
