"""Supervise a LocalCluster's children: report a death (who, why, last log lines) and restart it with backoff.

``Supervisor.poll()`` is called from the thread that owns the cluster (restarts fork there, see local.py).
It never blocks on a restarting child: a child being restarted is checked for readiness on later polls while
the rest keep serving. A child restarts on its old address and metrics port, so routers find it where it was.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from pdserve.deploy.local import LocalCluster, Proc, kill_group, respawn, startup_failure


class ClusterFailed(RuntimeError):
    """A child died and restarts are off (``--no-restart``)."""


@dataclass(slots=True)
class Backoff:
    """Exponential restart delay: initial_s, 2x, 4x ... up to max_s; forgiven after ``healthy_s`` of uptime."""

    initial_s: float = 1.0
    max_s: float = 30.0
    healthy_s: float = 60.0
    failures: int = 0

    def next_delay(self, uptime_s: float) -> float:
        if uptime_s >= self.healthy_s:
            self.failures = 0
        delay = min(self.max_s, self.initial_s * 2 ** self.failures)
        self.failures += 1
        return delay


@dataclass(slots=True)
class _Watch:
    proc: Proc
    name: str
    backoff: Backoff
    state: str = "running"  # running | waiting | starting
    restart_at: float = 0.0
    ready_by: float = 0.0


class Supervisor:
    def __init__(self, cluster: LocalCluster, restart: bool = True, out: TextIO | None = None,
                 backoff: Backoff | None = None, num_log_lines: int = 10):
        self.cluster = cluster
        self.restart = restart
        self.out = out or sys.stderr
        self.num_log_lines = num_log_lines
        proto = backoff or Backoff()
        counts: dict[str, int] = {}
        self.watches: list[_Watch] = []
        for p in cluster.procs:
            i = counts[p.role] = counts.get(p.role, -1) + 1
            name = p.role if p.role in ("router", "gateway") and i == 0 else f"{p.role} {i}"
            self.watches.append(_Watch(p, name, Backoff(proto.initial_s, proto.max_s, proto.healthy_s)))

    def _say(self, text: str) -> None:
        self.out.write(f"pdserve up: {text}\n")
        self.out.flush()

    def _report_death(self, w: _Watch, what: str) -> None:
        p = w.proc
        self._say(f"{w.name} ({p.address or 'not ready'}, pid {p.pid}) {what}: {p.exit_reason()}; "
                  f"last log lines:")
        for line in p.tail(self.num_log_lines) or ["(no output)"]:
            self.out.write(f"    | {line}\n")
        self.out.flush()

    def _schedule(self, w: _Watch, now: float) -> None:
        delay = w.backoff.next_delay(now - w.proc.started_at)
        w.state, w.restart_at = "waiting", now + delay
        self._say(f"restarting {w.name} in {delay:.1f}s (restart {w.proc.restarts + 1}); the rest keep serving")

    def poll(self) -> None:
        """Check every child once; raise ClusterFailed when one died and restarts are off."""
        now = time.monotonic()
        for w in self.watches:
            p = w.proc
            if w.state == "running" and p.popen.poll() is not None:
                self._report_death(w, "died")
                if not self.restart:
                    raise ClusterFailed(f"{w.name} died ({p.exit_reason()}) and --no-restart is set")
                self._schedule(w, now)
            elif w.state == "waiting" and now >= w.restart_at:
                respawn(p, self.cluster.env, self.cluster.echo)
                w.state, w.ready_by = "starting", now + self.cluster.ready_timeout_s
            elif w.state == "starting":
                if p.ready.is_set():
                    w.state = "running"
                    self._say(f"{w.name} is back at {p.address} (pid {p.pid})")
                elif startup_failure(p):
                    self._report_death(w, "failed to restart")
                    self._schedule(w, now)
                elif now > w.ready_by:
                    kill_group(p, signal.SIGKILL)
                    p.popen.wait(5)
                    self._report_death(w, f"was not ready within {self.cluster.ready_timeout_s:.0f}s")
                    self._schedule(w, now)

    def run(self, interval_s: float = 0.2, stop_check=lambda: None) -> None:
        """Poll until ClusterFailed, or whatever ``stop_check`` raises (cli_up.StopSignals: a stop signal)."""
        while True:
            stop_check()
            self.poll()
            time.sleep(interval_s)
