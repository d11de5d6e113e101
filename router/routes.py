"""Traffic splits: a route name maps to weighted targets (``--route chat=base:90,base-lora-v2:10``).

A request naming a route is served by one target: chosen by weight, at random; with a ``session_id``, by a
stable hash of (route, session id) into the weight range, so one session always lands on the same target
(sticky) while sessions overall split by the weights. Targets are base models or adapters, never routes. A target
nothing serves at the moment (an adapter not loaded yet, or unloaded) is skipped: the others share its requests by
their weights, and the route is NOT_FOUND only when none of its targets is served.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate

from pdserve.serving.model_names import check_name, check_unique

MAX_WEIGHT = 1_000_000


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    targets: tuple[tuple[str, int], ...]  # (model, weight), weights > 0
    _bounds: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        check_name(self.name, "route")
        if not self.targets:
            raise ValueError(f"route: {self.name!r} has no targets")
        for model, weight in self.targets:
            check_name(model, f"route {self.name!r}")
            if not 0 < weight <= MAX_WEIGHT:
                raise ValueError(f"route: {self.name!r}: weight of {model!r} must be in 1..{MAX_WEIGHT}, got {weight}")
        if len({m for m, _ in self.targets}) != len(self.targets):
            raise ValueError(f"route: {self.name!r} names a target twice")
        object.__setattr__(self, "_bounds", tuple(accumulate(w for _, w in self.targets)))

    @property
    def total_weight(self) -> int:
        return self._bounds[-1]

    def bucket(self, session_id: str) -> int:
        """The session's fixed point in [0, total_weight): a keyed BLAKE2b of the route and session id."""
        digest = hashlib.blake2b(session_id.encode(), digest_size=8, key=self.name.encode()[:64]).digest()
        return int.from_bytes(digest, "little") % self.total_weight

    def choose(self, session_id: str = "", rng: random.Random | None = None,
               served: Callable[[str], bool] | None = None) -> str | None:
        """The target serving one request: sticky by ``session_id`` when given, else random by weight. With
        ``served``, only among the targets it accepts, by their weights (a canary adapter not loaded yet, or
        unloaded, does not fail its share of the requests); None when it accepts none."""
        point = self.bucket(session_id) if session_id else (rng or random).randrange(self.total_weight)
        live = self.targets if served is None else tuple(t for t in self.targets if served(t[0]))
        if len(live) == len(self.targets):
            return self.targets[bisect_right(self._bounds, point)][0]
        if not live:
            return None
        point = point * sum(w for _, w in live) // self.total_weight  # the same place in the smaller range
        for model, acc in zip((m for m, _ in live), accumulate(w for _, w in live), strict=True):
            if point < acc:
                return model
        raise AssertionError("unreachable: point < the live weights' sum")


def parse_route(value: str) -> Route:
    """``NAME=MODEL:WEIGHT,MODEL:WEIGHT...`` -> Route; ValueError naming the flag on bad syntax."""
    name, sep, spec = value.partition("=")
    if not sep or not spec:
        raise ValueError(f"route: expected NAME=MODEL:WEIGHT[,MODEL:WEIGHT...], got {value!r}")
    targets = []
    for part in spec.split(","):
        model, sep, weight = part.strip().rpartition(":")
        if not sep or not model:
            raise ValueError(f"route: {name!r}: expected MODEL:WEIGHT, got {part!r}")
        try:
            targets.append((model, int(weight)))
        except ValueError:
            raise ValueError(f"route: {name!r}: weight of {model!r} must be an integer, got {weight!r}") from None
    return Route(name, tuple(targets))


def parse_routes(values: list[str] | tuple[str, ...]) -> tuple[Route, ...]:
    routes = tuple(parse_route(v) for v in values)
    check_unique([r.name for r in routes], "route")
    return routes
