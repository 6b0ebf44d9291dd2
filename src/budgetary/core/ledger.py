"""The append-only ledger: every charge, transfer, refusal and skip, in order."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from budgetary.core._units import nanos_to_usd
from budgetary.core.usage import Usage

if TYPE_CHECKING:
    from budgetary.core.stores.base import Store

__all__ = ["KINDS", "Ledger", "LedgerEntry", "csv_text", "jsonl_text", "read_csv", "read_jsonl"]

KINDS = ("llm", "tool", "agent_start", "transfer", "skip", "deny", "soft_limit", "release")
"""Entry kinds. Only ``llm``, ``tool`` and ``agent_start`` entries consume budget."""

_USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
_TEXT_FIELDS = ("agent", "model", "run_id", "location", "resource", "reason", "donor")
"""The optional text fields: ``None`` or a string, possibly empty."""
_CSV_FIELDS = (
    "id", "time", "budget", "agent", "kind", "model", *_USAGE_FIELDS, "total_tokens", "cost_usd",
    "estimated", "run_id", "location", "resource", "reason", "donor", "amount", "scopes",
    "usage_cost_usd", "empty_strings",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)  # no slots: see `_fast`
class LedgerEntry:
    """One line of the ledger.

    Example:
        ```python
        for e in budget.ledger.history(agent="writer"):
            print(e.kind, e.model, e.usage.total_tokens if e.usage else "", e.cost_usd, e.estimated)
        ```
    """

    id: int
    """Position in the store's ledger (increasing)."""
    time: float
    """Seconds since the epoch (the budget's clock)."""
    budget: str
    """Name of the budget the entry was charged to (its ancestors were charged too)."""
    agent: str | None
    """The agent; ``None`` is the run itself."""
    kind: str
    """One of `KINDS`."""
    model: str | None = None
    usage: Usage | None = None
    """What the call consumed (``llm`` entries), or what a released hold had held."""
    cost_usd: Decimal | None = None
    """What was charged in USD; ``None`` when the model has no known price."""
    estimated: bool = False
    """True when the usage is the pre-call estimate, not what the provider reported."""
    run_id: str | None = None
    location: str | None = None
    """Where in the framework: a node, a task, a tool name."""
    resource: str | None = None
    """For ``deny``/``soft_limit``: the resource named by the decision."""
    reason: str | None = None
    donor: str | None = None
    """For ``transfer``: the agent the allocation came from (``agent`` received it)."""
    amount: int | Decimal | None = None
    """For ``transfer``: tokens or USD moved."""
    scopes: tuple[str, ...] = ()
    """The budget and its ancestors, innermost first."""

    @classmethod
    def _fast(cls, fields: dict[str, Any]) -> LedgerEntry:
        """Build an entry from trusted engine values, setting only the non-default fields.

        The engine writes one entry per call; filling the instance dict directly costs
        a fraction of the generated frozen ``__init__``. Unset fields read the class defaults.
        Instead of ``usage`` and ``cost_usd``, ``fields`` may hold ``_unpriced``: a usage
        without cost and the cost in nano-dollars, priced when either field is first read
        (most entries are never read, and the `Decimal` is a tenth of a call's cost).
        """
        entry = object.__new__(cls)
        object.__setattr__(entry, "__dict__", fields)  # takes ownership of ``fields``
        return entry

    if not TYPE_CHECKING:  # keeps attribute typos visible to type checkers

        def __getattr__(self, name: str) -> Any:
            # Only reached for the two lazy fields (their class defaults are deleted below).
            if name != "usage" and name != "cost_usd":
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
            pending = self.__dict__.get("_unpriced")
            if pending is None:
                return None
            usage, nanos = pending
            cost = nanos_to_usd(nanos)
            # Idempotent, so concurrent first reads agree.
            self.__dict__.update(cost_usd=cost, usage=usage.with_cost(cost))
            return self.__dict__[name]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (Decimals as strings)."""
        return {
            "id": self.id,
            "time": self.time,
            "budget": self.budget,
            "agent": self.agent,
            "kind": self.kind,
            "model": self.model,
            "usage": None if self.usage is None else _usage_dict(self.usage),
            "cost_usd": None if self.cost_usd is None else str(self.cost_usd),
            "estimated": self.estimated,
            "run_id": self.run_id,
            "location": self.location,
            "resource": self.resource,
            "reason": self.reason,
            "donor": self.donor,
            "amount": None if self.amount is None else str(self.amount),
            "scopes": list(self.scopes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LedgerEntry:
        """Inverse of `to_dict`."""
        usage = data.get("usage")
        amount = data.get("amount")
        return cls(
            id=int(data["id"]),
            time=float(data["time"]),
            budget=data["budget"],
            agent=data.get("agent"),
            kind=data["kind"],
            model=data.get("model"),
            usage=None if usage is None else _usage_from_dict(usage),
            cost_usd=None if data.get("cost_usd") in (None, "") else Decimal(data["cost_usd"]),
            estimated=bool(data.get("estimated", False)),
            run_id=data.get("run_id"),
            location=data.get("location"),
            resource=data.get("resource"),
            reason=data.get("reason"),
            donor=data.get("donor"),
            amount=None if amount in (None, "") else _number(str(amount)),
            scopes=tuple(data.get("scopes") or ()),
        )


# The generated __init__ keeps its own defaults; without these class attributes, reading an
# unset ``usage``/``cost_usd`` reaches `LedgerEntry.__getattr__`, which prices it lazily.
del LedgerEntry.usage, LedgerEntry.cost_usd


def _usage_dict(usage: Usage) -> dict[str, Any]:
    out: dict[str, Any] = {name: getattr(usage, name) for name in _USAGE_FIELDS}
    out["cost_usd"] = None if usage.cost_usd is None else str(usage.cost_usd)
    return out


def _usage_from_dict(data: dict[str, Any]) -> Usage:
    cost = data.get("cost_usd")
    return Usage(
        **{name: int(data.get(name) or 0) for name in _USAGE_FIELDS},
        cost_usd=None if cost in (None, "") else Decimal(cost),
    )


def _number(text: str) -> int | Decimal:
    return int(text) if text.lstrip("-").isdigit() else Decimal(text)


class Ledger:
    """A read view of one budget's entries (its own and its child budgets').

    Entries are written by the budget; this object only reads and exports them.
    """

    def __init__(self, store: Store, scope: str, name: str) -> None:
        self._store = store
        self._scope = scope
        self._name = name

    def __iter__(self) -> Iterator[LedgerEntry]:
        return iter(self.history())

    def __len__(self) -> int:
        return len(self.history())

    def history(
        self, agent: str | None = None, *, kind: str | None = None, run_id: str | None = None
    ) -> list[LedgerEntry]:
        """Entries in order, optionally only one agent's, one kind, one run's.

        ``agent=None`` (the default) means every agent; run-level entries are the
        ones whose ``agent`` is ``None``.
        """
        return [
            e
            for e in self._store.entries(self._scope)
            if (agent is None or e.agent == agent)
            and (kind is None or e.kind == kind)
            and (run_id is None or e.run_id == run_id)
        ]

    def to_jsonl(self, target: str | Path | IO[str] | None = None) -> str:
        """Write the entries as JSON lines to ``target`` (a path or text file); return the text."""
        text = jsonl_text(self.history())
        _write(target, text)
        return text

    def to_csv(self, target: str | Path | IO[str] | None = None) -> str:
        """Write the entries as CSV (see `csv_text`) to ``target``; return the text.

        A file object should be opened with ``newline=""``, as the `csv` module asks.
        """
        text = csv_text(self.history())
        _write(target, text)
        return text


def jsonl_text(entries: Iterable[LedgerEntry]) -> str:
    """``entries`` as JSON lines (what `Ledger.to_jsonl` writes; `read_jsonl` reads it back)."""
    return "".join(json.dumps(e.to_dict(), sort_keys=True) + "\n" for e in entries)


def csv_text(entries: Iterable[LedgerEntry]) -> str:
    """``entries`` as CSV (what `Ledger.to_csv` writes; `read_csv` reads back equal entries).

    One row per entry, usage flattened into columns. ``usage_cost_usd`` is the usage's own cost:
    on a priced ``release`` it is the cost the hold had held, while ``cost_usd`` (charged) is blank.
    Text cells are quoted, so line breaks, commas and quotes inside them survive. A blank cell
    means ``None``, except in the text columns that the row's ``empty_strings`` cell names
    (space-separated, e.g. ``agent reason``), where it means the empty string; a spreadsheet
    shows both as a blank cell.
    """
    buffer = io.StringIO()
    buffer.write(",".join(_CSV_FIELDS) + "\n")
    # QUOTE_MINIMAL would leave a lone "\r" unquoted before Python 3.13, and it would read back as a line end.
    writer = csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
    for e in entries:
        usage = e.usage
        counts = (None,) * 6 if usage is None else (*(getattr(usage, n) for n in _USAGE_FIELDS), usage.total_tokens)
        writer.writerow((
            e.id, e.time, e.budget, e.agent, e.kind, e.model, *counts, e.cost_usd, e.estimated, e.run_id,
            e.location, e.resource, e.reason, e.donor, e.amount, json.dumps(list(e.scopes)),
            None if usage is None else usage.cost_usd,
            # A column, not quoting: before 3.12 Python's csv reader reads `""` and a bare blank alike.
            " ".join(name for name in _TEXT_FIELDS if getattr(e, name) == ""),
        ))  # fmt: skip
    return buffer.getvalue()


def read_jsonl(source: str | Path | IO[str]) -> list[LedgerEntry]:
    """Read entries written by `Ledger.to_jsonl`."""
    return [LedgerEntry.from_dict(json.loads(line)) for line in _lines(source) if line.strip()]


def read_csv(source: str | Path | IO[str]) -> list[LedgerEntry]:
    """Read entries written by `Ledger.to_csv` from a path or a text file (opened with ``newline=""``)."""
    if isinstance(source, (str, Path)):
        with open(source, encoding="utf-8", newline="") as file:
            return [_csv_entry(row) for row in csv.DictReader(file)]
    return [_csv_entry(row) for row in csv.DictReader(source)]


def _csv_entry(row: dict[str, str]) -> LedgerEntry:
    empty = (row.get("empty_strings") or "").split()
    text = {name: row.get(name) or ("" if name in empty else None) for name in _TEXT_FIELDS}
    usage = None
    if row.get("input_tokens"):
        # Files written before the ``usage_cost_usd`` column gave the usage the entry's cost.
        cost = row["usage_cost_usd"] if "usage_cost_usd" in row else row.get("cost_usd")
        usage = Usage(**{n: int(row[n] or 0) for n in _USAGE_FIELDS}, cost_usd=Decimal(cost) if cost else None)
    return LedgerEntry(
        id=int(row["id"]),
        time=float(row["time"]),
        budget=row["budget"],
        kind=row["kind"],
        usage=usage,
        cost_usd=Decimal(row["cost_usd"]) if row.get("cost_usd") else None,
        estimated=row.get("estimated") == "True",
        amount=_number(row["amount"]) if row.get("amount") else None,
        scopes=tuple(json.loads(row.get("scopes") or "[]")),
        **text,
    )


def _write(target: str | Path | IO[str] | None, text: str) -> None:
    if target is None:
        return
    if isinstance(target, (str, Path)):
        Path(target).write_text(text, encoding="utf-8", newline="")  # line ends as written, on any OS
    else:
        target.write(text)


def _lines(source: str | Path | IO[str]) -> Iterable[str]:
    if isinstance(source, (str, Path)):
        return Path(source).read_text(encoding="utf-8").splitlines()
    return source.read().splitlines()
