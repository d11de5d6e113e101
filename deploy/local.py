"""Start a local cluster (router + N prefill + M decode) as separate processes on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Proc:
    role: str
    popen: subprocess.Popen
    address: str = ""
    kv_endpoint: str = ""
    metrics_port: int = 0
    lines: list[str] = field(default_factory=list)


def _spawn(role: str, args: list[str], env: dict[str, str], echo: bool) -> Proc:
    cmd = [sys.executable, "-u", "-m", "pdserve", role, *args]
    popen = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    return Proc(role, popen)


def _await_ready(proc: Proc, timeout_s: float, echo: bool) -> None:
    """Read the child's output until its PDSERVE_READY line; keep draining it in a thread afterwards."""
    deadline = time.monotonic() + timeout_s
    assert proc.popen.stdout is not None
    while time.monotonic() < deadline:
        line = proc.popen.stdout.readline()
        if not line:
            break
        proc.lines.append(line)
        if echo:
            sys.stderr.write(f"[{proc.role}] {line}")
        if line.startswith("PDSERVE_READY"):
            parts = line.split()
            proc.address = parts[2]
            for p in parts[3:]:
                if p.startswith("kv="):
                    proc.kv_endpoint = p[3:]
                elif p.startswith("metrics="):
                    proc.metrics_port = int(p[8:])

            def drain() -> None:
                for rest in proc.popen.stdout:  # type: ignore[union-attr]
                    proc.lines.append(rest)
                    del proc.lines[:-200]
                    if echo:
                        sys.stderr.write(f"[{proc.role}] {rest}")

            threading.Thread(target=drain, daemon=True).start()
            return
    tail = "".join(proc.lines[-30:])
    raise RuntimeError(f"{proc.role} worker did not become ready in {timeout_s:.0f}s:\n{tail}")


class LocalCluster:
    """Context manager. ``router_address`` is valid after ``start()``."""

    def __init__(
        self,
        num_prefill: int = 1,
        num_decode: int = 1,
        model: str = "tiny",
        device: str = "cpu",
        transfer: str = "tcp",
        policy: str = "cache_aware",
        extra_worker_args: list[str] | None = None,
        router_args: list[str] | None = None,
        echo: bool = False,
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 180.0,
    ):
        if num_decode < 1:
            raise ValueError("num_decode: a cluster needs at least one decode worker")
        if num_prefill < 0:
            raise ValueError("num_prefill: must be >= 0")
        self.num_prefill = num_prefill
        self.num_decode = num_decode
        self.model = model
        self.device = device
        self.transfer = transfer
        self.policy = policy
        self.extra = list(extra_worker_args or [])
        self.router_args = list(router_args or [])
        self.echo = echo
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout_s = ready_timeout_s
        self.procs: list[Proc] = []
        self.router_address = ""

    def worker_args(self) -> list[str]:
        return ["--model", self.model, "--device", self.device, "--transfer", self.transfer, *self.extra]

    def start(self) -> LocalCluster:
        try:
            workers = [_spawn("prefill", self.worker_args(), self.env, self.echo) for _ in range(self.num_prefill)]
            workers += [_spawn("decode", self.worker_args(), self.env, self.echo) for _ in range(self.num_decode)]
            self.procs += workers
            for p in workers:
                _await_ready(p, self.ready_timeout_s, self.echo)
            args = ["--model", self.model, "--policy", self.policy, *self.router_args]
            for p in workers:
                args += [f"--{p.role}", p.address]
            router = _spawn("router", args, self.env, self.echo)
            self.procs.append(router)
            _await_ready(router, self.ready_timeout_s, self.echo)
            self.router_address = router.address
        except BaseException:
            self.stop()
            raise
        return self

    def add_router(self, router_args: list[str] | None = None) -> Proc:
        """Start another router replica over the same workers (stateless routers share a pool)."""
        args = ["--model", self.model, "--policy", self.policy, *(router_args or self.router_args)]
        for p in self.procs:
            if p.role in ("prefill", "decode"):
                args += [f"--{p.role}", p.address]
        router = _spawn("router", args, self.env, self.echo)
        self.procs.append(router)
        _await_ready(router, self.ready_timeout_s, self.echo)
        return router

    def workers(self, role: str) -> list[Proc]:
        return [p for p in self.procs if p.role == role]

    def stop(self, grace_s: float = 10.0) -> None:
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not exit after SIGTERM; killing it", p.role)
                p.popen.kill()
                p.popen.wait(5)
            if p.popen.stdout is not None:
                p.popen.stdout.close()
        self.procs.clear()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
