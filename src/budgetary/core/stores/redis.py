"""`RedisStore`: budget state in Redis, shared by processes on many hosts.

Every operation is one call of one Lua program (``_lua/budget.lua``, the
engine's rules ported to Lua), so check-and-hold is atomic and takes one
round trip: an ``FCALL`` of a Redis Function, or ``EVALSHA`` on servers
without Functions. A budget family (a root budget and every budget under it)
keeps its state in four keys that share a Cluster hash tag derived from the
root's name: ``<prefix>{<tag>}:levels`` (a hash of level states and the
family's ledger id and earliest lease expiry), ``:holds`` (leases),
``:ledger`` (a list, trimmed to ``ledger_max_len``) and ``:once`` (markers of
steps a resumed run must not repeat, kept 30 days). Budget and agent names
only travel as call arguments and hash fields, never as key names or Lua
source, so no name can reach another budget's keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import select
import struct
import threading
import weakref
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import replace
from decimal import Decimal
from importlib import resources
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from budgetary.core._engine import (
    AgentState,
    Level,
    Meta,
    Outcome,
    Vector,
    _deny,
    _soft_limit,
    _unit_name,
    _usage_of,
    user_value,
)
from budgetary.core._units import COST, LLM, nanos_to_usd
from budgetary.core.contract import AgentContract
from budgetary.core.errors import ConfigurationError, StoreError, UnknownAgent, UsageError, _BudgetMissing
from budgetary.core.guard import ALLOW, Decision, Deny, SoftLimit
from budgetary.core.ledger import LedgerEntry
from budgetary.core.limits import Limits
from budgetary.core.stores._codec import agent_key, agent_name, level_from_doc
from budgetary.core.stores.base import (
    REDIS_URL_SCHEMES,
    LevelFigures,
    checked_ledger_max_len,
    checked_name,
    checked_seconds,
    unencodable,
)
from budgetary.core.usage import Usage

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = ["RedisStore", "URL_SCHEMES"]

URL_SCHEMES = REDIS_URL_SCHEMES
_CLUSTER_SCHEMES = {"redis-cluster://": "redis://", "rediss-cluster://": "rediss://"}

T = TypeVar("T")

_SUFFIXES = ("levels", "holds", "ledger", "once")
# One encoder for every call: json.dumps with options builds a new JSONEncoder each time.
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# A vector (8 integer counters) as one argument: 8 little-endian doubles, what the script keeps
# (Lua numbers are doubles: exact to 2^53, and 2^63-1, the saturation value, stays the largest).
_vector = struct.Struct("<8d").pack
_HELD = -6  # where a reserve request's amounts are, counted from its end (see `_reserve_request`)
_CACHE_MAX = 4096  # entries per per-store cache of encoded arguments (chains, ledger metadata)
# Connections per asyncio client a store opens (per node on a Cluster): redis-py's own default, so
# no caller gets fewer than before. Calls beyond it wait for a free one (see `_async_client`).
_MAX_CONNECTIONS = 100
_ALLOWED = Outcome()
"""The common reserve outcome, shared (outcomes are never mutated)."""


class _Program:
    """The Lua library, as a Redis Function library and as a plain script for servers without Functions.

    A Function is compiled once per server, so a call runs only the operation;
    an EVALSHA call re-runs the whole script body (defining every helper) first.
    The name carries a digest of the source: hosts running different versions
    of budgetary each call their own.
    """

    def __init__(self) -> None:
        source = resources.files("budgetary.core.stores").joinpath("_lua/budget.lua").read_text(encoding="utf-8")
        self.name = "budgetary_" + hashlib.sha1(source.encode("utf-8")).hexdigest()[:16]
        self.library = f"#!lua name={self.name}\n{source}\nredis.register_function('{self.name}', dispatch)\n"
        self.script = f"{source}\nreturn dispatch(KEYS, ARGV)\n"


_PROGRAM: _Program | None = None


def program() -> _Program:
    """The Lua program, read once per process."""
    global _PROGRAM
    if _PROGRAM is None:
        _PROGRAM = _Program()
    return _PROGRAM


def fallback(exc: Exception) -> str | None:
    """What a failed ``FCALL`` or ``FUNCTION LOAD`` asks for: ``"load"``, ``"eval"``, or ``None`` (a real error)."""
    import redis

    text = str(exc)
    if "Function not found" in text:
        return "load"  # a new server, a restart without persistence, or FUNCTION FLUSH
    if isinstance(exc, redis.exceptions.NoPermissionError) or text.lower().startswith("unknown command"):
        return "eval"  # Redis < 7, or an ACL that allows EVALSHA but not Functions
    return None


def family_of(key: str) -> str:
    """The root budget name of a budget key (`Budget` keys are JSON paths from the root)."""
    try:
        path = json.loads(key)
    except ValueError:
        return key
    if isinstance(path, list) and path and isinstance(path[0], str):
        return path[0]
    return key


def backend_errors() -> tuple[type[Exception], ...]:
    """The redis-py exceptions a command can raise (the cluster ones do not derive from ``RedisError``)."""
    import redis
    from redis.exceptions import RedisClusterException

    return (redis.RedisError, RedisClusterException)


@contextmanager
def mapped_errors(url: str, what: str) -> Iterator[None]:
    """Turn every redis-py failure into `StoreError` (the one place where that happens).

    Text with no UTF-8 form (a lone surrogate) becomes `UsageError`.
    """
    try:
        yield
    except backend_errors() as exc:
        raise StoreError(f"Redis store {url} failed ({what}): {type(exc).__name__}: {exc}") from exc
    except UnicodeEncodeError as exc:
        raise unencodable(f"Redis store {url}", exc) from None


async def _take(slots: asyncio.Semaphore, timeout: float | None) -> None:
    """Acquire one of ``slots``, or raise redis-py's ``ConnectionError`` after ``timeout`` seconds.

    The error is the one redis-py's `BlockingConnectionPool` raises when it runs out of time, so
    both clients fail the same way (`StoreError`, through `mapped_errors`).
    """
    import redis

    try:
        await asyncio.wait_for(slots.acquire(), timeout)
    except asyncio.TimeoutError as exc:
        raise redis.ConnectionError("No connection available.") from exc


def _bulk(args: list[Any]) -> bytes:
    """Arguments as RESP bulk strings (the body of a command, without its array header)."""
    out = []
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


# Bumped in a forked child: a connection made before the fork shares its socket with the parent.
_forks = 0


def _after_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_after_fork)


class _ThreadConnections:
    """One connection per thread for the store's own FCALLs, made from a redis-py pool's settings.

    Taking a connection from the pool and giving it back costs a lock, a readiness probe of
    three system calls and the pool's observability hooks on every command: about 6 us where
    `benchmarks/stores.py` ran, a tenth of a loopback round trip. A thread keeps its connection
    instead and probes it with one non-blocking poll, which, like the pool's probe, finds a
    connection the server closed while it was idle (or one with bytes pending, out of step)
    and replaces it before anything is sent (a readable TLS connection gets the pool's own
    probe, see `_only_tls_records`). A thread's connection closes when the thread ends.
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._local = threading.local()
        self._open: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def get(self) -> Any:
        entry = getattr(self._local, "entry", None)
        # The socket is compared too: after `close` its descriptor number may belong to another file.
        if entry is not None and entry[3] == _forks and entry[0]._sock is entry[1]:
            if not entry[2].poll(0) or _only_tls_records(entry[0]):
                return entry[0]
        return self._connect(entry)

    def _connect(self, entry: tuple[Any, Any, Any, int] | None) -> Any:
        if entry is not None:
            self.drop()
        pool = self._pool
        conn = pool.connection_class(**pool.connection_kwargs)
        conn.connect()
        poller = select.poll()
        poller.register(conn._sock, select.POLLIN)
        self._local.entry = (conn, conn._sock, poller, _forks)
        with self._lock:
            self._open.add(conn)
        return conn

    def drop(self) -> None:
        """Close this thread's connection (its state is unknown after a failed call)."""
        entry = getattr(self._local, "entry", None)
        self._local.entry = None
        if entry is not None:
            entry[0].disconnect()

    def close(self) -> None:
        """Close every thread's connection; a thread that calls again gets a new one."""
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            conn.disconnect()


