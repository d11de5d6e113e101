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
