"""`SQLiteStore`: budget state in one SQLite file, shared by the processes of one host."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from budgetary.core._engine import ONCE_TTL, AgentState, Engine, Hold, Level
from budgetary.core.errors import ConfigurationError, StoreError, _BudgetMissing
from budgetary.core.ledger import LedgerEntry
from budgetary.core.stores._codec import hold_from_doc, hold_to_doc, level_from_doc, level_to_doc
from budgetary.core.stores.base import EngineStore, LevelFigures, checked_seconds, unencodable

__all__ = ["SQLiteStore", "sqlite_path"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS levels (key TEXT PRIMARY KEY, doc TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS holds (id TEXT PRIMARY KEY, expires REAL NOT NULL, doc TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS holds_expires ON holds (expires);
CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entry_scopes (scope TEXT NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (scope, id))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS once_markers (scope TEXT NOT NULL, marker TEXT NOT NULL, time REAL NOT NULL,
    PRIMARY KEY (scope, marker)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS once_markers_time ON once_markers (time);
"""


def sqlite_path(url: str) -> str:
    """The file path of a ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` URL (percent-escapes decoded)."""
    if not url.startswith("sqlite:///"):
        raise ConfigurationError(
            f"SQLite store URL must look like 'sqlite:///relative/path.db' or 'sqlite:////abs/path.db', got {url!r}"
        )
    raw = url[len("sqlite:///") :]
    try:
        path = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise ConfigurationError(f"SQLite store URL {url!r} has percent-escapes that are not UTF-8") from None
    if path in ("", ":memory:") or path.startswith("file:"):
        raise ConfigurationError(
            f"SQLite store URL {url!r} names no file; an in-memory database cannot be shared, use 'memory://'"
        )
    if "?" in raw or "#" in raw:
        raise ConfigurationError(
            f"SQLite store URL {url!r} has a query or fragment, but it takes no parameters "
            "(in a file name, write '?' as %3F and '#' as %23)"
        )
    return path


