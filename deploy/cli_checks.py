"""CLI input checks: each bad input ends in one line naming the flag and exit status 2, never a traceback.

Everything here is torch-free except ``check_device``, which imports torch only for a non-CPU device and is
called only by commands that start workers.
"""

from __future__ import annotations

import argparse
import errno
import re
import socket
import sys
from pathlib import Path


class UsageError(Exception):
    """Bad command-line input. ``str()`` starts with the flag it is about; the CLI prints it and exits 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, unless the help text already says what it is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or "%(default)" in text:
            return text
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and whose help shows every default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message}\n")


def port(text: str) -> int:
    """argparse type: a TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {value}")
    return value


def metrics_port(text: str) -> int:
    """argparse type: a metrics port, -1 (any free port), 0 (off) or 1-65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected -1, 0 or a port number 1-65535, got {text!r}") from None
    if not -1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be -1 (any free port), 0 (off) or 1-65535, got {value}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative_seconds(text: str) -> float:
    """argparse type: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


def check_port_free(flag: str, host: str, number: int) -> None:
    """Bind ``host:number`` and let go, so a busy port fails before anything starts. 0 and -1 pick a free port.

    SO_REUSEADDR lets a port whose last owner just died (TIME_WAIT) through, as the servers would; a socket
    still listening there (even with SO_REUSEPORT, as gRPC sets) still fails the bind."""
    if number <= 0:
        return
    bind_host = "" if host in ("0.0.0.0", "::") else host
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind_host, number))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(f"{flag}: port {number} on {host} is already in use") from None
            raise UsageError(f"{flag}: cannot bind {host}:{number}: {e.strerror or e}") from None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; a wildcard (0.0.0.0, ::) or any other address is reachable from outside."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_cluster_secret(role: str, host: str, secret: str | None) -> bool:
    """A worker or router on a non-loopback address without PDSERVE_CLUSTER_SECRET would take internal calls
    (Decode, Reserve, Release, Register ...) and KV handshakes from anyone who can reach it: refuse to start.
    On loopback that is the development mode; returns False then (the caller warns)."""
    if secret:
        return True
    if not is_loopback(host):
        exposed = ("take worker registrations (Admin.Register) from anyone who can reach it" if role == "router"
                   else "serve its internal RPCs and KV port to anyone who can reach it")
        raise UsageError(f"--host {host}: PDSERVE_CLUSTER_SECRET is not set, so this {role} would {exposed}; set it "
                         "to the same random value in every process of the cluster (e.g. openssl rand -hex 32), or "
                         "bind 127.0.0.1")
    return False


def check_device(device: str, flag: str = "--device") -> None:
    """A device that is not there fails here, in one line. ``cpu`` never imports torch."""
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return
    if kind != "cuda" or (index and not index.isdigit()):
        raise UsageError(f"{flag}: expected cpu, cuda or cuda:N, got {device!r}")
    try:
        import torch
    except ImportError:
        raise UsageError(f"{flag}: {device} needs torch, which is not installed") from None
    if not torch.cuda.is_available():
        raise UsageError(f"{flag}: {device} requested but CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise UsageError(f"{flag}: {device} requested but this machine has {count} CUDA device(s)")


def check_model(model: str, flag: str = "--model") -> None:
    """A preset name, an existing HF directory, or a hub id (``org/name``). A path that is not there fails
    at once, before any process starts (same rules as engine.models.resolve_model, without building)."""
    from pdserve.engine.models import PRESETS

    if model in PRESETS:
        return
    if not model:
        raise UsageError(f"{flag}: empty model name; presets: {', '.join(PRESETS)}")
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UsageError(f"{flag}: {model!r} is a directory without config.json")
        return
    if model.startswith(("/", ".", "~")) or model.count("/") > 1 or model.endswith("/"):
        raise UsageError(f"{flag}: no such model directory {model!r} (presets: {', '.join(PRESETS)})")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model):
        raise UsageError(f"{flag}: {model!r} is not a preset, a model directory or a hub id (org/name); "
                         f"presets: {', '.join(PRESETS)}")


def check_adapter_dir(path: str, flag: str = "--lora") -> None:
    """A PEFT adapter directory (adapter_config.json in it), checked before any process starts; its contents
    are checked when a worker loads it."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UsageError(f"{flag}: no such adapter directory {path!r}")
    if not (root / "adapter_config.json").is_file():
        raise UsageError(f"{flag}: {path!r} is not a PEFT adapter directory (no adapter_config.json)")


def fail(prog: str, message: str, status: int = 2) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status
