"""The one module that reads environment variables."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where locally built checkpoints (tiny, presets) are written."""
    base = os.environ.get("PDSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pdserve"
    )
    return Path(base)


def ucx_tls() -> str:
    """UCX transports. The defaults hang on some hosts, so always set them explicitly."""
    return os.environ.get("PDSERVE_UCX_TLS") or os.environ.get("UCX_TLS") or "tcp,self"


CLUSTER_SECRET = "PDSERVE_CLUSTER_SECRET"


def cluster_secret() -> str | None:
    """Shared secret authenticating every internal RPC (pdserve.serving.cluster_auth) and KV-transfer handshake
    (None: no auth, development on loopback only)."""
    return os.environ.get(CLUSTER_SECRET) or None


def log_level() -> str:
    return os.environ.get("PDSERVE_LOG_LEVEL", "INFO").upper()


def api_key() -> str:
    """The API key clients (pdserve generate / bench) send to the router."""
    return os.environ.get("PDSERVE_API_KEY", "")


PARENT_PID = "PDSERVE_PARENT_PID"


def take_parent_pid() -> int | None:
    """The launcher's pid a child was started by (deploy.deathsig), removed so the child's own children do not
    inherit it; None when not started by a pdserve launcher or when the value is not a pid."""
    value = os.environ.pop(PARENT_PID, "")
    return int(value) if value.isdigit() else None
