"""Run the router: membership, KV-event index, Generation and Admin services, until SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.engine.models import DEFAULT_MODEL, resolve_tokenizer
from pdserve.engine.tokenizer import load_light_tokenizer
from pdserve.router.admin import AdminServicer
from pdserve.router.admission import Admission
from pdserve.router.auth import ApiKeyInterceptor
from pdserve.router.batch_service import BatchServicer, default_db_path
from pdserve.router.chat import ChatTemplate
from pdserve.router.edge import follow
from pdserve.router.membership import Membership, Worker
from pdserve.router.models import load_catalog
from pdserve.router.policy import PairPolicy
from pdserve.router.prefix_index import PrefixIndex
from pdserve.router.request import MAX_MESSAGE_BYTES
from pdserve.router.response_cache import CacheConfig, ResponseCache
from pdserve.router.sampling_defaults import MODES
from pdserve.router.semantic_cache import SemanticConfig, SemanticIndex
from pdserve.router.service import GenerationServicer
from pdserve.serving.cluster_auth import REGISTER, ClusterAuthInterceptor, ClusterCredential, method_name
from pdserve.serving.observability import serve_metrics
from pdserve.serving.rpc import TlsConfig, add_public_servicer, create_server, install_sigterm, set_serving

logger = logging.getLogger(__name__)
SERVICES = ["Generation", "Admin", "Batch"]


@dataclass(frozen=True, slots=True)
class RouterConfig:
    model: str = DEFAULT_MODEL
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    addr: str = "127.0.0.1:0"
    policy: str = "cache_aware"
    local_prefill_tokens: int = 0
    saturation_s: float = 0.0
    shed_ttft_s: float = 0.0
    tenant_rates: dict = field(default_factory=dict)
    default_rate: tuple[float, float] | None = None
    max_retries: int = 3
    poll_interval_s: float = 0.5
    metrics_port: int = 0
    tls: TlsConfig | None = None
    api_keys: dict = field(default_factory=dict)
    dns: tuple[tuple[str, str], ...] = ()  # (role, "host:port") headless-Service discovery
    response_cache: CacheConfig = field(default_factory=CacheConfig)  # max_bytes 0: off (router.response_cache)
    semantic_cache: SemanticConfig = field(default_factory=SemanticConfig)  # threshold 0: off
    batch_db: str = ""  # SQLite file of batch jobs ("": batch.sqlite3 in the cache dir; router.batch_service)
    batch_concurrency: int = 8  # batch requests in flight at most (fewer while interactive load is high)
    cluster_secret: str | None = None  # tokens on every call to workers; Register needs one (serving.cluster_auth)
    # several base models (router.models): (name, path) each, the first the default; empty: ``model`` alone.
    # ``model`` is then the default's path (its tokenizer also serves the response cache and the batch service)
    models: tuple[tuple[str, str], ...] = ()
    routes: tuple[str, ...] = ()  # traffic splits, "NAME=MODEL:WEIGHT,..." (router.routes)
    drain_timeout_s: float = 5.0  # after SIGTERM: how long in-flight streams may go on (new calls are refused)
    generation_config: str = "auto"  # "auto": each model's generation_config.json fills unset sampling fields

    def __post_init__(self) -> None:
        if self.generation_config not in MODES:
            raise ValueError(f"generation_config: must be one of {', '.join(MODES)}, got {self.generation_config!r}")
        if self.local_prefill_tokens < 0:
            raise ValueError("local_prefill_tokens: must be >= 0")
        if self.shed_ttft_s < 0 or self.saturation_s < 0:
            raise ValueError("shed_ttft_s / saturation_s: must be >= 0")
        if self.max_retries < 0:
            raise ValueError("max_retries: must be >= 0")
        if not 0 <= self.drain_timeout_s < float("inf"):
            raise ValueError("drain_timeout_s: must be a finite number >= 0")


def load_worker_config(path: str | None, prefill: list[str], decode: list[str]) -> tuple[list[str], list[str]]:
    """Workers from flags plus an optional JSON file {"prefill": [...], "decode": [...]}."""
    if path:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"config: cannot read worker list {path!r}: {e}") from None
        prefill = [*prefill, *data.get("prefill", [])]
        decode = [*decode, *data.get("decode", [])]
    return prefill, decode


class IndexFeeds:
    """One KV-event subscription per worker, started and stopped with membership."""

    def __init__(self, index: PrefixIndex, credential: ClusterCredential | None = None):
        self.index = index
        self.credential = credential
        self.stop = asyncio.Event()
        self.tasks: dict[str, asyncio.Task] = {}

    def on_change(self, worker: Worker, added: bool) -> None:
        if added:
            cred, method = self.credential, method_name(worker.role.capitalize(), "KVEvents")
            self.tasks[worker.address] = asyncio.ensure_future(
                follow(self.index, worker.address, worker.stub, self.stop,
                       metadata=lambda: cred.metadata(method) if cred is not None else None)
            )
        else:
            task = self.tasks.pop(worker.address, None)
            if task:
                task.cancel()
            self.index.remove_worker(worker.address)

    def close(self) -> None:
        self.stop.set()
        for t in self.tasks.values():
            t.cancel()


async def _semantic_index(cfg: SemanticConfig, catalog) -> SemanticIndex | None:
    if not cfg.enabled:
        return None
    from pdserve.router.embedder import SentenceEmbedder

    embedder = await asyncio.to_thread(SentenceEmbedder, cfg.model_dir or None)

    def text_of(req) -> str:  # the prompt as its own base model's tokenizer reads it (chat template included)
        base = catalog.bases[req.base_model or catalog.default]
        return base.parser.tokenizer.decode(list(req.token_ids))

    return SemanticIndex(cfg, embedder, text_of)


async def serve(cfg: RouterConfig, ready: asyncio.Future | None = None, stop: asyncio.Event | None = None) -> None:
    path = resolve_tokenizer(cfg.model)
    tokenizer = await asyncio.to_thread(load_light_tokenizer, path)
    chat = ChatTemplate.load(path)  # None: the model has no chat template (GenerateRequest.messages refused)
    credential = ClusterCredential(cfg.cluster_secret, f"router-{uuid.uuid4().hex[:6]}") if cfg.cluster_secret else None
    index = PrefixIndex()
    feeds = IndexFeeds(index, credential)
    membership = Membership(poll_interval_s=cfg.poll_interval_s, on_change=feeds.on_change, tls=cfg.tls,
                            dns=list(cfg.dns), credential=credential)
    for a in cfg.prefill:
        membership.add(a, "prefill", static=True)
    for a in cfg.decode:
        membership.add(a, "decode", static=True)
    await membership.discover()
    await membership.poll_once()
    membership.start()
    interceptors = []
    if credential is not None:  # workers register with their cluster credential, not an API key
        interceptors.append(ClusterAuthInterceptor(credential, prefixes=(), methods=(REGISTER,)))
    if cfg.api_keys:
        interceptors.append(ApiKeyInterceptor(cfg.api_keys, exempt=(REGISTER,) if credential is not None else ()))
    server, port, health = create_server(cfg.addr, SERVICES, cfg.tls, interceptors, max_receive_bytes=MAX_MESSAGE_BYTES)
    catalog = await load_catalog(membership, cfg.models or ((cfg.model, cfg.model),), cfg.routes, (tokenizer, chat),
                                 cfg.generation_config)
    policy = PairPolicy(cfg.policy, index, local_prefill_tokens=cfg.local_prefill_tokens, saturation_s=cfg.saturation_s)
    admission = Admission(cfg.tenant_rates, cfg.default_rate, cfg.shed_ttft_s, retry_after_s=max(0.1, cfg.poll_interval_s))
    response_cache = None
    if cfg.response_cache.max_bytes:
        response_cache = ResponseCache(cfg.response_cache, catalog.default,
                                       semantic=await _semantic_index(cfg.semantic_cache, catalog))
    generation = GenerationServicer(membership, policy, tokenizer, admission, max_retries=cfg.max_retries,
                                    chat=chat, model=cfg.model, catalog=catalog, response_cache=response_cache)
    add_public_servicer(server, generation, "Generation")
    # Admin too goes through generic handlers: besides the never-failing deserializers, every method
    # registered with the server is one more future its accept loop waits on for every incoming RPC.
    admin = AdminServicer(membership, index, generation)
    admin.adapters.start()  # loads through the API, by any router, reach workers that join later
    add_public_servicer(server, admin, "Admin")
    batch = BatchServicer(cfg.batch_db or default_db_path(), generation.respond, membership, cfg.batch_concurrency)
    await batch.start()
    add_public_servicer(server, batch, "Batch")
    bound_metrics = serve_metrics(cfg.metrics_port, cfg.addr.rsplit(":", 1)[0])
    await server.start()
    # Startup left ~400k long-lived objects (tokenizer, transformers, torch); a full collection walks all of
    # them (~100 ms on a small CPU) and would stall every in-flight request. Freeze them out of the GC.
    gc.collect()
    gc.freeze()
    await set_serving(health, SERVICES, True)
    address = f"{cfg.addr.rsplit(':', 1)[0]}:{port}"
    print(f"PDSERVE_READY router {address} metrics={bound_metrics}", flush=True)
    logger.info("router on %s: %d prefill, %d decode, policy %s", address, len(cfg.prefill), len(cfg.decode), cfg.policy)
    if ready is not None:
        ready.set_result(address)
    stop = stop or asyncio.Event()
    install_sigterm(stop)
    await stop.wait()
    await set_serving(health, SERVICES, False)
    await server.stop(cfg.drain_timeout_s)
    await batch.close()  # unfinished batch requests stay pending in the database: the next start resumes them
    admin.adapters.close()
    feeds.close()
    await membership.close()