class _PrivateLoop:
    """An event loop in a daemon thread, shared by every store that serves sync calls over asyncio.

    A store built on a caller's ``redis.asyncio`` client answers sync calls (`Budget.snapshot`,
    the setup `Budget(...)` makes, the lease keeper's renewals) with a copy of that client running
    here: the caller's own loop may be the very thread that is waiting, so it cannot serve them.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._forks = -1
        self._lock = threading.Lock()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the private loop and wait for its result in this thread."""
        return asyncio.run_coroutine_threadsafe(coro, self._running()).result()

    def _running(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._forks != _forks:  # a forked child has the loop but not its thread
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="budgetary-redis-sync", daemon=True).start()
                self._loop, self._forks = loop, _forks
            return self._loop


_private_loop = _PrivateLoop()


def _only_tls_records(conn: Any) -> bool:
    """After a poll found an idle connection readable: whether that was only TLS bookkeeping.

    A TLS server may send records after the handshake (TLS 1.3 session tickets) that make the
    socket readable without any reply for us; redis-py's probe reads through the TLS layer, which
    consumes them. Data or the server's close (an error here) mean the connection must go.
    """
    try:
        return not conn.can_read()
    except Exception:
        return False


def _safe_url(url: str) -> str:
    """``url`` without its password, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:  # malformed (an unclosed IPv6 bracket): hide everything before the host
        scheme, sep, rest = url.partition("://")
        return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}" if "@" in rest else url
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{netloc}"))


def _checked_url(url: str, shown: str) -> None:
    """Refuse a DB path that is not a number: redis-py would silently use DB 0 (``/1/2`` would be DB 12)."""
    if url.startswith("unix://"):
        return  # the path is the socket's; the DB is a ``?db=`` parameter
    try:
        path = unquote(urlsplit(url).path)
    except ValueError as exc:
        raise ConfigurationError(f"Redis store URL {shown} is not valid: {exc}") from None
    db = path[1:] if path.startswith("/") else path
    if db and not (db.isascii() and db.isdigit()):
        raise ConfigurationError(
            f"Redis store URL {shown} is not valid: its path must be a DB number (redis://host:6379/0), got {db!r}"
        )
    if url.startswith(tuple(_CLUSTER_SCHEMES)):
        # redis-py refuses another DB only when it connects, as a cluster error (StoreError here).
        dbs = [db, *parse_qs(urlsplit(url).query).get("db", [])]
        if not all(d == "" or (d.isascii() and d.isdigit() and int(d) == 0) for d in dbs):
            raise ConfigurationError(f"Redis store URL {shown} is not valid: a Redis Cluster has only DB 0")


def _client_url(client: Any) -> str:
    """Where a client passed in connects, as a URL without credentials (for messages)."""
    from redis.asyncio.connection import SSLConnection as AsyncSSLConnection
    from redis.asyncio.connection import UnixDomainSocketConnection as AsyncUnixConnection
    from redis.connection import SSLConnection, UnixDomainSocketConnection

    nodes = getattr(client, "nodes_manager", None)
    if nodes is not None:  # a Redis Cluster client: the first node it was given
        node = (getattr(client, "startup_nodes", None) or list(nodes.startup_nodes.values()))[0]
        tls = issubclass(nodes.connection_kwargs.get("connection_class", object), (SSLConnection, AsyncSSLConnection))
        return f"{'rediss' if tls else 'redis'}-cluster://{node.host}:{node.port}"
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", {})
    kind = getattr(pool, "connection_class", object)
    if issubclass(kind, (UnixDomainSocketConnection, AsyncUnixConnection)):
        return f"unix://{kwargs.get('path', '')}?db={kwargs.get('db', 0)}"
    scheme = "rediss" if issubclass(kind, (SSLConnection, AsyncSSLConnection)) else "redis"
    return f"{scheme}://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


class RedisStore:
    """Budget state in Redis (``redis://``, ``rediss://``, or a redis-py client, sync or asyncio).

    Example:
        ```python
        store = RedisStore("redis://cache:6379/0", key_prefix="myapp:budget:")
        tenant = Budget(Limits(max_cost_usd=50, window="1d"), name="tenant-42", store=store)
        run = Budget(Limits(max_cost_usd=2), name="run-7", parent=tenant)

        # asyncio code: the async API awaits the store on the running loop
        store = RedisStore(redis.asyncio.Redis(host="cache"))
        run = Budget(Limits(max_cost_usd=2), name="run-8", store=store)
        run.agent("writer")
        async with run.llm_call("writer", model="gpt-4o", messages=msgs, max_output_tokens=500) as call:
            ...
        ```

    Args:
        url: A ``redis://``/``rediss://``/``unix://`` URL (the store opens a sync client, and an
            asyncio client on first async use), a ``redis-cluster://``/``rediss-cluster://`` URL of
            any node of a Redis Cluster (the same, with cluster clients), a
            ``redis.Redis``/``redis.RedisCluster`` client, or a
            ``redis.asyncio.Redis``/``redis.asyncio.RedisCluster`` client. A client passed in is not
            closed by the store. With an asyncio client only, the async API (`Budget.areserve`,
            ``async with budget.llm_call(...)``, `Reservation.asettle`, `Budget.asnapshot`) runs on
            your loop, and sync calls are made by a copy of the client on a private loop (see
            `_bridge`; not for ``redis.asyncio.RedisCluster``, whose sync calls raise `UsageError`).
        key_prefix: Prepended to every key; must not contain ``{`` or ``}`` (they would change the
            Cluster hash tag).
        ledger_max_len: Ledger entries kept per budget family, newest last (0 keeps all).
        socket_timeout: Seconds before a Redis command fails with `StoreError` (URL only). An async
            call also waits up to this long for a free connection when 100 calls (a
            ``max_connections`` URL parameter changes that number) are already in flight on the
            running loop.
    """

    def __init__(
        self,
        url: str | redis.Redis | redis.RedisCluster | redis.asyncio.Redis | redis.asyncio.RedisCluster,
        *,
        key_prefix: str = "budgetary:",
        ledger_max_len: int = 100_000,
        socket_timeout: float | None = 5.0,
    ) -> None:
        try:
            import redis
            import redis.asyncio
        except ImportError as exc:
            raise ImportError('RedisStore needs redis-py: pip install "budgetary[redis]"') from exc
        if not isinstance(key_prefix, str) or "{" in key_prefix or "}" in key_prefix:
            raise ConfigurationError(f"RedisStore key_prefix must be a string without braces, got {key_prefix!r}")
        ledger_max_len = checked_ledger_max_len(ledger_max_len, "RedisStore")
        socket_timeout = checked_seconds(socket_timeout, "RedisStore socket_timeout", none=True)
        self._client: Any = None
        self._aclient: Any = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._from_url: str | None = None  # a single server's URL: the store packs its own commands
        self._cluster_url: str | None = None  # a cluster node's URL, as redis-py's cluster clients take it
        self._socket_timeout = socket_timeout
        if isinstance(url, str):
            self.url = _safe_url(url)
            if not url.startswith(URL_SCHEMES):
                schemes = ", ".join(URL_SCHEMES)
                raise ConfigurationError(f"RedisStore needs a URL starting with one of {schemes}; got {self.url!r}")
            _checked_url(url, self.url)
            scheme = url.partition("://")[0] + "://"
            try:
                if scheme in _CLUSTER_SCHEMES:
                    self._cluster_url = _CLUSTER_SCHEMES[scheme] + url[len(scheme) :]
                    # A cluster client connects now, to learn the cluster's slots.
                    with mapped_errors(self.url, "connect"):
                        self._client = redis.RedisCluster.from_url(self._cluster_url, socket_timeout=socket_timeout)
                else:
                    self._client = redis.Redis.from_url(url, socket_timeout=socket_timeout)
                    pool = self._client.connection_pool
                    pool.connection_class(**pool.connection_kwargs)  # an unknown URL parameter fails here, not later
                    self._from_url = url
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(f"Redis store URL {self.url} is not valid: {exc}") from exc
            self._owns_client = True
        elif isinstance(url, (redis.Redis, redis.RedisCluster)):
            self.url = _client_url(url)
            self._client = url
            self._owns_client = False
        elif isinstance(url, (redis.asyncio.Redis, redis.asyncio.RedisCluster)):
            self.url = _client_url(url)
            self._aclient = url
            self._owns_client = False
        else:
            raise ConfigurationError(
                "RedisStore needs a redis:// URL, a redis.Redis or redis.RedisCluster client, or a "
                f"redis.asyncio.Redis or redis.asyncio.RedisCluster client, got {type(url).__name__}"
            )
        self.key_prefix = key_prefix
        self.ledger_max_len = ledger_max_len
        self._program = program()
        self._script = None if self._client is None else self._client.register_script(self._program.script)
        self._ascript: Any = None if self._aclient is None else self._aclient.register_script(self._program.script)
        self._aforks = _forks  # the fork generation the caller's asyncio client belongs to
        self._parents_clients: list[Any] = []  # see `_forked_client`
        self._functions = True
        self._response_error = redis.ResponseError
        # See `_fcall`: connections for a client this store opened, and the packed start of an
        # FCALL per family (keyed by its first key).
        self._conns = _ThreadConnections(self._client.connection_pool) if self._from_url is not None else None
        self._packed: dict[str | bytes, bytes] = {}
        # Arguments go out as bytes where they can be prepared once: redis-py passes bytes through
        # and encodes every str on every call (a visible share of a call's client-side time).
        self._maxlen = str(ledger_max_len).encode()
        self._keys: dict[str, list[str]] = {}
        # Per (chain, agent): the family's keys and the leading arguments of every chain operation.
        self._heads: dict[tuple[tuple[str, ...], str | None], tuple[list[bytes], list[bytes]]] = {}
        # Per (run_id, model, location): those fields as JSON object members, and as an object.
        self._metas: dict[tuple[str | None, str | None, str | None], tuple[str, bytes]] = {}
        # Hold ids carry no family; remember where each hold this process made lives, for which
        # chain and agent, and its amounts as sent (a settle passes them back, so the script need
        # not read the hold). Single dict operations are atomic, so threads need no lock here.
        self._hold_keys: dict[str, tuple[list[bytes], tuple[str, ...], str | None, bytes]] = {}
        # On an asyncio-only store the setup calls `Budget` makes synchronously (`ensure_budget`,
        # `ensure_agent`) wait here for the first call, async or sync, which makes them first.
        self._setup: list[tuple[list[str], list[str], str]] = []
        self._setup_lock: asyncio.Lock | None = None
        # A store built on an asyncio client serves sync calls with a copy of it (see `_bridge`).
        self._twin: tuple[Any, int] | None = None
        # A store that opened its clients from a URL: its asyncio client per event loop, and on a
        # Cluster the slots that bound the calls in flight on it (see `_async_client`).
        self._loop_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self._loop_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    # -- plumbing --------------------------------------------------------------------------

    def _family_keys(self, key: str) -> list[str]:
        keys = self._keys.get(key)
        if keys is None:
            with mapped_errors(self.url, "encode"):
                tag = hashlib.sha256(family_of(key).encode("utf-8")).hexdigest()[:24]
            keys = [f"{self.key_prefix}{{{tag}}}:{suffix}" for suffix in _SUFFIXES]
            self._keys[key] = keys
        return keys

    def _head(self, chain: tuple[str, ...], agent: str | None) -> tuple[list[bytes], list[bytes]]:
        """The keys of ``chain``'s family and the arguments every chain operation starts with."""
        head = self._heads.get((chain, agent))
        if head is None:
            if len(self._heads) >= _CACHE_MAX:
                self._heads.clear()
            akey = agent_key(agent)
            with mapped_errors(self.url, "encode"):
                head = (
                    [k.encode() for k in self._family_keys(chain[0])],
                    [v.encode() for v in (_dumps([list(chain), akey]), akey, str(len(chain)), *chain)],
                )
            self._heads[(chain, agent)] = head
        return head

    def _meta(self, run_id: str | None, model: str | None, location: str | None) -> tuple[str, bytes]:
        """These fields as JSON object members (no braces), and as an encoded JSON object."""
        key = (run_id, model, location)
        meta = self._metas.get(key)
        if meta is None:
            if len(self._metas) >= _CACHE_MAX:
                self._metas.clear()
            members = _dumps({"run_id": run_id, "model": model, "location": location})[1:-1]
            with mapped_errors(self.url, "encode"):
                meta = self._metas[key] = (members, ("{" + members + "}").encode())
        return meta

    def _call(self, keys: list[Any], argv: list[Any]) -> str:
        """One call of the Lua program with the sync client; the reply as text."""
        client = self._client
        if client is None:
            return self._bridge(keys, argv)
        with mapped_errors(self.url, argv[0]):
            raw = self._invoke(keys, argv)
        return raw if type(raw) is str else raw.decode()

    def _fcall(self, keys: list[Any], argv: list[Any]) -> Any:
        """One FCALL with the sync client.

        A client the store opened from a URL gets the command as bytes packed here (the function
        name, key count and keys once per family) on this thread's own connection (see
        `_ThreadConnections`): redis-py's generic path encodes and packs every argument and
        wraps the call in its pool, retry and observability machinery, which cost about 12 us a
        call (a quarter of a loopback round trip) where `benchmarks/stores.py` ran. Without that
        retry a connection that fails during the call fails it with `StoreError` instead of
        sending it again, which for a reserve or settle that may already have run is the safe
        outcome. A client passed in keeps its own configuration, retries included: it gets a
        plain ``fcall``.
        """
        conns = self._conns
        if conns is None:
            return self._client.fcall(self._program.name, len(keys), *keys, *argv)
        command = self._packed_fcall(keys, argv)
        conn = conns.get()
        try:
            conn.send_packed_command([command])
            return conn.read_response()
        except self._response_error:
            raise  # the whole error reply was read: the connection is still in step
        except BaseException:
            conns.drop()  # a reply may be half read: the connection must not be reused
            raise

    def _packed_fcall(self, keys: list[Any], argv: list[Any]) -> bytes:
        """The FCALL as bytes on the wire (the function name, key count and keys packed once per family)."""
        head = self._packed.get(keys[0])
        if head is None:
            if len(self._packed) >= _CACHE_MAX:
                self._packed.clear()
            head = self._packed[keys[0]] = _bulk(["FCALL", self._program.name, str(len(keys)), *keys])
        parts = [b"*%d\r\n" % (3 + len(keys) + len(argv)), head]
        for arg in argv:
            if type(arg) is str:
                arg = arg.encode()
            parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
        return b"".join(parts)

    def _invoke(self, keys: list[Any], argv: list[Any]) -> Any:
        """FCALL, loading the library first if the server lacks it, or EVALSHA on servers without Functions."""
        import redis

        if self._functions:
            try:
                return self._fcall(keys, argv)
            except redis.ResponseError as exc:
                if fallback(exc) is None:
                    raise
                try:
                    if fallback(exc) == "load":
                        self._client.function_load(self._program.library, replace=True)
                        return self._fcall(keys, argv)
                except redis.ResponseError as again:
                    if fallback(again) != "eval":
                        raise
                self._functions = False
        assert self._script is not None
        return self._script(keys=keys, args=argv)

    async def _acall(self, keys: list[Any], argv: list[Any]) -> str:
        """One call of the Lua program with the asyncio client, on the running loop; the reply as text."""
        client = self._async_client()
        if self._setup:
            await self._run_setup()
        slots = self._loop_slots.get(asyncio.get_running_loop()) if self._cluster_url is not None else None
        with mapped_errors(self.url, argv[0]):
            if slots is None:
                raw = await self._ainvoke(client, keys, argv)
            else:
                # redis-py 8 routes a command before it learns the cluster's slots, so calls that
                # start together on a new client go to the wrong node, and the MOVED replies make
                # it reconnect, cutting the others' connections mid-call. Learn the slots first
                # (this returns at once when the client has them).
                await client.initialize()
                await _take(slots, self._socket_timeout)
                try:
                    raw = await self._ainvoke(client, keys, argv)
                finally:
                    slots.release()
        return raw if type(raw) is str else raw.decode()

    async def _ainvoke(self, client: Any, keys: list[Any], argv: list[Any]) -> Any:
        """`_invoke` with the asyncio client."""
        import redis

        if self._functions:
            try:
                return await self._afcall(client, keys, argv)
            except redis.ResponseError as exc:
                if fallback(exc) is None:
                    raise
                try:
                    if fallback(exc) == "load":
                        await client.function_load(self._program.library, replace=True)
                        return await self._afcall(client, keys, argv)
                except redis.ResponseError as again:
                    if fallback(again) != "eval":
                        raise
                self._functions = False
        script = self._ascript if client is self._aclient else client.register_script(self._program.script)
        return await script(keys=keys, args=argv)

    async def _afcall(self, client: Any, keys: list[Any], argv: list[Any]) -> Any:
        """`_fcall` with the asyncio client: a client the store opened gets the command packed here."""
        if self._from_url is None:
            return await client.fcall(self._program.name, len(keys), *keys, *argv)
        command = self._packed_fcall(keys, argv)
        pool = client.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(command)
            return await conn.read_response()
        except self._response_error:
            raise
        except BaseException:  # cancelled or failed mid-call: a reply may be half read
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    def _async_client(self) -> Any:
        """The asyncio client for the running loop (a URL store opens one per loop, lazily)."""
        loop = asyncio.get_running_loop()
        if not self._owns_client:  # the caller's asyncio client
            if self._aforks != _forks:
                self._forked_client()
            if self._aloop is not loop:
                self._aloop, self._setup_lock = loop, None
            return self._aclient
        # An asyncio client's connections belong to the loop that opened them, and several loops
        # (one per thread) may use the store at once: one client per loop.
        client = self._loop_clients.get(loop)
        if client is None:
            import redis.asyncio

            # redis-py's default asyncio pools raise MaxConnectionsError when a call finds every
            # connection in use, so `asyncio.gather` of more calls than that failed the extra
            # ones. A blocking pool makes them wait for a connection instead. The Cluster client
            # has no blocking pool (its nodes raise too): the store bounds its calls in flight to
            # one node's connections, which no call can then exhaust (each holds one connection
            # at a time). Both waits end after socket_timeout, as a command would.
            if self._cluster_url is None:
                assert self._from_url is not None  # a store that owns its clients opened them from a URL
                pool = redis.asyncio.BlockingConnectionPool.from_url(
                    self._from_url, socket_timeout=self._socket_timeout, max_connections=_MAX_CONNECTIONS,
                    timeout=self._socket_timeout,
                )  # fmt: skip
                client = redis.asyncio.Redis.from_pool(pool)  # closes the pool with the client
            else:
                client = redis.asyncio.RedisCluster.from_url(
                    self._cluster_url, socket_timeout=self._socket_timeout, max_connections=_MAX_CONNECTIONS
                )
                # A max_connections URL parameter overrides the argument: bound by what the nodes got.
                self._loop_slots[loop] = asyncio.Semaphore(client.connection_kwargs["max_connections"])
            self._loop_clients[loop] = client
        return client

    def _forked_client(self) -> None:
        """In a forked child, switch to a copy of the caller's asyncio client (same pool class and settings).

        redis.asyncio's pools, unlike the sync ones, do not notice a fork: the child would send its
        calls on the connections the parent opened, whose sockets the two processes then share, and
        each would read replies meant for the other (a settle answered by a reserve's reply).
        The parent's client stays referenced: collected here, its connections would close their
        transports, taking their sockets out of the event loop's epoll set, which the child shares
        with the parent (whose calls would then wait for replies they never hear of).
        A redis.asyncio.RedisCluster client has no pool to copy and is used as it is.
        """
        self._aforks = _forks
        pool = getattr(self._aclient, "connection_pool", None)
        if pool is not None:
            self._parents_clients.append(self._aclient)
            copy = type(pool)(connection_class=pool.connection_class, **pool.connection_kwargs)
            self._aclient = type(self._aclient).from_pool(copy)
            self._ascript = self._aclient.register_script(self._program.script)

    async def _run_setup(self) -> None:
        if self._setup_lock is None:
            self._setup_lock = asyncio.Lock()
        async with self._setup_lock:
            await self._drain_setup(self._aclient)

    async def _drain_setup(self, client: Any) -> None:
        """Make the setup calls that waited for a connection (each is idempotent: running one twice is harmless)."""
        for item in list(self._setup):
            keys, argv, what = item
            with mapped_errors(self.url, what):
                await self._ainvoke(client, keys, argv)
            if item in self._setup:  # the other path (async or sync) may have made it meanwhile
                self._setup.remove(item)

    def _bridge(self, keys: list[Any], argv: list[Any]) -> str:
        """A sync call on a store built on an asyncio client: made by a copy of that client, on a private loop.

        The caller may be the thread running the client's own loop (sync code in a coroutine), which
        then cannot serve it; like any sync Redis call, it blocks its thread for one round trip.
        """
        return _private_loop.run(self._twin_call(self._twin_client(argv[0]), keys, argv))

    async def _twin_call(self, client: Any, keys: list[Any], argv: list[Any]) -> str:
        if self._setup:
            await self._drain_setup(client)
        with mapped_errors(self.url, argv[0]):
            raw = await self._ainvoke(client, keys, argv)
        return raw if type(raw) is str else raw.decode()

    def _twin_client(self, what: str) -> Any:
        """The copy of the asyncio client that `_bridge` uses (same connection class and settings)."""
        twin = self._twin
        if twin is None or twin[1] != _forks:
            pool = getattr(self._aclient, "connection_pool", None)
            if pool is None:  # redis.asyncio.RedisCluster: no pool to copy
                raise UsageError(
                    f"RedisStore {self.url} has only a redis.asyncio.RedisCluster client, so it cannot serve the "
                    f"sync call {what!r}: use the async API (await budget.areserve(...), await budget.asnapshot(), "
                    "...), or give the store a sync redis.RedisCluster client"
                )
            if twin is not None:  # a forked child's: kept referenced, as the caller's client is (`_forked_client`)
                self._parents_clients.append(twin[0])
            copy = type(pool)(connection_class=pool.connection_class, **pool.connection_kwargs)
            twin = self._twin = (type(self._aclient).from_pool(copy), _forks)
        return twin[0]

    def _setup_call(self, keys: list[str], argv: list[Any]) -> str:
        if self._client is None and self._aloop is None:
            self._setup.append((keys, argv, argv[0]))
            return "{}"
        return self._call(keys, argv)

    # -- requests and replies (sans-I/O: shared by the sync and async methods) ------------------

    def _reserve_request(
        self, chain: tuple[str, ...], agent: str | None, req: Vector, gate: bool, hold_id: str, ttl: float,
        now: float, meta: Meta, quiet: bool,
    ) -> tuple[list[Any], list[Any]]:  # fmt: skip
        keys, head = self._head(chain, agent)
        x = self._meta(meta.run_id, meta.model, meta.location)[1]
        # A gated call holds only its llm_calls slot (the script does the same; the settle sends
        # back exactly what was held).
        held = _vector(0, 0, 0, 0, req[LLM], 0, 0, 0) if gate else _vector(*req)
        return keys, [
            "reserve", repr(float(now)), self._maxlen, *head, held, b"1" if gate else b"0", hold_id,
            repr(float(ttl)), b"1" if quiet else b"0", x,
        ]  # fmt: skip

    def _reserve_reply(
        self, raw: str, keys: list[bytes], held: bytes, chain: tuple[str, ...], agent: str | None, hold_id: str
    ) -> Outcome:
        if raw[0] == "A":
            self._hold_keys[hold_id] = (keys, chain, agent, held)
            return _ALLOWED if raw == "A0" else Outcome(decision=ALLOW, moved=int(raw[1:]))
        result = _json(raw, agent)
        decision = _decision(result["d"], agent)
        if decision.allowed:
            self._hold_keys[hold_id] = (keys, chain, agent, held)
        return Outcome(decision=decision, moved=int(result.get("mv", 0)))

    def _settle_request(
        self, chain: tuple[str, ...], agent: str | None, hold_id: str | None, actual: Vector, now: float,
        meta: Meta, estimated: bool, cost_known: bool, usage: Usage | None,
    ) -> tuple[list[Any], list[Any], Usage, bool]:  # fmt: skip
        shown = usage if usage is not None else _usage_of(actual, cost_known)
        cost = shown.cost_usd
        # The ledger record: what `_entry` reads back. An unpriced usage with a known cost keeps
        # the nano-dollars ("n"); the reader prices them (a Decimal here would cost more than the rest).
        if cost is not None:
            priced = f',"c":"{cost}"' if cost_known else f',"c":"{cost}","z":true'
        else:
            priced = f',"n":{actual[COST]}' if cost_known else ',"z":true'
        x = (
            f'{{{self._meta(meta.run_id, meta.model, meta.location)[0]},"u":[{shown.input_tokens},'
            f"{shown.output_tokens},{shown.cache_read_tokens},{shown.cache_write_tokens},{shown.reasoning_tokens}]"
            f'{priced},"e":{"true" if estimated else "false"}}}'
        )
        keys, head = self._head(chain, agent)
        hold = self._hold_keys.get(hold_id) if hold_id else None
        # The hold's amounts when this store made it for the same chain and agent, else "" (the
        # script reads the hold).
        held = hold[3] if hold is not None and hold[1] == chain and hold[2] == agent else b""
        argv = ["settle", repr(float(now)), self._maxlen, *head, hold_id or "", held, _vector(*actual), x]
        return keys, argv, shown, cost is None and cost_known

    def _settle_reply(
        self, raw: str, chain: tuple[str, ...], agent: str | None, hold_id: str | None, actual: Vector, now: float,
        meta: Meta, estimated: bool, cost_known: bool, shown: Usage, unpriced: bool,
    ) -> Outcome:  # fmt: skip
        if hold_id:
            self._hold_keys.pop(hold_id, None)
        if raw[0] == "S":
            seq, moved, run_name = raw[1:].split(" ", 2)
            events: list[SoftLimit] = []
        else:
            result = _json(raw, agent)
            seq, moved, run_name = result["id"], result["mv"], result["rn"]
            events = [_soft(e, agent) for e in _items(result["ev"])]
        fields: dict[str, Any] = {
            "id": int(seq), "time": now, "budget": run_name, "scopes": chain, "agent": agent, "kind": "llm",
            "model": meta.model, "estimated": estimated, "run_id": meta.run_id, "location": meta.location,
        }  # fmt: skip
        if unpriced:
            fields["_unpriced"] = (shown, actual[COST])  # priced when first read, as the engine does
        else:
            fields["usage"] = shown
            fields["cost_usd"] = shown.cost_usd if cost_known else None
        return Outcome(events=events, moved=int(moved), entry=LedgerEntry._fast(fields))

    def _release_request(self, hold_id: str, now: float, reason: str) -> tuple[list[Any], list[Any]] | None:
        hold = self._hold_keys.pop(hold_id, None)
        if hold is None:
            return None
        return hold[0], ["release", repr(float(now)), self._maxlen, hold_id, reason]

    def _note_request(
        self, chain: tuple[str, ...], agent: str | None, kind: str, now: float, meta: Meta,
        decision: Decision | None, reason: str | None,
    ) -> tuple[list[Any], list[Any]]:  # fmt: skip
        x = _dumps({
            "model": meta.model, "resource": None if decision is None else decision.resource,
            "reason": reason if reason is not None else None if decision is None else decision.reason,
            "run_id": meta.run_id, "location": meta.location,
        })  # fmt: skip
        keys, head = self._head(chain, agent)
        return keys, ["note", repr(float(now)), self._maxlen, *head, kind, x]

    def _figures_request(self, chain: tuple[str, ...], now: float) -> tuple[list[Any], list[Any]]:
        keys, head = self._head(chain, None)
        return keys, ["figures", repr(float(now)), self._maxlen, *head]

    def _chain_op(self, op: str, chain: tuple[str, ...], agent: str | None, now: float, *rest: str | bytes) -> Any:
        return _json(self._call(*self._chain_request(op, chain, agent, now, *rest)), agent)

    async def _achain_op(
        self, op: str, chain: tuple[str, ...], agent: str | None, now: float, *rest: str | bytes
    ) -> Any:
        return _json(await self._acall(*self._chain_request(op, chain, agent, now, *rest)), agent)

    def _chain_request(
        self, op: str, chain: tuple[str, ...], agent: str | None, now: float, *rest: str | bytes
    ) -> tuple[list[bytes], list[Any]]:
        keys, head = self._head(chain, agent)
        return keys, [op, repr(float(now)), self._maxlen, *head, *rest]

    # -- the Store Protocol -----------------------------------------------------------------

    def ensure_budget(self, key: str, name: str, limits: Limits, now: float) -> None:
        checked_name(name, "budget", f"Redis store {self.url}")
        window = limits.window_seconds
        argv = [
            "ensure_budget", repr(float(now)), self._maxlen, key, name, "" if window is None else str(window),
            *("" if v is None else str(v) for v in limits.as_vector()), *(repr(float(t)) for t in limits.warn_at),
        ]  # fmt: skip
        _json(self._setup_call(self._family_keys(key), argv), None)

    def ensure_agent(self, key: str, contract: AgentContract, *, replace: bool) -> AgentContract | None:
        from budgetary.core._units import TOTAL

        checked_name(contract.name, "agent", f"Redis store {self.url}")
        allocation, reserve = contract.store_units()
        unit = None if contract.unit is None else TOTAL if contract.unit == "tokens" else COST
        threshold = contract.confidence_threshold
        argv = [
            "ensure_agent", "0.0", self._maxlen, key, agent_key(contract.name), str(contract.priority),
            "" if unit is None else str(unit), str(allocation or 0), str(reserve),
            "" if threshold is None else repr(float(threshold)), "1" if replace else "0",
        ]  # fmt: skip
        _json(self._setup_call(self._family_keys(key), argv), contract.name)
        return None

    def has_agent(self, key: str, agent: str | None) -> bool:
        if agent is None:
            return True
        argv = ["has_agent", "0.0", self._maxlen, key, agent_key(agent)]
        return bool(_json(self._call(self._family_keys(key), argv), agent)["ok"])

    def check(self, chain: tuple[str, ...], agent: str | None, now: float) -> Decision:
        return _decision(self._chain_op("check", chain, agent, now)["d"], agent)

    def reserve(
        self, chain: tuple[str, ...], agent: str | None, req: Vector, *, gate: bool, hold_id: str, ttl: float,
        now: float, meta: Meta, quiet: bool = False,
    ) -> Outcome:  # fmt: skip
        keys, argv = self._reserve_request(chain, agent, req, gate, hold_id, ttl, now, meta, quiet)
        return self._reserve_reply(self._call(keys, argv), keys, argv[_HELD], chain, agent, hold_id)

    def settle(
        self, chain: tuple[str, ...], agent: str | None, hold_id: str | None, actual: Vector, *, now: float,
        meta: Meta, estimated: bool = False, cost_known: bool = True, usage: Usage | None = None,
    ) -> Outcome:  # fmt: skip
        keys, argv, shown, unpriced = self._settle_request(
            chain, agent, hold_id, actual, now, meta, estimated, cost_known, usage
        )
        raw = self._call(keys, argv)
        return self._settle_reply(raw, chain, agent, hold_id, actual, now, meta, estimated, cost_known, shown,
                                  unpriced)  # fmt: skip

    def release(self, hold_id: str, *, now: float, reason: str) -> bool:
        request = self._release_request(hold_id, now, reason)
        return request is not None and bool(_json(self._call(*request), None)["ok"])

    def renew(self, hold_id: str, ttl: float, now: float) -> bool:
        hold = self._hold_keys.get(hold_id)
        if hold is None:
            return False
        return bool(_json(self._call(hold[0], ["renew", repr(float(now)), self._maxlen, hold_id, repr(float(ttl))]),
                          None)["ok"])  # fmt: skip

    def held_amounts(self, hold_id: str) -> Vector | None:
        hold = self._hold_keys.get(hold_id)
        if hold is None:
            return None
        held = _json(self._call(hold[0], ["held", "0.0", self._maxlen, hold_id]), None).get("m")
        return None if held is None else [int(v) for v in held]

    def begin_agent(
        self, chain: tuple[str, ...], agent: str | None, *, now: float, meta: Meta, once: str | None = None
    ) -> Outcome:
        x = self._meta(meta.run_id, meta.model, meta.location)[1]
        return _counted(self._chain_op("begin_agent", chain, agent, now, x, once or ""), agent)

    def count_tool(self, chain: tuple[str, ...], agent: str | None, tool: str, *, now: float, meta: Meta) -> Outcome:
        x = self._meta(meta.run_id, None, tool)[1]
        return _counted(self._chain_op("count_tool", chain, agent, now, x), agent)

    def reallocate(self, chain: tuple[str, ...], agent: str | None, shortfall: int, *, now: float, meta: Meta) -> int:
        x = self._meta(meta.run_id, meta.model, meta.location)[1]
        return int(self._chain_op("reallocate", chain, agent, now, str(shortfall), x)["mv"])

    def set_confidence(self, chain: tuple[str, ...], agent: str | None, value: float, now: float) -> None:
        self._chain_op("set_confidence", chain, agent, now, repr(float(value)))

    def top_up(self, key: str, amounts: Vector, now: float, once: str | None = None) -> bool:
        argv = ["top_up", repr(float(now)), self._maxlen, key, _vector(*amounts), once or ""]
        return bool(_json(self._call(self._family_keys(key), argv), None)["ok"])

    def seen(self, key: str, marker: str, now: float) -> bool:
        argv = ["seen", repr(float(now)), self._maxlen, key, marker]
        return bool(_json(self._call(self._family_keys(key), argv), None)["ok"])

    def record_entry(
        self, chain: tuple[str, ...], agent: str | None, kind: str, *, now: float, meta: Meta,
        decision: Decision | None = None, reason: str | None = None,
    ) -> None:  # fmt: skip
        _json(self._call(*self._note_request(chain, agent, kind, now, meta, decision, reason)), agent)

    def figures(self, chain: tuple[str, ...], now: float) -> list[LevelFigures]:
        return _figures(_json(self._call(*self._figures_request(chain, now)), None))

    def agents(self, key: str, now: float) -> dict[str | None, AgentState]:
        return _agents(_json(self._call(*self._figures_request((key,), now)), None))

    def entries(self, scope: str) -> list[LedgerEntry]:
        key = self._family_keys(scope)[2]
        with mapped_errors(self.url, "entries"):
            if self._client is not None:
                records = self._client.lrange(key, 0, -1)
            else:
                records = _private_loop.run(self._twin_client("entries").lrange(key, 0, -1))
        out = []
        for raw in records:
            entry = _entry(json.loads(raw))
            if scope in entry.scopes:
                out.append(entry)
        return out

    # -- the async twins (`Budget`'s async methods use them; see `AsyncStore`) ---------------

    async def areserve(
        self, chain: tuple[str, ...], agent: str | None, req: Vector, *, gate: bool, hold_id: str, ttl: float,
        now: float, meta: Meta, quiet: bool = False,
    ) -> Outcome:  # fmt: skip
        """`reserve`, awaited on the running loop."""
        keys, argv = self._reserve_request(chain, agent, req, gate, hold_id, ttl, now, meta, quiet)
        return self._reserve_reply(await self._acall(keys, argv), keys, argv[_HELD], chain, agent, hold_id)

    async def asettle(
        self, chain: tuple[str, ...], agent: str | None, hold_id: str | None, actual: Vector, *, now: float,
        meta: Meta, estimated: bool = False, cost_known: bool = True, usage: Usage | None = None,
    ) -> Outcome:  # fmt: skip
        """`settle`, awaited on the running loop."""
        keys, argv, shown, unpriced = self._settle_request(
            chain, agent, hold_id, actual, now, meta, estimated, cost_known, usage
        )
        raw = await self._acall(keys, argv)
        return self._settle_reply(raw, chain, agent, hold_id, actual, now, meta, estimated, cost_known, shown,
                                  unpriced)  # fmt: skip

    async def arelease(self, hold_id: str, *, now: float, reason: str) -> bool:
        """`release`, awaited on the running loop."""
        request = self._release_request(hold_id, now, reason)
        return request is not None and bool(_json(await self._acall(*request), None)["ok"])

    async def arecord_entry(
        self, chain: tuple[str, ...], agent: str | None, kind: str, *, now: float, meta: Meta,
        decision: Decision | None = None, reason: str | None = None,
    ) -> None:  # fmt: skip
        """`record_entry`, awaited on the running loop."""
        _json(await self._acall(*self._note_request(chain, agent, kind, now, meta, decision, reason)), agent)

    async def afigures(self, chain: tuple[str, ...], now: float) -> list[LevelFigures]:
        """`figures`, awaited on the running loop."""
        return _figures(_json(await self._acall(*self._figures_request(chain, now)), None))

    async def acheck(self, chain: tuple[str, ...], agent: str | None, now: float) -> Decision:
        """`check`, awaited on the running loop."""
        return _decision((await self._achain_op("check", chain, agent, now))["d"], agent)

    async def abegin_agent(
        self, chain: tuple[str, ...], agent: str | None, *, now: float, meta: Meta, once: str | None = None
    ) -> Outcome:
        """`begin_agent`, awaited on the running loop."""
        x = self._meta(meta.run_id, meta.model, meta.location)[1]
        return _counted(await self._achain_op("begin_agent", chain, agent, now, x, once or ""), agent)

    async def acount_tool(
        self, chain: tuple[str, ...], agent: str | None, tool: str, *, now: float, meta: Meta
    ) -> Outcome:
        """`count_tool`, awaited on the running loop."""
        x = self._meta(meta.run_id, None, tool)[1]
        return _counted(await self._achain_op("count_tool", chain, agent, now, x), agent)

    async def aagents(self, key: str, now: float) -> dict[str | None, AgentState]:
        """`agents`, awaited on the running loop."""
        return _agents(_json(await self._acall(*self._figures_request((key,), now)), None))

    async def aclose(self) -> None:
        """Close the asyncio client the store opened for the running loop (a client passed in is left open)."""
        loop = asyncio.get_running_loop()
        client = self._loop_clients.pop(loop, None)
        self._loop_slots.pop(loop, None)
        if client is not None:
            with mapped_errors(self.url, "close"):
                await client.aclose()

    def close(self) -> None:
        if self._conns is not None:
            self._conns.close()
        twin, self._twin = self._twin, None
        if twin is not None and twin[1] == _forks:
            with mapped_errors(self.url, "close"):
                _private_loop.run(twin[0].aclose())
        if self._owns_client and self._client is not None:
            with mapped_errors(self.url, "close"):
                self._client.close()

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
        self.close()

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, key_prefix={self.key_prefix!r})"


