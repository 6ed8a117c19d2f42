"""The one module that opens DuckDB.

DuckDB allows one read-write process at a time (readers in other processes need the
writer to be gone), and a connection object must not be shared across threads. LabTrend
therefore:

* opens the file **per unit of work** and closes it when the last user in the process is
  done, so a CLI import or a training run started beside the dashboard can take the lock
  between two page loads;
* shares one database instance per process and gives every caller its own ``cursor()``
  (DuckDB's rule: one cursor per thread);
* sends every write through one process-wide lock (one writer);
* retries while another process holds the file, calling ``on_busy`` once the wait passes
  ``busy_after_s`` (the dashboard shows "database busy, retrying").
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import duckdb

__all__ = ["Store", "StoreBusyError", "StoreSettings", "memory_config", "open_store"]


class StoreBusyError(RuntimeError):
    """Another process held the database file for longer than the retry budget."""


@dataclass(frozen=True)
class StoreSettings:
    # Path of the DuckDB file, or ":memory:" for tests.
    path: str
    # Seconds to keep retrying while another process holds the file lock.
    busy_timeout_s: float = 60.0
    # After this many seconds of waiting, on_busy is called (once) so a UI can say so.
    busy_after_s: float = 2.0
    # DuckDB threads; None lets DuckDB choose (all cores).
    threads: int | None = None
    # DuckDB memory limit, e.g. "4GB"; None: $LABTREND_DUCKDB_MEMORY_LIMIT, else 2GB
    # (data.settings.duckdb_memory_limit). Beyond it DuckDB spills to temp_directory.
    memory_limit: str | None = None
    # Folder DuckDB spills to; None: $LABTREND_DUCKDB_TEMP_DIR, else '<database file>.tmp'.
    temp_directory: str | None = None
    extra_config: dict = field(default_factory=dict)
    # Open the file read-only: readers in several processes then share it (a read-write opening
    # excludes every other process); writes and migrations are refused.
    read_only: bool = False


def memory_config(settings: StoreSettings) -> dict:
    """DuckDB's ``memory_limit`` and ``temp_directory`` for a store (data.settings' defaults:
    2 GB, spilling beside the database file), so one process cannot take a shared server's memory."""
    from data import settings as site

    cfg = {"memory_limit": site.duckdb_memory_limit(settings.memory_limit)}
    temp = site.duckdb_temp_dir(settings.path, settings.temp_directory)
    if temp is not None:
        cfg["temp_directory"] = str(temp)
    return cfg


def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "lock" in text and ("conflicting" in text or "could not set" in text)


class _Instance:
    """A process-wide open database with a reference count."""

    def __init__(self, conn: duckdb.DuckDBPyConnection):
        self.conn = conn
        self.users = 0
        # Lives as long as this connection: while it is open no other process can write the
        # file, so what this process has read of rows that never change stays true.
        self.memo: dict = {}