class SQLiteStore(EngineStore):
    """Budget state in a SQLite file (``sqlite:///path/budget.db``): persistent, several processes on one host.

    Each operation is one ``BEGIN IMMEDIATE`` transaction that loads only the
    state it touches (the budget levels of the chain, the holds it settles or
    expires), runs the shared engine on it, and writes back what changed; the
    write lock makes check-and-hold atomic across processes. The database
    runs in WAL mode with ``synchronous=NORMAL``: a committed operation
    survives a crash of the process (the usual failure); pass
    ``synchronous="FULL"`` to survive a power loss too, at a lower rate.

    Example:
        ```python
        store = SQLiteStore("/var/lib/app/budget.db")
        run = Budget(Limits(max_cost_usd=5), name="nightly", store=store)
        ```

    Args:
        path: The database file (created by the first operation that writes, if missing).
        timeout: Seconds an operation waits for another process's transaction.
        synchronous: SQLite's ``synchronous`` pragma, ``"NORMAL"`` or ``"FULL"``.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0, synchronous: str = "NORMAL") -> None:
        if not isinstance(synchronous, str) or synchronous.upper() not in ("NORMAL", "FULL"):
            raise ConfigurationError(f"SQLiteStore synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        self.path = os.fspath(path)
        # Escaped so that `sqlite_path` reads the URL back as the same path.
        self.url = "sqlite:///" + self.path.replace("%", "%25").replace("?", "%3F").replace("#", "%23")
        self._timeout = checked_seconds(timeout, "SQLiteStore timeout", zero=True)
        self._synchronous = synchronous.upper()
        # sqlite3 connections must not be shared between threads, nor inherited across fork().
        self._local = threading.local()
        self._connections: list[tuple[int, sqlite3.Connection]] = []
        self._lock = threading.Lock()
        if self.path.endswith(("/", os.sep)) or os.path.isdir(self.path):
            raise ConfigurationError(f"SQLiteStore: {self.path!r} is a directory; give the path of a database file")
        parent = Path(self.path).parent
        if not parent.is_dir():
            raise ConfigurationError(f"SQLiteStore: directory {str(parent)!r} of {self.path!r} does not exist")
        # A missing file is created by the first operation that may write, so that only reading
        # (`budgetary report`) leaves nothing behind; an existing one is checked now.
        self._ready = False
        if os.path.exists(self.path):
            with _mapped(self.path):
                self._connection()

    def _connection(self) -> sqlite3.Connection:
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False)
            try:
                self._retry_while_locked(lambda: _use_wal(conn))
                conn.execute(f"PRAGMA synchronous={self._synchronous}")
            except BaseException:
                conn.close()
                raise
            local.conn, local.pid = conn, os.getpid()
            with self._lock:
                self._connections.append((os.getpid(), conn))
        if not self._ready:
            self._retry_while_locked(lambda: conn.executescript(_SCHEMA))  # every statement is IF NOT EXISTS
            self._ready = True
        return conn

    def _retry_while_locked(self, step: Callable[[], object]) -> None:
        """Run ``step``, and again after a short pause while the database is locked, for up to ``timeout`` seconds.

        SQLite's busy timeout does not cover every statement: switching the journal mode fails at
        once when another connection holds a lock, as can a write in WAL mode that started reading
        before another process wrote. Processes that open a new file together meet exactly these
        (while one switches it to WAL and creates the tables), so they wait here instead. When the
        time is up, the last failure is raised.
        """
        deadline = time.monotonic() + self._timeout
        pause = 0.001
        while True:
            try:
                step()
                return
            except sqlite3.OperationalError as exc:
                left = deadline - time.monotonic()
                if "database is locked" not in str(exc) or left <= 0:
                    raise
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)

    @contextmanager
    def _transaction(self) -> Iterator[Engine]:
        with _mapped(self.path):
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                engine = _TxEngine(conn)
                yield engine
                engine.flush()
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _missing(self) -> bool:
        """Whether no database file exists yet (then a read finds nothing and creates nothing)."""
        return not self._ready and not os.path.exists(self.path)

    def figures(self, chain: tuple[str, ...], now: float) -> list[LevelFigures]:
        if self._missing():
            raise _BudgetMissing(chain[0])
        return super().figures(chain, now)

    def agents(self, key: str, now: float) -> dict[str | None, AgentState]:
        if self._missing():
            raise _BudgetMissing(key)
        return super().agents(key, now)

    def entries(self, scope: str) -> list[LedgerEntry]:
        if self._missing():
            return []
        with _mapped(self.path):
            rows = self._connection().execute(
                "SELECT e.doc FROM entry_scopes s JOIN entries e ON e.id = s.id WHERE s.scope = ? ORDER BY s.id",
                (scope,),
            )
            return [LedgerEntry.from_dict(json.loads(doc)) for (doc,) in rows]

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        pid = os.getpid()
        for owner, conn in connections:
            if owner == pid:  # a connection inherited across fork() belongs to the parent
                conn.close()
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch the database to WAL mode unless it is in it already (the mode persists in the file)."""
    (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
    if mode.lower() != "wal":
        conn.execute("PRAGMA journal_mode=WAL")


@contextmanager
def _mapped(path: str) -> Iterator[None]:
    """Turn every sqlite3 failure into `StoreError` (the one place where that happens).

    Text with no UTF-8 form (a lone surrogate) becomes `UsageError`.
    """
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"SQLite store {path!r} failed: {type(exc).__name__}: {exc}") from exc
    except UnicodeEncodeError as exc:  # sqlite3 binds text as UTF-8
        raise unencodable(f"SQLite store {path!r}", exc) from None


