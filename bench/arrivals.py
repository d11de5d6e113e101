"""Arrival processes: open-loop Poisson / gamma (bursty) at a rate, deterministic for a seed.

Gaps between requests are gamma distributed with mean 1/rate. A gamma with shape k has coefficient of
variation (CV) 1/sqrt(k), so the burstiness knob is the CV: CV = 1 (k = 1) is Poisson, CV > 1 burstier,
CV < 1 more regular, CV = 0 a fixed interval (vLLM's ``--burstiness`` is the shape k = 1/CV^2).
"""

from __future__ import annotations

import math
import random


def shape_for_cv(cv: float) -> float:
    """The gamma shape k with this coefficient of variation (k = 1/CV^2; CV 0 -> inf)."""
    return math.inf if cv == 0 else 1.0 / (cv * cv)


def gamma_arrivals(rate: float, n: int, cv: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (seconds from start) of ``n`` requests at mean ``rate`` req/s; the first request is sent
    one gap after the start, like the rest."""
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate: must be a finite number > 0, got {rate}")
    if not (cv >= 0 and math.isfinite(cv)):
        raise ValueError(f"burstiness: the coefficient of variation must be finite and >= 0, got {cv}")
    if n < 0:
        raise ValueError(f"num_requests: must be >= 0, got {n}")
    rng = random.Random(seed)
    mean = 1.0 / rate
    shape = shape_for_cv(cv)
    t, out = 0.0, []
    for _ in range(n):
        t += mean if cv == 0 else rng.gammavariate(shape, mean / shape)
        out.append(t)
    return out


def poisson_arrivals(rate: float, n: int, seed: int = 0) -> list[float]:
    """Poisson process: exponential gaps (gamma with shape 1, CV 1)."""
    return gamma_arrivals(rate, n, 1.0, seed)