class Store:
    """Access to one LabTrend DuckDB file.

    Use ``with store.read() as cur`` for queries and ``with store.write() as cur`` for a
    transaction that commits on success and rolls back on any exception.
    """

    _registry_lock = threading.RLock()
    _instances: dict[str, _Instance] = {}
    _write_locks: dict[str, threading.RLock] = {}

    def __init__(self, settings: StoreSettings, on_busy: Callable[[float], None] | None = None):
        self.settings = settings
        self.on_busy = on_busy
        self._key = settings.path if settings.path == ":memory:" else str(Path(settings.path).resolve())
        self._memory_conn: duckdb.DuckDBPyConnection | None = None
        self._memory_memo: dict = {}
        with Store._registry_lock:
            Store._write_locks.setdefault(self._key, threading.RLock())
        self._migrated = False

    # -- connection lifecycle -------------------------------------------------------------
    def _connect_with_retry(self) -> duckdb.DuckDBPyConnection:
        cfg = dict(self.settings.extra_config)
        if self.settings.threads:
            cfg["threads"] = self.settings.threads
        cfg.update(memory_config(self.settings))
        Path(self.settings.path).parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        told = False
        delay = 0.05
        while True:
            try:
                return duckdb.connect(self.settings.path, read_only=self.settings.read_only, config=cfg)
            except duckdb.IOException as exc:
                if not _is_lock_error(exc):
                    raise
                waited = time.monotonic() - start
                if waited > self.settings.busy_timeout_s:
                    raise StoreBusyError(
                        f"database {self.settings.path} is busy (held by another process) "
                        f"for more than {self.settings.busy_timeout_s:.0f} s"
                    ) from exc
                if not told and waited >= self.settings.busy_after_s and self.on_busy:
                    self.on_busy(waited)
                    told = True
                time.sleep(delay)
                delay = min(delay * 1.5, 0.5)

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.read_with_memo() as (cur, _):
            yield cur

    @contextlib.contextmanager
    def read_with_memo(self) -> Iterator[tuple[duckdb.DuckDBPyConnection, dict]]:
        """A cursor for queries, and a dict that lives exactly as long as this process's open
        connection to the file.

        Only for caching committed rows that are never updated or deleted (``result_keys``):
        while the connection is open no other process can write the file, and the next
        connection starts with an empty dict.
        """
        if self.settings.path == ":memory:":
            with Store._registry_lock:
                if self._memory_conn is None:
                    self._memory_conn = duckdb.connect(":memory:", config=memory_config(self.settings))
                    _migrate(self._memory_conn)
                cur = self._memory_conn.cursor()
            try:
                yield cur, self._memory_memo
            finally:
                cur.close()
            return
        with Store._registry_lock:
            inst = Store._instances.get(self._key)
            if inst is None:
                inst = _Instance(self._connect_with_retry())
                Store._instances[self._key] = inst
                if not self._migrated and not self.settings.read_only:
                    with Store._write_locks[self._key]:
                        _migrate(inst.conn)
                    self._migrated = True
            inst.users += 1
            cur = inst.conn.cursor()
        try:
            yield cur, inst.memo
        finally:
            cur.close()
            with Store._registry_lock:
                inst.users -= 1
                if inst.users == 0:
                    inst.conn.close()
                    Store._instances.pop(self._key, None)

    @contextlib.contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor for queries (bound parameters only)."""
        with self._cursor() as cur:
            yield cur

    @contextlib.contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor inside one transaction; commits on success, rolls back on error.

        Writes in this process are serialised (one writer).
        """
        with Store._write_locks[self._key]:
            with self._cursor() as cur:
                cur.execute("BEGIN TRANSACTION")
                try:
                    yield cur
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                else:
                    cur.execute("COMMIT")

    def migrate(self) -> list[int]:
        """Apply pending migrations; return the versions applied."""
        with Store._write_locks[self._key], self._cursor() as cur:
            return _migrate(cur)


def open_store(path: str | Path, **kwargs) -> Store:
    """A :class:`Store` on ``path`` with its migrations applied."""
    store = Store(StoreSettings(path=str(path), **kwargs))
    store.migrate()
    return store


# -- migrations ------------------------------------------------------------------------------
def _migration_files() -> list[tuple[int, str, str]]:
    out = []
    for res in resources.files("data.migrations").iterdir():
        name = res.name
        if name.endswith(".sql") and name[:3].isdigit():
            out.append((int(name[:3]), name, res.read_text(encoding="utf-8")))
    return sorted(out)


def _migrate(conn: duckdb.DuckDBPyConnection) -> list[int]:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)"
    )
    done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations").fetchall()}
    applied = []
    for version, name, sql in _migration_files():
        if version in done:
            continue
        conn.execute("BEGIN TRANSACTION")
        try:
            conn.execute(sql)
            conn.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, now()::TIMESTAMP)", [version, name]
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(version)
    if applied or not done:
        from data.catalogue import sync_catalogue  # local import: catalogue reads reference files

        sync_catalogue(conn)
    return applied