class _TxEngine(Engine):
    """The engine over the rows of one transaction: loads levels and holds on first use, writes back changes."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._pending: list[LedgerEntry] = []
        super().__init__(sink=self._pending.append)
        self._conn = conn
        self._seq_loaded = False
        self.levels = _Levels(self)
        self.holds = _Holds(self)
        (nearest,) = conn.execute("SELECT min(expires) FROM holds").fetchone()
        self.next_expiry = float("inf") if nearest is None else nearest

    def _emit(self, fields: dict[str, Any]) -> LedgerEntry:
        if not self._seq_loaded:
            (last,) = self._conn.execute("SELECT coalesce(max(id), 0) FROM entries").fetchone()
            self.seq, self._seq_loaded = last, True
        return super()._emit(fields)

    def seen(self, key: str, marker: str, now: float) -> bool:
        row = self._conn.execute("SELECT time FROM once_markers WHERE scope = ? AND marker = ?", (key, marker))
        marked = row.fetchone()
        return marked is not None and marked[0] > now - ONCE_TTL

    def mark(self, key: str, marker: str, now: float) -> None:
        conn = self._conn
        conn.execute("INSERT OR REPLACE INTO once_markers (scope, marker, time) VALUES (?, ?, ?)", (key, marker, now))
        conn.execute("DELETE FROM once_markers WHERE time <= ?", (now - ONCE_TTL,))

    def expire(self, now: float) -> None:
        holds = self.holds
        assert isinstance(holds, _Holds)
        for hold_id, doc in self._conn.execute("SELECT id, doc FROM holds WHERE expires <= ?", (now,)):
            holds.adopt(hold_id, doc)
        super().expire(now)

    def flush(self) -> None:
        """Write back what the operation changed."""
        conn = self._conn
        levels = self.levels
        holds = self.holds
        assert isinstance(levels, _Levels) and isinstance(holds, _Holds)
        for key, level in levels.items():
            doc = level_to_doc(level)
            if doc != levels.original.get(key):
                conn.execute("INSERT OR REPLACE INTO levels (key, doc) VALUES (?, ?)", (key, doc))
        gone = [(hold_id,) for hold_id in holds.deleted if hold_id not in holds]
        if gone:
            conn.executemany("DELETE FROM holds WHERE id = ?", gone)
        for hold_id, hold in holds.items():
            if holds.original.get(hold_id) != hold.expires:
                conn.execute(
                    "INSERT OR REPLACE INTO holds (id, expires, doc) VALUES (?, ?, ?)",
                    (hold_id, hold.expires, hold_to_doc(hold)),
                )
        if self._pending:
            conn.executemany(
                "INSERT INTO entries (id, doc) VALUES (?, ?)",
                [(e.id, json.dumps(e.to_dict(), ensure_ascii=False)) for e in self._pending],
            )
            conn.executemany(
                "INSERT INTO entry_scopes (scope, id) VALUES (?, ?)",
                [(scope, e.id) for e in self._pending for scope in dict.fromkeys(e.scopes)],
            )


class _Levels(dict[str, Level]):
    """Levels loaded from the ``levels`` table on first access."""

    def __init__(self, engine: _TxEngine) -> None:
        super().__init__()
        self._conn = engine._conn
        self.original: dict[str, str] = {}

    def __missing__(self, key: str) -> Level:
        row = self._conn.execute("SELECT doc FROM levels WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise _BudgetMissing(key)
        self.original[key] = row[0]
        level = self[key] = level_from_doc(row[0])
        return level

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


class _Holds(dict[str, Hold]):
    """Holds loaded from the ``holds`` table on first access; remembers deletions."""

    def __init__(self, engine: _TxEngine) -> None:
        super().__init__()
        self._conn = engine._conn
        self.original: dict[str, float] = {}
        self.deleted: set[str] = set()

    def adopt(self, hold_id: str, doc: str) -> None:
        if hold_id not in self and hold_id not in self.deleted:
            hold = hold_from_doc(hold_id, doc)
            self.original[hold_id] = hold.expires
            dict.__setitem__(self, hold_id, hold)

    def __missing__(self, hold_id: str) -> Hold:
        if hold_id not in self.deleted:
            row = self._conn.execute("SELECT doc FROM holds WHERE id = ?", (hold_id,)).fetchone()
            if row is not None:
                self.adopt(hold_id, row[0])
                return dict.__getitem__(self, hold_id)
        raise KeyError(hold_id)

    def get(self, hold_id: str, default: Any = None) -> Any:
        try:
            return self[hold_id]
        except KeyError:
            return default

    def __delitem__(self, hold_id: str) -> None:
        super().__delitem__(hold_id)
        self.deleted.add(hold_id)
