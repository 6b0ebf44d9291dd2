"""`RedisStore`: budget state in Redis, shared by processes on many hosts.

Every operation is one call of one Lua program (``_lua/budget.lua``, the
engine's rules ported to Lua), so check-and-hold is atomic and takes one
round trip: an ``FCALL`` of a Redis Function, or ``EVALSHA`` on servers
without Functions. A budget family (a root budget and every budget under it)
keeps its state in five keys that share a Cluster hash tag derived from the
root's name: ``<prefix>{<tag>}:levels`` (a hash of level states), ``:holds``
and ``:holdz`` (leases and their expiry index), ``:ledger`` (a list, trimmed
to ``ledger_max_len``) and ``:seq``. Budget and agent names only travel as
call arguments and hash fields, never as key names or Lua source, so no
name can reach another budget's keys.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from importlib import resources
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

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
from budgetary.core._units import COST, nanos_to_usd
from budgetary.core.contract import AgentContract
from budgetary.core.errors import ConfigurationError, StoreError, UnknownAgent
from budgetary.core.guard import ALLOW, Decision, Deny, SoftLimit
from budgetary.core.ledger import LedgerEntry
from budgetary.core.limits import Limits
from budgetary.core.stores._codec import agent_key, agent_name, level_from_doc, meta_json
from budgetary.core.stores.base import LevelFigures
from budgetary.core.usage import Usage

if TYPE_CHECKING:
    import redis

__all__ = ["RedisStore"]

_SUFFIXES = ("levels", "holds", "holdz", "ledger", "seq")
# One encoder for every call: json.dumps with options builds a new JSONEncoder each time.
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_LLM_FIELDS = ("model", "usage", "cost_usd", "estimated", "run_id", "location")


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
    """Turn every redis-py failure into `StoreError` (the one place where that happens)."""
    try:
        yield
    except backend_errors() as exc:
        raise StoreError(f"Redis store {url} failed ({what}): {type(exc).__name__}: {exc}") from exc


def _safe_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{netloc}"))


def _client_url(client: Any) -> str:
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", {})
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


class RedisStore:
    """Budget state in Redis (``redis://``, ``rediss://`` or a ``redis.Redis`` client).

    Example:
        ```python
        store = RedisStore("redis://cache:6379/0", key_prefix="myapp:budget:")
        tenant = Budget(Limits(max_cost_usd=50, window="1d"), name="tenant-42", store=store)
        run = Budget(Limits(max_cost_usd=2), name="run-7", parent=tenant)
        ```

    Args:
        url: A ``redis://``/``rediss://`` URL, or a ``redis.Redis``/``redis.RedisCluster`` client (the
            store then does not close it).
        key_prefix: Prepended to every key; must not contain ``{`` or ``}`` (they would change the
            Cluster hash tag).
        ledger_max_len: Ledger entries kept per budget family, newest last (0 keeps all).
        socket_timeout: Seconds before a Redis command fails with `StoreError` (URL only).
    """

    def __init__(
        self,
        url: str | redis.Redis | redis.RedisCluster,
        *,
        key_prefix: str = "budgetary:",
        ledger_max_len: int = 100_000,
        socket_timeout: float = 5.0,
    ) -> None:
        try:
            import redis
        except ImportError as exc:
            raise ImportError('RedisStore needs redis-py: pip install "budgetary[redis]"') from exc
        if not isinstance(key_prefix, str) or "{" in key_prefix or "}" in key_prefix:
            raise ConfigurationError(f"RedisStore key_prefix must be a string without braces, got {key_prefix!r}")
        if isinstance(ledger_max_len, bool) or not isinstance(ledger_max_len, int) or ledger_max_len < 0:
            raise ConfigurationError(f"RedisStore ledger_max_len must be an int >= 0, got {ledger_max_len!r}")
        if isinstance(url, str):
            if not url.startswith(("redis://", "rediss://", "unix://")):
                raise ConfigurationError(f"RedisStore needs a redis://, rediss:// or unix:// URL, got {url!r}")
            self.url = _safe_url(url)
            self._client: redis.Redis | redis.RedisCluster = redis.Redis.from_url(url, socket_timeout=socket_timeout)
            self._owns_client = True
        elif isinstance(url, (redis.Redis, redis.RedisCluster)):
            self.url = _client_url(url)
            self._client = url
            self._owns_client = False
        else:
            raise ConfigurationError(
                f"RedisStore needs a redis:// URL, a redis.Redis or a redis.RedisCluster client, got "
                f"{type(url).__name__} (redis.asyncio clients are not supported yet)"
            )
        self.key_prefix = key_prefix
        self.ledger_max_len = ledger_max_len
        self._program = program()
        self._script = self._client.register_script(self._program.script)
        self._functions = True
        self._maxlen = str(ledger_max_len)
        self._keys: dict[str, list[str]] = {}
        # Hold ids carry no family; remember where each hold this process made lives.
        self._hold_keys: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    # -- plumbing --------------------------------------------------------------------------

    def _family_keys(self, key: str) -> list[str]:
        keys = self._keys.get(key)
        if keys is None:
            tag = hashlib.sha256(family_of(key).encode("utf-8")).hexdigest()[:24]
            keys = [f"{self.key_prefix}{{{tag}}}:{suffix}" for suffix in _SUFFIXES]
            self._keys[key] = keys
        return keys

    def _run(self, keys: list[str], op: str, now: float, args: dict[str, Any]) -> dict[str, Any]:
        argv = [op, repr(float(now)), self._maxlen, _dumps(args)]
        with mapped_errors(self.url, op):
            raw = self._invoke(keys, argv)
        result: dict[str, Any] = json.loads(raw)
        if "err" in result:
            if result["err"] == "agent":
                raise UnknownAgent(agent_name(args["agent"]) or "", result["n"])
            raise KeyError(result["key"])
        return result

    def _invoke(self, keys: list[str], argv: list[str]) -> Any:
        """One call of the Lua program: FCALL, loading the library first if the server lacks it."""
        import redis

        if self._functions:
            try:
                return self._client.fcall(self._program.name, len(keys), *keys, *argv)
            except redis.ResponseError as exc:
                if fallback(exc) is None:
                    raise
                try:
                    if fallback(exc) == "load":
                        self._client.function_load(self._program.library, replace=True)
                        return self._client.fcall(self._program.name, len(keys), *keys, *argv)
                except redis.ResponseError as again:
                    if fallback(again) != "eval":
                        raise
                self._functions = False
        return self._script(keys=keys, args=argv)

    def _chain_op(self, op: str, chain: tuple[str, ...], agent: str | None, now: float, **args: Any) -> dict[str, Any]:
        return self._run(
            self._family_keys(chain[0]), op, now, {"chain": list(chain), "agent": agent_key(agent), **args}
        )

    # -- the Store Protocol -----------------------------------------------------------------

    def ensure_budget(self, key: str, name: str, limits: Limits, now: float) -> None:
        base = ["" if v is None else str(v) for v in limits.as_vector()]
        window = limits.window_seconds
        self._run(self._family_keys(key), "ensure_budget", now, {
            "key": key, "name": name, "base": base, "warn": [repr(float(t)) for t in limits.warn_at],
            "win": "" if window is None else str(window),
        })  # fmt: skip

    def ensure_agent(self, key: str, contract: AgentContract, *, replace: bool) -> AgentContract | None:
        from budgetary.core._units import TOTAL

        allocation, reserve = contract.store_units()
        unit = None if contract.unit is None else TOTAL if contract.unit == "tokens" else COST
        threshold = contract.confidence_threshold
        self._run(self._family_keys(key), "ensure_agent", 0.0, {
            "key": key, "agent": agent_key(contract.name), "p": str(contract.priority),
            "un": "" if unit is None else str(unit), "al": str(allocation or 0), "mr": str(reserve),
            "th": "" if threshold is None else repr(float(threshold)), "replace": replace,
        })  # fmt: skip
        return None

    def has_agent(self, key: str, agent: str | None) -> bool:
        if agent is None:
            return True
        return bool(self._run(self._family_keys(key), "has_agent", 0.0, {"key": key, "agent": agent_key(agent)})["ok"])

    def check(self, chain: tuple[str, ...], agent: str | None, now: float) -> Decision:
        return _decision(self._chain_op("check", chain, agent, now)["d"], agent)

    def reserve(
        self, chain: tuple[str, ...], agent: str | None, req: Vector, *, gate: bool, hold_id: str, ttl: float,
        now: float, meta: Meta, quiet: bool = False,
    ) -> Outcome:  # fmt: skip
        result = self._chain_op(
            "reserve", chain, agent, now, req=[str(v) for v in req], gate=gate, id=hold_id, ttl=repr(float(ttl)),
            quiet=quiet, x=meta_json(meta.run_id, meta.model, meta.location),
        )  # fmt: skip
        decision = _decision(result["d"], agent)
        if decision.allowed:
            with self._lock:
                self._hold_keys[hold_id] = self._family_keys(chain[0])
        return Outcome(decision=decision, moved=int(result.get("mv", 0)))

    def settle(
        self, chain: tuple[str, ...], agent: str | None, hold_id: str | None, actual: Vector, *, now: float,
        meta: Meta, estimated: bool = False, cost_known: bool = True, usage: Usage | None = None,
    ) -> Outcome:  # fmt: skip
        shown = usage if usage is not None else _usage_of(actual, cost_known)
        if cost_known and shown.cost_usd is None:
            shown = shown.with_cost(nanos_to_usd(actual[COST]))
        cost = shown.cost_usd if cost_known else None
        template = LedgerEntry(
            id=0, time=now, budget="", agent=agent, kind="llm", model=meta.model, usage=shown, cost_usd=cost,
            estimated=estimated, run_id=meta.run_id, location=meta.location, scopes=chain,
        )  # fmt: skip
        fields = template.to_dict()
        x = _dumps({k: fields[k] for k in _LLM_FIELDS})
        result = self._chain_op("settle", chain, agent, now, id=hold_id or "", act=[str(v) for v in actual], x=x)
        if hold_id:
            with self._lock:
                self._hold_keys.pop(hold_id, None)
        entry = replace(template, id=int(result["id"]), budget=result["rn"])
        events = [_soft(e, agent) for e in _items(result["ev"])]
        return Outcome(events=events, moved=int(result["mv"]), entry=entry)

    def release(self, hold_id: str, *, now: float, reason: str) -> bool:
        with self._lock:
            keys = self._hold_keys.pop(hold_id, None)
        if keys is None:
            return False
        return bool(self._run(keys, "release", now, {"id": hold_id, "reason": reason})["ok"])

    def renew(self, hold_id: str, ttl: float, now: float) -> bool:
        with self._lock:
            keys = self._hold_keys.get(hold_id)
        if keys is None:
            return False
        return bool(self._run(keys, "renew", now, {"id": hold_id, "ttl": repr(float(ttl))})["ok"])

    def held_amounts(self, hold_id: str) -> Vector | None:
        with self._lock:
            keys = self._hold_keys.get(hold_id)
        if keys is None:
            return None
        held = self._run(keys, "held", 0.0, {"id": hold_id}).get("m")
        return None if held is None else [int(v) for v in held]

    def begin_agent(self, chain: tuple[str, ...], agent: str | None, *, now: float, meta: Meta) -> Decision:
        x = meta_json(meta.run_id, meta.model, meta.location)
        return _decision(self._chain_op("begin_agent", chain, agent, now, x=x)["d"], agent)

    def count_tool(self, chain: tuple[str, ...], agent: str | None, tool: str, *, now: float, meta: Meta) -> Decision:
        x = meta_json(meta.run_id, None, tool)
        return _decision(self._chain_op("count_tool", chain, agent, now, x=x)["d"], agent)

    def reallocate(self, chain: tuple[str, ...], agent: str | None, shortfall: int, *, now: float, meta: Meta) -> int:
        x = meta_json(meta.run_id, meta.model, meta.location)
        return int(self._chain_op("reallocate", chain, agent, now, short=str(shortfall), x=x)["mv"])

    def set_confidence(self, chain: tuple[str, ...], agent: str | None, value: float, now: float) -> None:
        self._chain_op("set_confidence", chain, agent, now, v=repr(float(value)))

    def top_up(self, key: str, amounts: Vector, now: float) -> None:
        self._run(self._family_keys(key), "top_up", now, {"key": key, "amt": [str(v) for v in amounts]})

    def record_entry(
        self, chain: tuple[str, ...], agent: str | None, kind: str, *, now: float, meta: Meta,
        decision: Decision | None = None, reason: str | None = None,
    ) -> None:  # fmt: skip
        x = json.dumps({
            "model": meta.model, "resource": None if decision is None else decision.resource,
            "reason": reason if reason is not None else None if decision is None else decision.reason,
            "run_id": meta.run_id, "location": meta.location,
        }, ensure_ascii=False)  # fmt: skip
        self._chain_op("note", chain, agent, now, kind=kind, x=x)

    def _levels(self, chain: tuple[str, ...], now: float) -> list[Level]:
        result = self._run(self._family_keys(chain[0]), "figures", now, {"chain": list(chain)})
        return [level_from_doc(doc) for doc in _items(result["lv"])]

    def figures(self, chain: tuple[str, ...], now: float) -> list[LevelFigures]:
        return [
            LevelFigures(lv.key, lv.name, lv.limits, lv.spent, lv.held, lv.window_start, lv.window)
            for lv in self._levels(chain, now)
        ]

    def agents(self, key: str, now: float) -> dict[str | None, AgentState]:
        return self._levels((key,), now)[0].agents

    def entries(self, scope: str) -> list[LedgerEntry]:
        with mapped_errors(self.url, "entries"):
            records = self._client.lrange(self._family_keys(scope)[3], 0, -1)
        out = []
        for raw in records:
            entry = _entry(json.loads(raw))
            if scope in entry.scopes:
                out.append(entry)
        return out

    def close(self) -> None:
        if self._owns_client:
            with mapped_errors(self.url, "close"):
                self._client.close()

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
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


def _entry(rec: dict[str, Any]) -> LedgerEntry:
    """A ledger record the script wrote, as the entry the engine would have made."""
    kind = rec["k"]
    agent = agent_name(rec["a"])
    x = json.loads(rec["x"]) if "x" in rec else {}
    data: dict[str, Any] = {
        "id": rec["i"], "time": rec["t"], "budget": rec["b"], "scopes": _items(rec["c"]), "agent": agent,
        "kind": kind, "run_id": x.get("run_id"), "location": x.get("location"),
    }  # fmt: skip
    if kind == "llm":
        data.update({k: x.get(k) for k in _LLM_FIELDS})
    elif kind == "release":
        amounts = [int(v) for v in _items(rec["m"])]
        return replace(LedgerEntry.from_dict(data), model=x.get("model"), usage=_usage_of(amounts), reason=rec.get("r"))
    elif kind == "transfer":
        unit, amount = int(rec["u"]), int(rec["am"])
        donor = agent_name(rec["dn"])
        shown = user_value(unit, amount)
        data.update(donor=donor, amount=str(shown), reason=f"reallocated {shown} {_unit_name(unit)} from {donor!r}")
    elif "e" in rec:
        decision: Decision = _soft(rec["e"], agent) if kind == "soft_limit" else _decision(rec["e"], agent)
        data.update(resource=decision.resource, reason=decision.reason)
        if kind == "deny":
            data["model"] = x.get("model")
    elif kind not in ("agent_start", "tool"):
        data.update(model=x.get("model"), resource=x.get("resource"), reason=x.get("reason"))
    return LedgerEntry.from_dict(data)
