"""The router's model catalog: base models (each with its tokenizer and worker pools), adapters, routes.

Every name ``GenerateRequest.model`` may hold resolves here to a ``Target``: the name that serves (a base model
or an adapter), its base model (whose prefill and decode pools serve it) and the adapter ("" for the base).
A route resolves to one of its targets first (router.routes). Empty means the default: the first base model.

Workers report the base model they serve (``WorkerLoad.served_model``) and their registered and resident
adapters; the catalog pools each worker under its base model, so a pair never mixes two models (their KV
layouts differ). A router given one model pools every worker under it whatever name it reports (the single-model
cluster of old). Adapters are whatever the pool's workers report, less those being or having been unloaded
through this router (``hidden``), so a request after an unload gets NOT_FOUND even before the next poll.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.engine.errors import RequestNotFoundError
from pdserve.router.membership import Membership, Worker
from pdserve.router.offload import Offload
from pdserve.router.routes import Route, parse_routes

BASE, ADAPTER, ROUTE = "base", "adapter", "route"

MAX_LISTED = 20  # names an error message lists before it stops


@dataclass(frozen=True, slots=True)
class Target:
    name: str  # what serves the request: a base model or an adapter (GenerateResponse.model)
    base: str  # the base model whose pools serve it
    lora: str = ""  # the adapter ("" : the base model)


@dataclass(frozen=True, slots=True)
class BaseModel:
    name: str
    path: str  # preset name, local directory or hub id (its tokenizer and chat template)
    parser: object  # router.request.RequestParser for this model's tokenizer
    token_texts: object  # router.token_text.TokenTexts


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One row of Admin.ListModels."""

    name: str
    kind: str  # BASE | ADAPTER | ROUTE
    base: str
    workers: tuple[Worker, ...] = ()
    state: str = ""  # "ready" | "loading" | "unloading" | "no workers" | "missing target"
    targets: tuple[tuple[str, int], ...] = ()


