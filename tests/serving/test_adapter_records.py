"""A worker's records of API-loaded adapters: what it reports, and the tombstones that stop a revival."""

from __future__ import annotations

import pytest

from pdserve.engine.errors import PreconditionError
from pdserve.serving.adapter_records import MAX_TOMBSTONES, AdapterRecord, AdapterRecords


def test_loads_are_reported_and_an_unload_leaves_a_tombstone_that_refuses_that_version():
    r = AdapterRecords()
    r.check_load("a", "v1")
    r.loaded("a", "/a", "v1")
    assert r.all() == [AdapterRecord("a", "/a", "v1")]
    r.unloaded("a", "v1")
    assert r.all() == [AdapterRecord("a", "/a", "v1", unloaded=True)]
    with pytest.raises(PreconditionError, match="'a' .*was unloaded"):
        r.check_load("a", "v1")
    r.check_load("a", "v2")  # a new load is a new version
    r.loaded("a", "/a2", "v2")
    assert AdapterRecord("a", "/a2", "v2") in r.all()


def test_an_unload_tombstones_the_routers_version_even_where_it_never_loaded():
    r = AdapterRecords()
    r.unloaded("b", "v9")  # this worker joined late; the catch-up load may still be on its way
    with pytest.raises(PreconditionError):
        r.check_load("b", "v9")


def test_local_loads_are_not_recorded_and_replace_an_api_load():
    r = AdapterRecords()
    r.loaded("c", "/c", "v1")
    r.loaded("c", "/local", "")  # --lora at start or a load without a version
    assert r.all() == [AdapterRecord("c", "/c", "v1", unloaded=True)]
    r.check_load("c", "")  # unversioned loads are never refused


def test_tombstones_are_bounded():
    r = AdapterRecords()
    for i in range(MAX_TOMBSTONES + 10):
        r.unloaded(f"n{i}", "v")
    assert len(r.all()) == MAX_TOMBSTONES
    r.check_load("n0", "v")  # the oldest were forgotten