# -- script replies -> the values the engine returns ------------------------------------------


def _items(value: Any) -> list[Any]:
    # Lua's cjson writes an empty table as {}.
    return value if isinstance(value, list) else []


def _named(name: str) -> Level:
    return Level(key="", name=name, base=[None] * 7)


def _soft(d: dict[str, Any], agent: str | None) -> SoftLimit:
    run = _named(d["rn"])
    where = _named(d["n"]) if "n" in d else None
    return _soft_limit(where, run, agent, int(d["d"]), int(d["s"]), int(d["l"]), float(d["th"]))


def _counted(result: dict[str, Any], agent: str | None) -> Outcome:
    """A count's reply (an agent start, a tool call): its decision and the soft-limit events it fired."""
    return Outcome(_decision(result["d"], agent), [_soft(e, agent) for e in _items(result.get("ev"))])


def _decision(d: dict[str, Any], agent: str | None) -> Decision:
    kind = d["t"]
    if kind == "allow":
        return ALLOW
    if kind == "soft":
        return _soft(d, agent)
    why = d["w"]
    if why == "lim":
        return _deny(_named(d["n"]), agent, int(d["d"]), int(d["l"]), int(d["s"]), int(d["q"]), d["how"])
    if why == "alloc":
        # Same text as Engine._evaluate; the conformance suite compares the two.
        u = int(d["u"])
        allocated, used, requested, shortfall = (user_value(u, int(d[k])) for k in ("al", "used", "q", "sh"))
        return Deny(
            resource="allocation",
            reason=(
                f"agent {agent!r} would pass its allocation of {allocated} {_unit_name(u)} "
                f"({used} used or held, {requested} requested) and reallocation cannot cover {shortfall}"
            ),
            limit=allocated,
            spent=used,
            requested=requested,
            budget=d["n"],
            agent=agent,
        )
    threshold, confidence = float(d["th"]), float(d["c"])
    return Deny(
        resource="confidence",
        reason=f"agent {agent!r} reported confidence {confidence} >= its threshold {threshold}; it is done",
        limit=threshold,
        spent=confidence,
        budget=d["n"],
        agent=agent,
    )


