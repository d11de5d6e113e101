"""Arrival processes: open-loop Poisson / gamma (bursty) at a rate, deterministic for a seed."""

from __future__ import annotations

import random


def gamma_arrivals(rate: float, n: int, cv: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (seconds from start) of ``n`` requests at mean ``rate`` req/s.

    Gaps are gamma distributed with coefficient of variation ``cv`` (shape 1/cv^2): cv = 1 is Poisson,
    cv > 1 is burstier, cv < 1 more regular, cv = 0 a fixed interval.
    """
    if rate <= 0:
        raise ValueError(f"rate: must be > 0, got {rate}")
    if cv < 0:
        raise ValueError(f"burstiness: coefficient of variation must be >= 0, got {cv}")
    rng = random.Random(seed)
    mean = 1.0 / rate
    t, out = 0.0, []
    for _ in range(n):
        if cv == 0:
            gap = mean
        else:
            shape = 1.0 / (cv * cv)
            gap = rng.gammavariate(shape, mean / shape)
        t += gap
        out.append(t)
    return out


def poisson_arrivals(rate: float, n: int, seed: int = 0) -> list[float]:
    return gamma_arrivals(rate, n, 1.0, seed)
