"""Start a local cluster (router + N prefill + M decode) as separate processes on 127.0.0.1.

Every child runs in its own process group (killed as a group on stop) and, on Linux, asks the kernel to
SIGKILL it when the launcher dies (PR_SET_PDEATHSIG, armed by the child: deploy.deathsig), so not even
``kill -9`` of the launcher leaves workers holding their ports. The death signal fires when the *thread* that
spawned the child exits, so children are spawned from the thread that owns the cluster (the main thread in
``pdserve up``), never from a helper thread.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from pdserve.deploy import deathsig
from pdserve.engine import env as pdenv

logger = logging.getLogger(__name__)

NUM_LOG_LINES = 200  # tail of each child's output kept for error reports


class StartupError(RuntimeError):
    """A child exited or stayed silent before it printed its PDSERVE_READY line."""


@dataclass(slots=True)
class Proc:
    role: str
    popen: subprocess.Popen
    address: str = ""
    kv_endpoint: str = ""
    metrics_port: int = 0
    lines: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)  # the command-line flags after ``pdserve <role>``
    ready: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, n: int = 10) -> list[str]:
        return [line.rstrip("\n") for line in self.lines[-n:]]

    def exit_reason(self) -> str:
        """``exit code N`` or ``killed by signal SIGKILL``; empty while running."""
        rc = self.popen.poll()
        if rc is None:
            return ""
        if rc < 0:
            try:
                return f"killed by signal {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exit code {rc}"


def _read_output(proc: Proc, popen: subprocess.Popen, echo: bool) -> None:
    """Keep the tail of the child's output; parse its PDSERVE_READY line."""
    assert popen.stdout is not None
    for line in popen.stdout:
        proc.lines.append(line)
        if len(proc.lines) > NUM_LOG_LINES:
            del proc.lines[:-NUM_LOG_LINES]
        if echo:
            sys.stderr.write(f"[{proc.role}] {line}")
        if not proc.ready.is_set() and line.startswith("PDSERVE_READY"):
            parts = line.split()
            proc.address = parts[2]
            for p in parts[3:]:
                if p.startswith("kv="):
                    proc.kv_endpoint = p[3:]
                elif p.startswith("metrics="):
                    proc.metrics_port = int(p[8:])
            proc.ready.set()


def _launch(proc: Proc, env: dict[str, str], echo: bool, extra: list[str] = ()) -> None:
    cmd = [sys.executable, "-u", "-m", "pdserve", proc.role, *proc.args, *extra]
    proc.popen = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=deathsig.child_env(env),
        start_new_session=True,  # no preexec_fn: see deploy.deathsig
    )
    proc.ready = threading.Event()
    proc.started_at = time.monotonic()
    proc.reader = threading.Thread(target=_read_output, args=(proc, proc.popen, echo), daemon=True,
                                   name=f"pdserve-{proc.role}-output")
    proc.reader.start()


def _spawn(role: str, args: list[str], env: dict[str, str], echo: bool) -> Proc:
    proc = Proc(role, None, args=list(args))  # type: ignore[arg-type]
    _launch(proc, env, echo)
    return proc


def respawn(proc: Proc, env: dict[str, str], echo: bool) -> None:
    """Start a dead child again on the address (and metrics port) it had, so routers find it where it was."""
    extra = []
    if proc.address:
        extra += ["--port", proc.address.rsplit(":", 1)[1]]
    if proc.metrics_port > 0:
        extra += ["--metrics-port", str(proc.metrics_port)]
    close_output(proc)
    proc.lines = []
    proc.restarts += 1
    _launch(proc, env, echo, extra)


def startup_failure(proc: Proc) -> str | None:
    """Why a child that is not ready yet will never be (it exited); None while it may still come up."""
    if proc.ready.is_set() or proc.popen.poll() is None:
        return None
    if proc.reader is not None:
        proc.reader.join(2.0)  # let the last lines arrive
    if proc.ready.is_set():
        return None
    return proc.exit_reason()


def _await_ready(proc: Proc, timeout_s: float, echo: bool = False, stop_check=lambda: None) -> None:
    """Wait for the child's PDSERVE_READY line; fail as soon as it exits (or ``stop_check`` raises)."""
    deadline = time.monotonic() + timeout_s
    while not proc.ready.wait(0.05):
        stop_check()
        reason = startup_failure(proc)
        if reason:
            tail = "\n".join(proc.tail(30))
            raise StartupError(f"{proc.role} exited during startup ({reason}):\n{tail}")
        if time.monotonic() > deadline:
            tail = "\n".join(proc.tail(30))
            raise StartupError(f"{proc.role} did not become ready in {timeout_s:.0f}s:\n{tail}")


def kill_group(proc: Proc, sig: int) -> None:
    """Signal the child's whole process group (it leads its own session)."""
    try:
        os.killpg(proc.popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def close_output(proc: Proc) -> None:
    if proc.popen.stdout is not None and proc.popen.poll() is not None:
        if proc.reader is not None:
            proc.reader.join(2.0)
        try:
            proc.popen.stdout.close()
        except OSError:
            pass


def stop_procs(procs: list[Proc], grace_s: float) -> None:
    """SIGTERM every process group, wait up to ``grace_s``, then SIGKILL what is left."""
    for p in reversed(procs):
        if p.popen.poll() is None:
            kill_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) did not exit after SIGTERM; killing it", p.role, p.popen.pid)
            kill_group(p, signal.SIGKILL)
            p.popen.wait(5)
        kill_group(p, signal.SIGKILL)  # anything the child left in its group
        close_output(p)