def _json(raw: str, agent: str | None) -> Any:
    """A JSON reply of the script; raises what an unknown agent or budget means."""
    result = json.loads(raw)
    if "err" in result:
        if result["err"] == "agent":
            raise UnknownAgent(agent or "", result["n"])
        raise _BudgetMissing(result["key"])
    return result


def _figures(result: dict[str, Any]) -> list[LevelFigures]:
    return [
        LevelFigures(lv.key, lv.name, lv.limits, lv.spent, lv.held, lv.window_start, lv.window)
        for lv in (level_from_doc(doc) for doc in _items(result["lv"]))
    ]


def _agents(result: dict[str, Any]) -> dict[str | None, AgentState]:
    """The agents of the one level a figures request asked for."""
    return level_from_doc(_items(result["lv"])[0]).agents


def _llm_usage(x: dict[str, Any]) -> tuple[Usage, Decimal | None]:
    """The usage and cost of an ``llm`` record's fields (see `RedisStore._settle_request`)."""
    inp, out, cache_read, cache_write, reasoning = (int(v) for v in x["u"])
    c = x.get("c")
    cost = Decimal(c) if c is not None else nanos_to_usd(int(x["n"])) if "n" in x else None
    usage = Usage(input_tokens=inp, output_tokens=out, cache_read_tokens=cache_read, cache_write_tokens=cache_write,
                  reasoning_tokens=reasoning, cost_usd=cost)  # fmt: skip
    return usage, None if x.get("z") else cost


