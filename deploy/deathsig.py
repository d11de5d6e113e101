"""Children that die with their launcher, armed by the child itself.

A launcher that talks gRPC must not ``fork()`` with a ``preexec_fn``: gRPC's fork handlers restart its poller
in the forked child, ``close_fds`` then closes the poller's epoll fd, and the child can abort (SIGABRT,
"epoll_wait error: Bad file descriptor") before it reaches ``exec`` (grpc/grpc#43055; seen here in CI as a
worker "killed by signal SIGABRT" during startup). So the launcher spawns with no ``preexec_fn`` (CPython then
uses ``vfork``, which runs no fork handlers) and passes its pid in the environment; the child, first thing,
asks the kernel for SIGKILL when the launcher's spawning thread dies (PR_SET_PDEATHSIG) and then checks that
the launcher is still its parent, which closes the window in which it could have died unseen.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

from pdserve.engine import env as pdenv

PR_SET_PDEATHSIG = 1


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child that must die with this process (a copy, with this process's pid)."""
    return {**env, pdenv.PARENT_PID: str(os.getpid())}


def arm_from_env() -> bool:
    """In a child started with ``child_env``: die (SIGKILL) with the launcher. True if armed."""
    parent = pdenv.take_parent_pid()
    prctl = _load_prctl() if parent is not None else None
    if prctl is None:
        return False
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the launcher died before the kernel was asked: follow it now
        os.kill(os.getpid(), signal.SIGKILL)
    return True
