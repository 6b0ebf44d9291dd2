"""``budgetary``: a shared budget from any host: its figures, its agents, its ledger, a top-up.

Examples:
    budgetary --store redis://cache:6379/0 report tenant-acme report-42
    budgetary --store sqlite:////var/lib/myapp/budget.db ledger tenant-acme --kind deny --last 20
    BUDGETARY_STORE=redis://cache:6379/0 budgetary ledger tenant-acme --format csv > ledger.csv
    budgetary --store redis://cache:6379/0 top-up tenant-acme report-42 --cost-usd 0.5 --llm-calls 20

A budget is named by its path, outermost first: ``tenant-acme report-42`` is the budget
``report-42`` whose parent is ``tenant-acme``. The CLI never creates a budget; only
``top-up`` changes one (it raises its limits, as `Budget.top_up` does, for example so that a
run paused by a LangGraph interrupt can be resumed with ``Command(resume={})``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, TextIO

from budgetary.core._units import DIMENSIONS
from budgetary.core.budget import agent_report, figures_snapshot, top_up_vector
from budgetary.core.errors import BudgetError, ConfigurationError
from budgetary.core.ledger import KINDS, Ledger, LedgerEntry, csv_text, jsonl_text
from budgetary.core.snapshot import Snapshot
from budgetary.core.stores import Store, open_store
from budgetary.core.stores.base import REDIS_URL_SCHEMES

__all__ = ["main"]


def _open(url: str, key_prefix: str | None) -> Store:
    if url.startswith(REDIS_URL_SCHEMES):
        from budgetary.core.stores.redis import RedisStore

        # A read may write (release entries of expired leases) through the script that trims the
        # ledger: ledger_max_len=0 leaves the length to the application that keeps the budget.
        if key_prefix is None:
            return RedisStore(url, ledger_max_len=0)
        return RedisStore(url, key_prefix=key_prefix, ledger_max_len=0)
    if key_prefix is not None:
        raise ConfigurationError("--key-prefix applies to Redis stores only")
    return open_store(url)


def _chain(path: Sequence[str]) -> tuple[str, ...]:
    """Store keys of the budget at ``path`` and its parents, innermost first (as `Budget` builds them)."""
    return tuple(json.dumps(list(path[:n]), ensure_ascii=False) for n in range(len(path), 0, -1))


def _rows(table: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        out.write("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                            enumerate(zip(row, widths, strict=True))).rstrip() + "\n")  # fmt: skip


def _figure(spent: Any, limit: Any) -> str:
    return f"{spent}" if limit is None else f"{spent} / {limit}"


def _print_snapshot(snap: Snapshot, path: Sequence[str], out: TextIO) -> None:
    level: Snapshot | None = snap
    names = list(path)
    while level is not None:
        lim = level.limits
        out.write(f"budget {'/'.join(names)}")
        if level.exhausted_resources:
            out.write(f"  (exhausted: {', '.join(level.exhausted_resources)})")
        if level.window_resets_at is not None:
            resets = datetime.fromtimestamp(level.window_resets_at, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            out.write(f"  (window resets {resets})")
        out.write("\n")
        _rows([
            ["", "spent / limit", "held"],
            ["input tokens", _figure(level.input_tokens, lim.max_input_tokens), ""],
            ["output tokens", _figure(level.output_tokens, lim.max_output_tokens), ""],
            ["total tokens", _figure(level.total_tokens, lim.max_total_tokens), str(level.held_tokens)],
            ["cost USD", _figure(level.cost_usd, lim.max_cost_usd), str(level.held_cost_usd)],
            ["LLM calls", _figure(level.llm_calls, lim.max_llm_calls), str(level.held_llm_calls)],
            ["tool calls", _figure(level.tool_calls, lim.max_tool_calls), ""],
            ["agents started", _figure(level.agents_started, lim.max_agents), ""],
        ], out)  # fmt: skip
        if level.unpriced_calls:
            out.write(f"  {level.unpriced_calls} call(s) of models without a known price: cost unknown\n")
        level = level.parent
        names.pop()
        if level is not None:
            out.write("\n")


def _report(store: Store, path: Sequence[str], out: TextIO) -> None:
    chain, now = _chain(path), time.time()
    _print_snapshot(figures_snapshot(store.figures(chain, now)), path, out)
    agents = agent_report(store.agents(chain[0], now))
    if agents:
        out.write("\n")
        columns = ("allocated", "consumed", "remaining")
        table = [["agent", *columns]]
        table += [[name, *("-" if row[c] is None else str(row[c]) for c in columns)] for name, row in agents.items()]
        _rows(table, out)


def _ledger(store: Store, path: Sequence[str], args: argparse.Namespace, out: TextIO) -> None:
    chain = _chain(path)
    store.figures(chain, time.time())  # an unknown budget fails here, not as an empty ledger
    entries = Ledger(store, chain[0], path[-1]).history(args.agent, kind=args.kind)
    if args.last is not None:
        entries = entries[-args.last :] if args.last > 0 else []
    if args.format == "jsonl":
        out.write(jsonl_text(entries))
    elif args.format == "csv":
        out.write(csv_text(entries))
    else:
        _rows([["id", "time (UTC)", "kind", "agent", "where", "model", "tokens", "cost USD", "note"]]
              + [_entry_row(e) for e in entries], out)  # fmt: skip


def _top_up(store: Store, path: Sequence[str], args: argparse.Namespace, out: TextIO) -> None:
    amounts = {name: getattr(args, name) for name in DIMENSIONS if getattr(args, name) is not None}
    if not amounts:
        raise ConfigurationError("top-up needs an amount, e.g. --total-tokens 5000 or --cost-usd 0.5")
    vector = top_up_vector(amounts)  # checks every amount before anything changes
    chain = _chain(path)
    limits = figures_snapshot(store.figures(chain, time.time())).limits  # an unknown budget fails here
    unlimited = [name for name in amounts if getattr(limits, f"max_{name}") is None]
    if unlimited:  # raising a limit the budget does not set would change nothing: say so, not exit 0 silently
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in unlimited)
        message = f"budget {path[-1]!r} sets no limit on {', '.join(unlimited)}: {flags} would change nothing there"
        if len(unlimited) == len(amounts):
            raise ConfigurationError(f"{message} (top up the budget that sets it)")
        print(f"budgetary: {message}; raising the others", file=sys.stderr)
    store.top_up(chain[0], vector, time.time())
    _report(store, path, out)


def _entry_row(e: LedgerEntry) -> list[str]:
    when = datetime.fromtimestamp(e.time, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    tokens = "" if e.usage is None else str(e.usage.total_tokens)
    cost = "" if e.cost_usd is None else str(e.cost_usd)
    note = e.reason or e.resource or ""
    if e.estimated:
        note = f"estimated {note}".strip()
    return [str(e.id), when, e.kind, e.agent or "-", e.location or "", e.model or "", tokens, cost, note]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="budgetary", description="Read a shared budget: figures, agents, ledger.")
    parser.add_argument(
        "--store", default=os.environ.get("BUDGETARY_STORE"),
        help="store URL (sqlite:///path.db, redis://host:6379/0); default: $BUDGETARY_STORE",
    )  # fmt: skip
    parser.add_argument("--key-prefix", help="Redis key prefix the application uses (default: budgetary:)")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="the budget's figures and limits, its parents', and its agents")
    report.add_argument("budget", nargs="+", help="the budget's path, outermost first (tenant run)")
    ledger = commands.add_parser("ledger", help="the budget's ledger entries (its own and its child budgets')")
    ledger.add_argument("budget", nargs="+", help="the budget's path, outermost first (tenant run)")
    ledger.add_argument("--agent", help="only this agent's entries")
    ledger.add_argument("--kind", choices=KINDS, help="only entries of this kind")
    ledger.add_argument("--last", type=int, help="only the last N entries")
    ledger.add_argument("--format", choices=("table", "jsonl", "csv"), default="table")
    top_up = commands.add_parser("top-up", help="raise the budget's limits by these amounts, then report")
    top_up.add_argument("budget", nargs="+", help="the budget's path, outermost first (tenant run)")
    for name in DIMENSIONS:
        top_up.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="N", help=f"add N to max_{name}")
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status (0, or 1 with a message on stderr)."""
    args = _parser().parse_args(argv)
    out = out if out is not None else sys.stdout
    if not args.store:
        print("budgetary: give --store URL (or set BUDGETARY_STORE)", file=sys.stderr)
        return 2
    if args.store.startswith("memory:"):
        print("budgetary: a memory:// store lives inside one process; point --store at SQLite or Redis",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        store = _open(args.store, args.key_prefix)
    except BudgetError as exc:
        print(f"budgetary: {exc}", file=sys.stderr)
        return 1
    try:
        if args.command == "report":
            _report(store, args.budget, out)
        elif args.command == "ledger":
            _ledger(store, args.budget, args, out)
        else:
            _top_up(store, args.budget, args, out)
    except BrokenPipeError:  # `budgetary ledger ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyError:
        print(f"budgetary: no budget {'/'.join(args.budget)!r} in {store.url} (a child budget is named by its "
              "path, outermost first: tenant-acme report-42)", file=sys.stderr)  # fmt: skip
        return 1
    except BudgetError as exc:
        print(f"budgetary: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