def _entry(rec: dict[str, Any]) -> LedgerEntry:
    """A ledger record the script wrote, as the entry the engine would have made."""
    kind = rec["k"]
    scopes, akey = rec["s"]
    agent = agent_name(akey)
    x = rec.get("x") or {}
    f = rec.get("f") or {}
    data: dict[str, Any] = {
        "id": rec["i"], "time": rec["t"], "budget": rec["b"], "scopes": _items(scopes), "agent": agent,
        "kind": kind, "run_id": x.get("run_id"), "location": x.get("location"),
    }  # fmt: skip
    if kind == "llm":
        usage, cost = _llm_usage(x)
        return replace(LedgerEntry.from_dict(data), model=x.get("model"), usage=usage, cost_usd=cost,
                       estimated=bool(x.get("e")))  # fmt: skip
    if kind == "release":
        amounts = [int(v) for v in _items(f["m"])]
        return replace(LedgerEntry.from_dict(data), model=x.get("model"), usage=_usage_of(amounts), reason=f.get("r"))
    if kind == "transfer":
        unit, amount = int(f["u"]), int(f["am"])
        donor = agent_name(f["dn"])
        shown = user_value(unit, amount)
        data.update(donor=donor, amount=str(shown), reason=f"reallocated {shown} {_unit_name(unit)} from {donor!r}")
    elif "e" in f:
        decision: Decision = _soft(f["e"], agent) if kind == "soft_limit" else _decision(f["e"], agent)
        data.update(resource=decision.resource, reason=decision.reason)
        if kind == "deny":
            data["model"] = x.get("model")
    elif kind not in ("agent_start", "tool"):
        data.update(model=x.get("model"), resource=x.get("resource"), reason=x.get("reason"))
    return LedgerEntry.from_dict(data)
