"""BatchStore.open: a path that is no writable place is one ValueError line naming --batch-db (the router
printed a traceback and exited 1)."""

from __future__ import annotations

import pytest

from pdserve.router.batch_store import BatchStore


@pytest.mark.parametrize("make", [
    lambda tmp: tmp / "file" / "batch.sqlite3",  # parent is a regular file
    lambda tmp: tmp / "dir-as-db",  # the database path is a directory
])
def test_an_unusable_batch_db_path_is_one_line_naming_the_flag(tmp_path, make):
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "dir-as-db").mkdir()
    store = BatchStore(make(tmp_path))
    try:
        with pytest.raises(ValueError, match=r"^--batch-db: cannot open the batch-job database .*writable place$"):
            store.open()
    finally:
        store.shutdown()


def test_a_writable_path_opens_and_creates_its_parents(tmp_path):
    store = BatchStore(tmp_path / "a" / "b" / "batch.sqlite3")
    try:
        store.open()
        assert store.conn is not None and (tmp_path / "a" / "b" / "batch.sqlite3").exists()
    finally:
        store.shutdown()
