"""deploy.deathsig: a launcher's children arm their own parent-death signal, so the launcher (a gRPC process)
spawns them without a preexec_fn, i.e. without fork handlers (vfork)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pdserve.deploy import deathsig, local

ARM = "from pdserve.deploy import deathsig; import os; a = deathsig.arm_from_env(); print(a, os.environ.get('{}'))"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")


def _run(env: dict[str, str]) -> subprocess.CompletedProcess:
    code = ARM.format(deathsig.pdenv.PARENT_PID)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_a_child_of_a_live_launcher_arms_and_keeps_the_pid_from_its_own_children():
    done = _run(deathsig.child_env(dict(os.environ)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "None"]


def test_a_child_whose_launcher_is_already_gone_dies_at_once():
    env = dict(os.environ, **{deathsig.pdenv.PARENT_PID: "1"})  # pid 1 is not this child's parent
    done = _run(env)
    assert done.returncode == -signal.SIGKILL and done.stdout == ""


def test_without_a_launcher_nothing_is_armed():
    env = {k: v for k, v in os.environ.items() if k != deathsig.pdenv.PARENT_PID}
    assert _run(env).stdout.split() == ["False", "None"]
    assert _run(dict(env, **{deathsig.pdenv.PARENT_PID: "not-a-pid"})).stdout.split() == ["False", "None"]


def test_the_local_cluster_spawns_with_no_preexec_fn_and_its_pid(monkeypatch):
    seen = {}

    class FakePopen:
        def __init__(self, cmd, **kwargs):
            seen.update(kwargs)
            self.stdout = iter(())
            self.pid = 0

    monkeypatch.setattr(local.subprocess, "Popen", FakePopen)
    proc = local._spawn("decode", [], {"X": "1"}, echo=False)
    proc.reader.join(5)
    assert seen.get("preexec_fn") is None and seen["start_new_session"] is True
    assert seen["env"][deathsig.pdenv.PARENT_PID] == str(os.getpid()) and seen["env"]["X"] == "1"