class ModelCatalog:
    def __init__(self, membership: Membership, bases: list[BaseModel], routes: tuple[Route, ...] = (),
                 seed: int | None = None):
        if not bases:
            raise ValueError("model: the router needs at least one base model")
        self.membership = membership
        self.bases = {b.name: b for b in bases}
        if len(self.bases) != len(bases):
            raise ValueError("model: a base model name is given twice")
        self.default = bases[0].name
        self.routes = {r.name: r for r in routes}
        for r in routes:
            if r.name in self.bases:
                raise ValueError(f"route: {r.name!r} is also a base model's name")
        self.hidden: set[str] = set()  # adapters unloaded (or unloading) through this router
        self.loading: set[str] = set()  # adapters being loaded through this router
        self.running: Counter[str] = Counter()  # adapter -> its requests resolved and not yet ended here
        self._rng = random.Random(seed)
        membership.model_of = self.base_of

    # ---- pools ------------------------------------------------------------------------------------
    def base_of(self, worker: Worker) -> str | None:
        """The base model ``worker`` is pooled under (None: a model this router has no tokenizer for)."""
        if len(self.bases) == 1:
            return self.default
        served = worker.load.served_model or self.default
        return served if served in self.bases else None

    def pool_workers(self, base: str, available_only: bool = False) -> list[Worker]:
        return [w for role in ("prefill", "decode") for w in self.membership.pool(role, available_only, model=base)]

    def adapters(self) -> dict[str, str]:
        """Servable adapters -> their base model: those the pools' workers report, less the hidden ones and those
        named like a base model or a route (a request for that name reaches the base model or the route, never the
        adapter, so it is not listed as a second entry under the same name)."""
        out: dict[str, str] = {}
        for w in self.membership.workers.values():
            if not w.load.adapters:
                continue
            base = self.base_of(w)
            if base is None:
                continue
            for name in w.load.adapters:
                if name not in self.hidden and not self._taken(name):
                    out.setdefault(name, base)
        return out

    def adapter_base(self, name: str) -> str | None:
        """The base model of servable adapter ``name`` (as ``adapters().get(name)``, without building the map:
        one pass over the workers, per request)."""
        if name in self.hidden:
            return None
        for w in self.membership.workers.values():
            if name in w.load.adapters:
                base = self.base_of(w)
                if base is not None:
                    return base
        return None

    # ---- resolution -------------------------------------------------------------------------------
    def resolve(self, name: str, session_id: str = "") -> Target:
        """The target serving a request for ``name``; RequestNotFoundError naming it when nothing serves it."""
        if not name:
            return Target(self.default, self.default)
        route = self.routes.get(name)
        if route is not None:
            try:  # the common case: the chosen target is served (one pass over the workers, no per-target check)
                return self._plain(route.choose(session_id, self._rng))
            except RequestNotFoundError:
                pass
            # it is not: choose among the served targets (weights renormalized; together with the first pick,
            # each served target still gets its weight's share, and a session keeps its target while it is served)
            chosen = route.choose(session_id, self._rng, served=self._served)
            if chosen is None:
                targets = ", ".join(m for m, _ in route.targets)
                raise RequestNotFoundError(f"model: route {name!r}: none of its targets ({targets}) is served here")
            return self._plain(chosen)
        return self._plain(name)

    def _taken(self, name: str) -> bool:
        """A base model's or a route's name: an adapter a worker reports under it is never reached by requests."""
        return name in self.bases or name in self.routes

    def _served(self, name: str) -> bool:
        return name in self.bases or self.adapter_base(name) is not None

    def begin(self, target: Target) -> None:
        """A request resolved to ``target`` starts (call with no await after ``resolve``: an unload that hides the
        adapter then waits for it, router.adapters)."""
        if target.lora:
            self.running[target.lora] += 1

    def end(self, target: Target) -> None:
        if target.lora:
            self.running[target.lora] -= 1
            if self.running[target.lora] <= 0:
                del self.running[target.lora]

    def _plain(self, name: str) -> Target:
        if name in self.bases:
            return Target(name, name)
        base = self.adapter_base(name)
        if base is not None:
            return Target(name, base, name)
        served = self.names()
        more = f", ... {len(served) - MAX_LISTED} more: Generation.Models lists them" if len(served) > MAX_LISTED else ""
        raise RequestNotFoundError(
            f"model: {name[:200]!r} is not served here (served: {', '.join(served[:MAX_LISTED])}{more})")

    def names(self) -> list[str]:
        """Every servable name: base models, adapters, routes."""
        return [*self.bases, *sorted(self.adapters()), *self.routes]

    # ---- listing ----------------------------------------------------------------------------------
    def entries(self) -> list[ModelEntry]:
        out = [self._base_entry(name) for name in self.bases]
        adapters = self.adapters()
        for name in sorted({*adapters, *self.hidden_reported()}):
            out.append(self._adapter_entry(name, adapters.get(name)))
        for route in self.routes.values():
            out.append(self._route_entry(route, adapters))
        return out

    def hidden_reported(self) -> set[str]:
        """Hidden adapters some worker still reports (an unload in progress)."""
        return {a for w in self.membership.workers.values() for a in w.load.adapters
                if a in self.hidden and not self._taken(a)}

    def _base_entry(self, name: str) -> ModelEntry:
        workers = self.pool_workers(name)
        ready = any(w.available for w in self.membership.pool("decode", model=name))
        return ModelEntry(name, BASE, name, tuple(workers), "ready" if ready else "no workers")

    def _adapter_entry(self, name: str, base: str | None) -> ModelEntry:
        if base is None:  # hidden, still reported somewhere
            holders = [w for w in self.membership.workers.values() if name in w.load.adapters]
            base = next((b for b in map(self.base_of, holders) if b is not None), "")
            return ModelEntry(name, ADAPTER, base, tuple(holders), "unloading")
        pool = self.pool_workers(base)
        holders = [w for w in pool if name in w.load.adapters]
        if not any(w.available and w.role == "decode" for w in holders):
            state = "no workers"
        elif name in self.loading or any(w.available and name not in w.load.adapters for w in pool):
            state = "loading"
        else:
            state = "ready"
        return ModelEntry(name, ADAPTER, base, tuple(holders), state)

    def _route_entry(self, route: Route, adapters: dict[str, str]) -> ModelEntry:
        bases = [t if t in self.bases else adapters.get(t) for t, _ in route.targets]
        state = "ready" if all(b is not None for b in bases) else "missing target"
        return ModelEntry(route.name, ROUTE, next((b for b in bases if b), ""), (), state, route.targets)


async def load_catalog(membership: Membership, models: tuple[tuple[str, str], ...], routes: tuple[str, ...] = (),
                       first: tuple[object, object] | None = None, generation_config: str = "auto") -> ModelCatalog:
    """The catalog of ``models`` ((name, path), the first the default) and ``routes`` (``NAME=MODEL:WEIGHT,...``):
    each model's tokenizer, chat template and (``generation_config`` "auto") sampling defaults loaded torch-free
    (``first``: the first model's tokenizer and template, already loaded)."""
    from pdserve.engine.models import resolve_tokenizer
    from pdserve.engine.tokenizer import load_light_tokenizer
    from pdserve.router.chat import ChatTemplate
    from pdserve.router.request import RequestParser
    from pdserve.router.sampling_defaults import load_defaults
    from pdserve.router.token_text import TokenTexts

    offload = Offload()  # one bounded lane for huge requests, whatever their model
    bases = []
    for i, (name, path) in enumerate(models):
        if i == 0 and first is not None:
            tokenizer, chat = first
        else:
            tok_path = resolve_tokenizer(path)
            tokenizer = await asyncio.to_thread(load_light_tokenizer, tok_path)
            chat = ChatTemplate.load(tok_path)
        defaults = load_defaults(resolve_tokenizer(path), name) if generation_config == "auto" else None
        parser = RequestParser(tokenizer, chat=chat, model=name, context_limit=membership_limit(membership, name),
                               offload=offload, match_model=False, defaults=defaults)
        bases.append(BaseModel(name, path, parser, TokenTexts(tokenizer)))
    return ModelCatalog(membership, bases, parse_routes(routes))


def membership_limit(membership: Membership, base: str) -> Callable[[], int]:
    """The context limit of ``base``'s pool, as the parser asks for it."""
    return lambda: membership.max_model_len(base)
