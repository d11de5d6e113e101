"""Arrival processes: rate, burstiness (CV) and determinism over fixed seeds."""

from __future__ import annotations

import math
import statistics

import pytest

from pdserve.bench.arrivals import gamma_arrivals, poisson_arrivals, shape_for_cv

N = 20000


def _gaps(ts):
    return [b - a for a, b in zip([0.0, *ts[:-1]], ts, strict=True)]


def _cv(xs):
    return statistics.pstdev(xs) / statistics.mean(xs)


@pytest.mark.parametrize("rate,seed", [(10.0, 3), (0.5, 7), (200.0, 11)])
def test_poisson_mean_rate_and_cv(rate, seed):
    ts = poisson_arrivals(rate, N, seed=seed)
    assert len(ts) == N and all(b > a for a, b in zip(ts, ts[1:], strict=False))
    assert N / ts[-1] == pytest.approx(rate, rel=0.05)
    assert _cv(_gaps(ts)) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("cv", [0.25, 0.5, 2.0, 3.0])
def test_gamma_has_the_chosen_cv_and_rate(cv):
    ts = gamma_arrivals(5.0, N, cv=cv, seed=1)
    assert N / ts[-1] == pytest.approx(5.0, rel=0.05 * max(1.0, cv))
    assert _cv(_gaps(ts)) == pytest.approx(cv, rel=0.1)


def test_cv_zero_is_a_fixed_interval_and_cv_one_is_poisson():
    assert gamma_arrivals(5.0, 10, cv=0) == pytest.approx([0.2 * (i + 1) for i in range(10)])
    assert gamma_arrivals(3.0, 100, cv=1.0, seed=5) == poisson_arrivals(3.0, 100, seed=5)
    assert shape_for_cv(0.5) == pytest.approx(4.0) and shape_for_cv(2.0) == pytest.approx(0.25)
    assert math.isinf(shape_for_cv(0))


def test_same_seed_same_schedule_other_seed_other_schedule():
    assert gamma_arrivals(4.0, 500, 2.0, seed=9) == gamma_arrivals(4.0, 500, 2.0, seed=9)
    assert gamma_arrivals(4.0, 500, 2.0, seed=9) != gamma_arrivals(4.0, 500, 2.0, seed=10)
    # the same seed at another rate is the same schedule, rescaled (common random numbers across a sweep)
    assert gamma_arrivals(8.0, 50, 1.0, seed=2) == pytest.approx([t / 2 for t in gamma_arrivals(4.0, 50, 1.0, seed=2)])


@pytest.mark.parametrize("kwargs,field", [
    (dict(rate=0, n=10), "rate"), (dict(rate=-1.0, n=10), "rate"), (dict(rate=math.inf, n=10), "rate"),
    (dict(rate=1.0, n=10, cv=-0.5), "burstiness"), (dict(rate=1.0, n=10, cv=math.nan), "burstiness"),
    (dict(rate=1.0, n=-1), "num_requests"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        gamma_arrivals(**kwargs)
