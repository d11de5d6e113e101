"""CLI flags for request classes (issue 18): the router's response cache and batch jobs, the workers' aging.

Torch-free: ``pdserve router`` imports this.
"""

from __future__ import annotations

import argparse

from pdserve.deploy import cli_checks as checks


def _float(text: str, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (0 <= value if allow_zero else 0 < value) or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be {'>=' if allow_zero else '>'} 0 and finite, got {text}")
    return value


def _positive_float(text: str) -> float:
    return _float(text, allow_zero=False)


def _non_negative_float(text: str) -> float:
    return _float(text, allow_zero=True)


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--priority-aging-s", type=_non_negative_float, default=30.0,
                   help="seconds of waiting worth one priority level (bounds starvation; 0: strict priority)")


def add_router_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("request classes: response cache, batch jobs")
    g.add_argument("--response-cache-mib", type=checks.non_negative_int, default=0,
                   help="cache whole answers to deterministic requests (greedy or seeded) in this many MiB "
                        "(0: off; router.response_cache)")
    g.add_argument("--response-cache-ttl-s", type=_positive_float, default=300.0,
                   help="seconds a cached answer stays valid")
    g.add_argument("--cache-shared-tenants", action="append", default=[], metavar="TENANT[,TENANT...]",
                   help="tenants that share one response-cache scope (others are isolated; repeatable)")
    g.add_argument("--batch-db", default="", metavar="PATH",
                   help="SQLite file holding batch jobs and their results (default: batch.sqlite3 in the cache dir, "
                        "$PDSERVE_CACHE_DIR or ~/.cache/pdserve)")
    g.add_argument("--batch-concurrency", type=checks.positive_int, default=8,
                   help="batch requests in flight at most (fewer while interactive load fills the decode pool)")


def router_kwargs(a: argparse.Namespace) -> dict:
    """RouterConfig fields from the flags above."""
    from pdserve.router.response_cache import CacheConfig

    shared = frozenset(t.strip() for spec in a.cache_shared_tenants for t in spec.split(",") if t.strip())
    cache = CacheConfig(max_bytes=a.response_cache_mib * 1024 * 1024, ttl_s=a.response_cache_ttl_s,
                        shared_tenants=shared)
    return {"response_cache": cache, "batch_db": a.batch_db, "batch_concurrency": a.batch_concurrency}