class LocalCluster:
    """Context manager. ``router_address`` is valid after ``start()``.

    ``host`` is where every process binds; ``router_port`` 0 picks a free port. ``procs`` keeps one ``Proc``
    per child in start order (workers, then routers, then the gateway); a supervisor restarts a child in place
    (``respawn``). With ``http_port`` (0: any free port) an OpenAI-compatible gateway fronts the first router
    (``gateway_args``: more of its flags, e.g. TLS to the router); ``gateway_url`` is its base URL.

    ``pools`` (``deploy.cli_models.ModelPool`` each) runs several base models, each with its own prefill and decode
    workers (and adapters loaded at start), and names them all to the router; then ``num_prefill``, ``num_decode``
    and ``model`` are unused."""

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
        host: str = "127.0.0.1",
        router_port: int = 0,
        http_port: int | None = None,
        gateway_args: list[str] | None = None,
        pools: list | None = None,
        max_loras: int = 4,
        enable_lora: bool = False,
        stop_check=lambda: None,
    ):
        self.stop_check = stop_check  # raises to abandon startup (pdserve up: a stop signal arrived)
        self.pools = list(pools or [])
        self.max_loras = max_loras
        self.enable_lora = enable_lora  # pools' workers accept adapters at run time
        if self.pools:
            model, num_prefill, num_decode = self.pools[0].path, 0, 1
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
        if not self.env.get(pdenv.CLUSTER_SECRET):  # secure by default: a random secret per cluster, to every child
            self.env[pdenv.CLUSTER_SECRET] = secrets.token_hex(32)
        self.secret = self.env[pdenv.CLUSTER_SECRET]  # what a tool needs to call the workers (ClusterCredential)
        self.ready_timeout_s = ready_timeout_s
        self.host = host
        self.router_port = router_port
        self.http_port = http_port
        self.gateway_args = list(gateway_args or [])
        self.procs: list[Proc] = []
        self.router_address = ""
        self.gateway_url = ""

    def worker_args(self, pool=None) -> list[str]:
        from pdserve.deploy.cli_models import pool_worker_args

        model = pool_worker_args(pool, self.max_loras, self.enable_lora) if pool is not None else ["--model", self.model]
        return [*model, "--device", self.device, "--transfer", self.transfer, "--host", self.host, *self.extra]

    def _worker_specs(self) -> list[tuple[str, list[str]]]:
        """(role, flags) of every worker, prefill first."""
        if not self.pools:
            return [("prefill", self.worker_args())] * self.num_prefill + [("decode", self.worker_args())] * self.num_decode
        specs = [("prefill", self.worker_args(p)) for p in self.pools for _ in range(p.num_prefill)]
        return specs + [("decode", self.worker_args(p)) for p in self.pools for _ in range(p.num_decode)]

    def _router_cmd(self, router_args: list[str], port: int) -> list[str]:
        from pdserve.deploy.cli_models import router_model_args

        models = router_model_args(self.pools, []) if self.pools else ["--model", self.model]
        args = [*models, "--policy", self.policy, "--host", self.host, "--port", str(port), *router_args]
        for p in self.procs:
            if p.role in ("prefill", "decode"):
                args += [f"--{p.role}", p.address]
        return args

    def start(self) -> LocalCluster:
        try:
            workers = [_spawn(role, args, self.env, self.echo) for role, args in self._worker_specs()]
            self.procs += workers
            for p in workers:
                _await_ready(p, self.ready_timeout_s, self.echo, self.stop_check)
            router = _spawn("router", self._router_cmd(self.router_args, self.router_port), self.env, self.echo)
            self.procs.append(router)
            _await_ready(router, self.ready_timeout_s, self.echo, self.stop_check)
            self.router_address = router.address
            if self.http_port is not None:
                self.gateway_url = self._start_gateway()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_gateway(self) -> str:
        args = ["--router", self.router_address, "--host", self.host, "--port", str(self.http_port),
                *self.gateway_args]
        gateway = _spawn("gateway", args, self.env, self.echo)
        self.procs.append(gateway)
        _await_ready(gateway, self.ready_timeout_s, self.echo, self.stop_check)
        line = next((x for x in gateway.lines if x.startswith("PDSERVE_READY")), "")
        return next((p[4:] for p in line.split() if p.startswith("url=")), f"http://{gateway.address}/v1")

    def add_router(self, router_args: list[str] | None = None) -> Proc:
        """Start another router replica over the same workers (stateless routers share a pool)."""
        args = self._router_cmd(router_args or self.router_args, 0)
        router = _spawn("router", args, self.env, self.echo)
        self.procs.append(router)
        _await_ready(router, self.ready_timeout_s, self.echo, self.stop_check)
        return router

    def workers(self, role: str) -> list[Proc]:
        return [p for p in self.procs if p.role == role]

    def stop(self, grace_s: float = 10.0) -> None:
        stop_procs(self.procs, grace_s)
        self.procs.clear()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
