"""Batch jobs' state and results in an embedded SQLite database (stdlib ``sqlite3``).

Tables: ``jobs`` (one row per job: tenant, status, counts, the lease of the router running it), ``requests``
(the submitted ``GenerateRequest`` of each index, serialized) and ``results`` (at most one row per index: the
primary key is (job_id, idx) and rows are inserted with ``INSERT OR IGNORE``, so a result is written exactly
once, whatever runs it twice). The database is in WAL mode with ``synchronous=NORMAL``: every committed
result survives a kill -9 of the router (the OS has it), which is what a restart resumes from.

Lease: a job is run by one router at a time. The router that runs it renews ``lease_until`` (wall clock)
every second; another router (or the same one restarted after a crash) takes over a running job once its
lease has expired (``LEASE_S``). A request whose result is not stored when its router dies is run again.

All calls go through one thread that owns the connection (``run``), so the event loop never waits on disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

LEASE_S = 5.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, status TEXT NOT NULL, num_requests INTEGER NOT NULL,
    num_succeeded INTEGER NOT NULL DEFAULT 0, num_failed INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, finished_at REAL NOT NULL DEFAULT 0, owner TEXT NOT NULL DEFAULT '',
    lease_until REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS requests (
    job_id TEXT NOT NULL, idx INTEGER NOT NULL, request BLOB NOT NULL, PRIMARY KEY (job_id, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT NOT NULL, idx INTEGER NOT NULL, ok INTEGER NOT NULL, result BLOB NOT NULL,
    PRIMARY KEY (job_id, idx)) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class JobRow:
    job_id: str
    tenant: str
    status: str  # "running" | "completed" | "cancelled"
    num_requests: int
    num_succeeded: int
    num_failed: int
    created_at: float
    finished_at: float

    @property
    def num_pending(self) -> int:
        return 0 if self.status == "cancelled" else self.num_requests - self.num_succeeded - self.num_failed


_JOB_COLUMNS = "job_id, tenant, status, num_requests, num_succeeded, num_failed, created_at, finished_at"


class BatchStore:
    """Synchronous methods run on the store's own thread; call them through ``run``."""

    def __init__(self, path: str | Path, clock=time.time):
        self.path = Path(path)
        self.clock = clock
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-db")
        self.conn: sqlite3.Connection | None = None

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def open(self) -> None:
        """Open (or create) the database; ValueError, one line, when the path is not a writable place."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise ValueError(f"--batch-db: cannot open the batch-job database {str(self.path)!r} ({reason}); give "
                             f"--batch-db (or PDSERVE_CACHE_DIR) a writable place") from None
        self.conn = conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def shutdown(self) -> None:
        self.executor.submit(self.close).result()
        self.executor.shutdown(wait=True)

    # ---- writes -----------------------------------------------------------------------------------
    def create(self, job_id: str, tenant: str, requests: list[bytes], owner: str) -> None:
        now = self.clock()
        with self.conn:  # one transaction: a job exists with all its requests or not at all
            self.conn.execute("BEGIN")
            self.conn.execute(
                "INSERT INTO jobs (job_id, tenant, status, num_requests, created_at, owner, lease_until) "
                "VALUES (?, ?, 'running', ?, ?, ?, ?)", (job_id, tenant, len(requests), now, owner, now + LEASE_S))
            self.conn.executemany("INSERT INTO requests (job_id, idx, request) VALUES (?, ?, ?)",
                                  [(job_id, i, r) for i, r in enumerate(requests)])

    def add_result(self, job_id: str, idx: int, ok: bool, result: bytes) -> bool:
        """Store index ``idx``'s result unless one is stored (then False); completes the job with its last."""
        with self.conn:
            self.conn.execute("BEGIN")
            cur = self.conn.execute("INSERT OR IGNORE INTO results (job_id, idx, ok, result) VALUES (?, ?, ?, ?)",
                                    (job_id, idx, int(ok), result))
            if cur.rowcount == 0:
                return False
            column = "num_succeeded" if ok else "num_failed"
            self.conn.execute(f"UPDATE jobs SET {column} = {column} + 1 WHERE job_id = ?", (job_id,))
            self.conn.execute(
                "UPDATE jobs SET status = 'completed', finished_at = ? WHERE job_id = ? AND status = 'running' "
                "AND num_succeeded + num_failed = num_requests", (self.clock(), job_id))
        return True

    def cancel(self, job_id: str) -> None:
        self.conn.execute("UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE job_id = ? AND "
                          "status = 'running'", (self.clock(), job_id))

    def claim(self, owner: str) -> list[str]:
        """Take over running jobs whose lease expired, renew this owner's leases; -> the jobs ``owner`` runs."""
        now = self.clock()
        self.conn.execute("UPDATE jobs SET owner = ?, lease_until = ? WHERE status = 'running' AND "
                          "(owner = ? OR lease_until < ?)", (owner, now + LEASE_S, owner, now))
        rows = self.conn.execute("SELECT job_id FROM jobs WHERE status = 'running' AND owner = ? "
                                 "ORDER BY created_at, job_id", (owner,))
        return [r[0] for r in rows]

    # ---- reads ------------------------------------------------------------------------------------
    def job(self, job_id: str) -> JobRow | None:
        row = self.conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return JobRow(*row) if row else None

    def pending(self, job_id: str) -> list[int]:
        """Indices with no stored result, in order."""
        rows = self.conn.execute(
            "SELECT q.idx FROM requests q LEFT JOIN results r ON r.job_id = q.job_id AND r.idx = q.idx "
            "WHERE q.job_id = ? AND r.idx IS NULL ORDER BY q.idx", (job_id,))
        return [r[0] for r in rows]

    def request(self, job_id: str, idx: int) -> bytes:
        return self.conn.execute("SELECT request FROM requests WHERE job_id = ? AND idx = ?", (job_id, idx)
                                 ).fetchone()[0]

    def results(self, job_id: str, start: int, limit: int) -> list[tuple[int, bytes]]:
        """Stored results with index >= ``start``, in index order, at most ``limit``."""
        rows = self.conn.execute("SELECT idx, result FROM results WHERE job_id = ? AND idx >= ? ORDER BY idx "
                                 "LIMIT ?", (job_id, start, limit))
        return list(rows)
