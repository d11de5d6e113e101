"""Request classes at the router: the lowest class is shed first (capacity bound and SLO budget)."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from pdserve.router import metrics
from pdserve.router.admission import Admission, AdmissionError, admission_bound
from pdserve.router.classes import BATCH_PRIORITY, class_of
from pdserve.router.load import WorkerLoad
from pdserve.router.membership import Worker


def _decode(num_seqs: int) -> Worker:
    load = WorkerLoad(max_num_seqs=4, num_total_blocks=1000, num_running=min(4, num_seqs),
                      num_waiting=max(0, num_seqs - 4))
    return Worker("d:1", "decode", None, None, load=load, healthy=True)


def test_classes_from_priority():
    assert [class_of(p) for p in (BATCH_PRIORITY, -1, 0, 1, 9)] == [
        "background", "background", "standard", "high", "high"]


def test_capacity_bound_sheds_background_then_standard_then_high():
    load = WorkerLoad(max_num_seqs=4, num_total_blocks=1000)
    assert [admission_bound(load, 3, p) for p in (-10, 0, 5)] == [4, 8, 12]
    adm = Admission()
    admitted = {}
    for num_seqs in range(14):
        w = _decode(num_seqs)
        admitted[num_seqs] = []
        for prio in (BATCH_PRIORITY, 0, 5):
            try:
                adm.with_room([w], 3, prio)
                admitted[num_seqs].append(class_of(prio))
            except AdmissionError as e:
                assert "for " + class_of(prio) in str(e)
    assert admitted[3] == ["background", "standard", "high"]
    assert admitted[4] == ["standard", "high"], "background work only takes spare running slots"
    assert admitted[8] == ["high"], "a worker full of standard work still takes high requests"
    assert admitted[12] == []


def test_slo_budget_by_class():
    adm = Admission(shed_ttft_s=1.0)
    adm.check_slo(1.9, priority=1)
    adm.check_slo(0.9, priority=0)
    adm.check_slo(0.45, priority=BATCH_PRIORITY)
    for ttft, prio in ((2.1, 1), (1.1, 0), (0.55, BATCH_PRIORITY)):
        with pytest.raises(AdmissionError, match="SLO"):
            adm.check_slo(ttft, prio)


def test_shed_is_counted_by_class():
    def value(cls):
        return REGISTRY.get_sample_value("pdserve_router_shed_by_class_total", {"request_class": cls}) or 0.0

    before = {c: value(c) for c in ("background", "standard", "high")}
    metrics.count_shed("capacity", BATCH_PRIORITY)
    metrics.count_shed("slo", 3)
    assert value("background") == before["background"] + 1 and value("high") == before["high"] + 1
    assert value("standard") == before["standard"]
