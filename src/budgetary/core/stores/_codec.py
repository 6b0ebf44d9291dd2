"""Engine state as JSON documents, shared by the SQLite store (Python) and the Redis store (Lua).

Every integer is written as a decimal string and every float as its Python
``repr``: Lua's JSON library keeps only 14 significant digits of a number,
and a string survives any reader unchanged. ``None`` is the empty string.
Agents are a list (JSON objects lose their order; reports keep insertion
order); the run's own agent (``None``) has the key ``"n"`` and a named agent
``"a:" + name``, so no name can collide with it.

Soft-limit thresholds already fired are strings: ``"<dim>|<t>"`` for a
level's limit and ``"a|<agent key>|<t>"`` for an agent's allocation, where
``<t>`` is the ``warn_at`` fraction exactly as written in the document.
"""

from __future__ import annotations

import json
from typing import Any

from budgetary.core._engine import WIDTH, AgentState, Hold, Level

# Built once: json.dumps with options builds a new encoder per call, and this runs on every call.
_meta_encode = json.JSONEncoder(ensure_ascii=False).encode

__all__ = [
    "agent_key",
    "agent_name",
    "hold_from_doc",
    "hold_to_doc",
    "level_from_doc",
    "level_to_doc",
    "meta_json",
]


def agent_key(agent: str | None) -> str:
    """The document key of ``agent`` (``None`` is the run itself)."""
    return "n" if agent is None else "a:" + agent


def agent_name(key: str) -> str | None:
    """Inverse of `agent_key`."""
    return None if key == "n" else key[2:]


def _ints(values: Any, width: int = WIDTH) -> list[int]:
    out = [int(v) for v in _list(values)]
    return out + [0] * (width - len(out))


def _opt_int(value: str) -> int | None:
    return None if value == "" else int(value)


def _opt_float(value: str) -> float | None:
    return None if value == "" else float(value)


def _str(value: float | None) -> str:
    return "" if value is None else repr(value)


def _list(value: Any) -> list[Any]:
    # Lua's cjson writes an empty table as {}; an empty list is what was meant.
    return value if isinstance(value, list) else []


def _fired_to_str(key: tuple[Any, ...]) -> str:
    if key[0] == "allocation":
        return f"a|{agent_key(key[1])}|{key[2]!r}"
    return f"{key[0]}|{key[1]!r}"


def _fired_from_str(text: str) -> tuple[Any, ...]:
    head, _, t = text.rpartition("|")
    if head.startswith("a|"):
        return ("allocation", agent_name(head[2:]), float(t))
    return (int(head), float(t))


def _agent_to_doc(name: str | None, s: AgentState) -> dict[str, Any]:
    return {
        "k": agent_key(name),
        "p": str(s.priority),
        "un": "" if s.unit is None else str(s.unit),
        "al": str(s.allocated),
        "mr": str(s.min_reserve),
        "th": _str(s.threshold),
        "c": _str(s.confidence),
        "s": [str(v) for v in s.spent],
        "h": [str(v) for v in s.held],
    }


def _agent_from_doc(doc: dict[str, Any]) -> AgentState:
    return AgentState(
        priority=int(doc["p"]),
        unit=_opt_int(doc["un"]),
        allocated=int(doc["al"]),
        min_reserve=int(doc["mr"]),
        threshold=_opt_float(doc["th"]),
        confidence=_opt_float(doc["c"]),
        spent=_ints(doc["s"]),
        held=_ints(doc["h"]),
    )


def level_to_doc(level: Level) -> str:
    """Serialize a level (limits, counters, fired thresholds, agents) to JSON."""
    return json.dumps(
        {
            "k": level.key,
            "n": level.name,
            "b": ["" if v is None else str(v) for v in level.base],
            "w": [repr(float(t)) for t in level.warn_at],
            "win": "" if level.window is None else str(level.window),
            "u": [str(v) for v in level.topup],
            "s": [str(v) for v in level.spent],
            "h": [str(v) for v in level.held],
            "f": sorted(_fired_to_str(k) for k in level.fired),
            "ws": repr(float(level.window_start)),
            "ag": [_agent_to_doc(name, s) for name, s in level.agents.items()],
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def level_from_doc(text: str | bytes) -> Level:
    """Inverse of `level_to_doc` (also reads documents the Lua scripts wrote)."""
    doc = json.loads(text)
    level = Level(
        key=doc["k"],
        name=doc["n"],
        base=[_opt_int(v) for v in _list(doc["b"])],
        warn_at=tuple(float(t) for t in _list(doc["w"])),
        window=_opt_int(doc["win"]),
        topup=_ints(doc["u"]),
        spent=_ints(doc["s"]),
        held=_ints(doc["h"]),
        fired={_fired_from_str(f) for f in _list(doc["f"])},
        window_start=float(doc["ws"]),
    )
    level.agents = {agent_name(a["k"]): _agent_from_doc(a) for a in _list(doc["ag"])}
    return level


def meta_json(run_id: str | None, model: str | None, location: str | None) -> str:
    """What a ledger entry records besides the numbers, as JSON."""
    return _meta_encode({"run_id": run_id, "model": model, "location": location})


def hold_to_doc(hold: Hold) -> str:
    """Serialize a hold (a lease on budget for one call in flight)."""
    return json.dumps(
        {
            "c": list(hold.chain),
            "a": agent_key(hold.agent),
            "m": [str(v) for v in hold.amounts],
            "e": repr(float(hold.expires)),
            "x": meta_json(hold.run_id, hold.model, hold.location),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def hold_from_doc(hold_id: str, text: str | bytes) -> Hold:
    """Inverse of `hold_to_doc`."""
    doc = json.loads(text)
    meta = json.loads(doc["x"])
    return Hold(
        id=hold_id,
        chain=tuple(_list(doc["c"])),
        agent=agent_name(doc["a"]),
        amounts=_ints(doc["m"]),
        expires=float(doc["e"]),
        run_id=meta.get("run_id"),
        model=meta.get("model"),
        location=meta.get("location"),
    )
