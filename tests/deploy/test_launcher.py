"""``pdserve up`` as a supervisor, with real processes on 127.0.0.1: signals stop every child, a launcher killed
with SIGKILL takes its children with it, and a killed worker is reported and restarted while the cluster serves."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

STARTUP_S = 240.0


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


class Up:
    """``pdserve up`` in a subprocess (its own session, so the test can signal it alone); output read by a thread."""

    def __init__(self, *args: str):
        self.popen = subprocess.Popen(
            [sys.executable, "-u", "-m", "pdserve", "up", "--port", "0", *args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "PDSERVE_API_KEY": ""},
        )
        self.lines: list[str] = []
        self.q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.pids: dict[str, int] = {}
        self.router = ""

    def _read(self) -> None:
        for line in self.popen.stdout:  # type: ignore[union-attr]
            self.lines.append(line)
            self.q.put(line)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=0.2)
            except queue.Empty:
                if self.popen.poll() is not None and self.q.empty():
                    break
                continue
            m = re.search(pattern, line)
            if m:
                return m
        raise AssertionError(f"no line matching {pattern!r} in {timeout_s:.0f}s; output:\n{''.join(self.lines)}")

    def wait_ready(self) -> None:
        self.wait_for(r"cluster ready", STARTUP_S)
        while True:  # one line per process follows
            m = self.wait_for(r"^\s+(router|prefill \d+|decode \d+)\s+(\S+)\s.*pid (\d+)$|Ctrl-C", 10)
            if m.group(0) == "Ctrl-C":
                break
            self.pids[m.group(1)] = int(m.group(3))
            if m.group(1) == "router":
                self.router = m.group(2)
        assert self.router and all(_alive(p) for p in self.pids.values()), self.lines

    def close(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        for pid in self.pids.values():  # never leave a worker behind, whatever the test did
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def up_factory():
    made: list[Up] = []

    def make(*args: str) -> Up:
        u = Up(*args)
        made.append(u)
        return u

    yield make
    for u in made:
        u.close()


def _generate_json(router: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "pdserve", "generate", "--router", router, "--json", "--max-tokens", "4",
                        "Hello"], capture_output=True, text=True, timeout=120, env={**os.environ, "PDSERVE_API_KEY": ""})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["completion_tokens"] == 4 and out["finish_reason"] == "length" and out["decode_worker"], out
    assert out["cached"] is False, out  # no --response-cache-mib: never from the cache
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_stops_every_child(up_factory, sig):
    up = up_factory("--prefill", "0", "--decode", "1")
    up.wait_ready()
    assert len(up.pids) == 2
    os.kill(up.popen.pid, sig)
    assert up.popen.wait(60) == 0, "".join(up.lines)
    assert _wait_gone(list(up.pids.values()), 10) == [], "children left behind"
    assert any(signal.Signals(sig).name in line for line in up.lines)


def test_sigkill_of_the_launcher_kills_its_children(up_factory):
    up = up_factory("--prefill", "1", "--decode", "1")
    up.wait_ready()
    assert len(up.pids) == 3
    os.kill(up.popen.pid, signal.SIGKILL)  # no handler runs: the kernel's parent-death signal must do it
    up.popen.wait(10)
    assert _wait_gone(list(up.pids.values()), 15) == [], "children outlived a SIGKILLed launcher"


def test_killed_worker_is_reported_and_restarted_while_the_cluster_serves(up_factory):
    up = up_factory("--prefill", "0", "--decode", "2")
    up.wait_ready()
    victim = up.pids["decode 0"]
    os.kill(victim, signal.SIGKILL)
    up.wait_for(rf"decode 0 \(127\.0\.0\.1:\d+, pid {victim}\) died: killed by signal SIGKILL; last log lines", 30)
    up.wait_for(r"restarting decode 0 in", 10)
    _generate_json(up.router)  # the other decode worker keeps the cluster serving meanwhile
    m = up.wait_for(r"decode 0 is back at (\S+) \(pid (\d+)\)", STARTUP_S)
    new_pid = int(m.group(2))
    assert new_pid != victim and _alive(new_pid)
    assert up.popen.poll() is None, "the launcher keeps running"
    up.pids["decode 0"] = new_pid
    for _ in range(3):
        _generate_json(up.router)
    os.kill(up.popen.pid, signal.SIGTERM)
    assert up.popen.wait(60) == 0
    assert _wait_gone(list(up.pids.values()), 10) == []


def test_no_restart_fails_fast(up_factory):
    up = up_factory("--prefill", "0", "--decode", "1", "--no-restart")
    up.wait_ready()
    os.kill(up.pids["decode 0"], signal.SIGKILL)
    assert up.popen.wait(60) == 1
    text = "".join(up.lines)
    assert "decode 0" in text and "killed by signal SIGKILL" in text and "--no-restart" in text
    assert _wait_gone(list(up.pids.values()), 10) == []


def test_api_keys_are_passed_to_the_router_and_enforced(up_factory, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"k-alice": "alice"}))
    up = up_factory("--prefill", "0", "--decode", "1", "--api-keys", str(keys))
    up.wait_ready()
    base = [sys.executable, "-m", "pdserve", "generate", "--router", up.router, "--max-tokens", "2", "--json", "hi"]
    env = {**os.environ, "PDSERVE_API_KEY": ""}
    refused = subprocess.run(base, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 1 and json.loads(refused.stdout)["error"] == "UNAUTHENTICATED", refused.stderr
    by_flag = subprocess.run([*base, "--api-key", "k-alice"], capture_output=True, text=True, timeout=120, env=env)
    by_env = subprocess.run(base, capture_output=True, text=True, timeout=120, env={**env, "PDSERVE_API_KEY": "k-alice"})
    for r in (by_flag, by_env):
        assert r.returncode == 0 and json.loads(r.stdout)["completion_tokens"] == 2, r.stderr
    os.kill(up.popen.pid, signal.SIGINT)
    assert up.popen.wait(60) == 0
    assert _wait_gone(list(up.pids.values()), 10) == []


def test_up_generate_answers_once_and_exits_0():
    r = subprocess.run([sys.executable, "-m", "pdserve", "up", "--port", "0", "--prefill", "0", "--decode", "1",
                        "--max-tokens", "4", "--generate", "Hello from pdserve"], capture_output=True, text=True,
                       timeout=STARTUP_S, env={**os.environ, "PDSERVE_API_KEY": ""})
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"\[4 tokens, finish length, TTFT \d+ ms", r.stderr), r.stderr
    assert re.search(r"router\s+127\.0\.0\.1:\d+\s+metrics http://127\.0\.0\.1:\d+/metrics", r.stdout), r.stdout
