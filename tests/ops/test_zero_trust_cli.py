"""Issue 15 from the attacker's side, through the ``pdserve`` CLI: hole 4 (``pdserve up --api-keys`` is passed and
enforced) and hole 5 (workers register with their cluster credential; a refused heartbeat is a WARNING). Like
test_zero_trust.py, only public wire and hand-made tokens, so it runs unchanged against an older checkout."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from tests.ops.zero_trust_helpers import KEYS, SECRET, START_S, greedy, key, run, status_of


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("zt") / "keys.json"
    path.write_text(json.dumps(KEYS))
    return path


# ---- hole 4: pdserve up --api-keys ------------------------------------------------------------------
def test_hole4_pdserve_up_enforces_api_keys_on_generation_and_admin(keys_file):
    env = {k: v for k, v in os.environ.items() if k not in ("PDSERVE_CLUSTER_SECRET", "PDSERVE_API_KEY")}
    up = subprocess.Popen([sys.executable, "-u", "-m", "pdserve", "up", "--port", "0", "--prefill", "0", "--decode",
                           "1", "--api-keys", str(keys_file), "--metrics-port", "0"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines: list[str] = []
    try:
        router = ""
        deadline = time.monotonic() + START_S
        while not router and time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.split()[:1] == ["router"]:
                router = line.split()[1]
        assert router, "".join(lines)

        async def go():
            async with grpc.aio.insecure_channel(router) as ch:
                gen, admin = pb_grpc.GenerationStub(ch), pb_grpc.AdminStub(ch)
                req = pb.GenerateRequest(prompt="hi", sampling=greedy(2))
                return {
                    "generate, no key": await status_of(gen.Complete(req, timeout=30)),
                    "generate, bad key": await status_of(gen.Complete(req, timeout=30, metadata=key("nope"))),
                    "admin, no key": await status_of(admin.ListWorkers(pb.ListWorkersRequest(), timeout=10)),
                    "admin, tenant key": await status_of(admin.ListWorkers(pb.ListWorkersRequest(), timeout=10,
                                                                           metadata=key("k-alice"))),
                    "register, no credential": await status_of(admin.Register(
                        pb.RegisterRequest(address="10.6.6.6:1", role="decode"), timeout=10)),
                    "generate, good key": await status_of(gen.Complete(req, timeout=30, metadata=key("k-alice"))),
                    "admin, admin key": await status_of(admin.ListWorkers(pb.ListWorkersRequest(), timeout=10,
                                                                          metadata=key("k-ops"))),
                }

        out = run(go())
    finally:
        os.killpg(up.pid, 15)
        up.wait(60)
    U, P, OK = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK
    assert out == {"generate, no key": U, "generate, bad key": U, "admin, no key": U, "admin, tenant key": P,
                   "register, no credential": U, "generate, good key": OK, "admin, admin key": OK}, out


# ---- hole 5: self-registration with an --api-keys router ---------------------------------------------
def _spawn(args: list[str], secret: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PDSERVE_CLUSTER_SECRET"}
    env["PDSERVE_LOG_LEVEL"] = "INFO"
    if secret:
        env["PDSERVE_CLUSTER_SECRET"] = secret
    return subprocess.Popen([sys.executable, "-u", "-m", "pdserve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def _read_until(proc: subprocess.Popen, needle: str, timeout_s: float, lines: list[str]) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return line
    return ""


def test_hole5_workers_register_with_their_credential_and_a_refusal_is_a_warning(keys_file):
    router = _spawn(["router", "--port", "0", "--api-keys", str(keys_file), "--local-prefill-tokens", "0"], SECRET)
    procs = [router]
    try:
        lines: list[str] = []
        ready = _read_until(router, "PDSERVE_READY", START_S, lines)
        assert ready, "".join(lines)
        address = ready.split()[2]
        good = _spawn(["decode", "--port", "0", "--router", address], SECRET)
        rogue = _spawn(["decode", "--port", "0", "--router", address], "not-the-cluster-secret")
        procs += [good, rogue]
        rogue_lines: list[str] = []
        warning = _read_until(rogue, "refused this worker's registration", 120, rogue_lines)

        async def go():
            async with grpc.aio.insecure_channel(address) as ch:
                admin, gen = pb_grpc.AdminStub(ch), pb_grpc.GenerationStub(ch)
                deadline = time.monotonic() + START_S
                workers = []
                while time.monotonic() < deadline:
                    workers = (await admin.ListWorkers(pb.ListWorkersRequest(), timeout=10,
                                                       metadata=key("k-ops"))).workers
                    if any(w.healthy for w in workers):
                        break
                    await asyncio.sleep(0.5)
                answer = await gen.Complete(pb.GenerateRequest(prompt="hello", sampling=greedy(2)), timeout=60,
                                            metadata=key("k-alice"))
                forged = await status_of(admin.Register(pb.RegisterRequest(address="10.6.6.6:7002", role="decode"),
                                                        timeout=10, metadata=key("k-alice")))
                return list(workers), answer, forged

        workers, answer, forged = run(go(), timeout=START_S + 60)
    finally:
        for p in procs:
            os.killpg(p.pid, 15)
        for p in procs:
            p.wait(60)
    assert [w.role for w in workers] == ["decode"] and workers[0].healthy, "only the worker holding the secret"
    assert answer.finish_reason == "length"
    assert forged == grpc.StatusCode.UNAUTHENTICATED
    assert warning and "WARNING" in warning, "".join(rogue_lines[-20:])
