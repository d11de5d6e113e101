"""A real router process loads no torch (checked in its memory map, not by import tracing)."""

from __future__ import annotations

import os
import sys

from pdserve.bench.router_footprint import UNREACHABLE, measure


def test_router_process_loads_no_torch():
    r = measure([sys.executable, "-m", "pdserve", "router", "--port", "0", *UNREACHABLE], dict(os.environ))
    assert r["torch_loaded"] is False
    assert r["rss_mib"] > 0
