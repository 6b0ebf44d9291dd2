"""SQLite specifics: URLs, error mapping, one file shared by threads and by store handles."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from budgetary import Budget, ConfigurationError, Limits, StoreError
from budgetary.core.stores.sqlite import SQLiteStore, sqlite_path

pytestmark = pytest.mark.filterwarnings("ignore::budgetary.core.prices.UnpricedModelWarning")


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///budget.db", "budget.db"),
        ("sqlite:////var/lib/b.db", "/var/lib/b.db"),
        ("sqlite:///a/b c.db", "a/b c.db"),
        ("sqlite:///a/b%20c.db", "a/b c.db"),
        ("sqlite:////tmp/q%3F%23%25.db", "/tmp/q?#%.db"),
    ],
)
def test_urls_follow_the_sqlalchemy_convention(url: str, path: str) -> None:
    assert sqlite_path(url) == path


@pytest.mark.parametrize("url", ["sqlite:///q.db?mode=ro", "sqlite:///q.db?", "sqlite:///q.db#x"])
def test_urls_take_no_parameters(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match="takes no parameters"):
        Budget(store=url)
    assert list(tmp_path.iterdir()) == []


def test_escapes_that_are_not_utf8_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="not UTF-8"):
        sqlite_path("sqlite:///%ff.db")


def test_a_percent_escaped_url_opens_the_decoded_file_and_the_url_reads_back(tmp_path: Path) -> None:
    budget = Budget(Limits(max_llm_calls=1), name="b", store=f"sqlite:///{tmp_path}/my%20budget.db")
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".db"] == ["my budget.db"]
    budget.store.close()
    store = SQLiteStore(tmp_path / "50%?#.db")
    assert sqlite_path(store.url) == store.path
    store.close()


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="is a directory"):
        SQLiteStore(tmp_path)
    with pytest.raises(ConfigurationError, match="is a directory"):
        Budget(store=f"sqlite:///{tmp_path}/sub/")
    assert list(tmp_path.iterdir()) == []


def test_reading_a_missing_file_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from budgetary.cli import main

    path = tmp_path / "b.db"
    store = SQLiteStore(path)
    with pytest.raises(KeyError):
        store.figures(('["b"]',), time.time())
    with pytest.raises(KeyError):
        store.agents('["b"]', time.time())
    assert store.entries('["b"]') == []
    for command in (["report", "b"], ["ledger", "b"], ["top-up", "b", "--llm-calls", "1"]):
        assert main(["--store", f"sqlite:///{path}", *command]) == 1
        assert "no budget 'b'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    budget = Budget(Limits(max_llm_calls=1), name="b", store=store)  # the first write creates the file
    assert path.exists() and budget.snapshot().llm_calls == 0
    assert main(["--store", f"sqlite:///{path}", "report", "b"]) == 0
    store.close()


@pytest.mark.parametrize(
    "url", ["sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite:///%3Amemory%3A", "sqlite:///file:x?mode=memory"]
)
def test_urls_without_a_file_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="SQLite store URL"):
        sqlite_path(url)


def test_missing_directory_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        SQLiteStore(tmp_path / "nope" / "b.db")


def test_a_broken_file_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="SQLite store") as info:
        SQLiteStore(path)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


def test_a_failure_inside_an_operation_rolls_it_back(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "b.db")
    budget = Budget(Limits(max_llm_calls=3), name="b", store=store)
    conn = sqlite3.connect(tmp_path / "b.db")
    conn.execute("DROP TABLE entry_scopes")  # the ledger write at the end of the transaction will fail
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="no such table"):
        budget.record(None, {"input_tokens": 1, "output_tokens": 1}, model="m")
    assert budget.snapshot().llm_calls == 0  # the counters were rolled back with the failed ledger write
    store.close()


def test_synchronous_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="synchronous"):
        SQLiteStore(tmp_path / "b.db", synchronous="OFF")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"synchronous": 1}, "SQLiteStore synchronous must be 'NORMAL' or 'FULL', got 1"),
        ({"timeout": "30"}, "SQLiteStore timeout must be a number of seconds >= 0, got '30'"),
        ({"timeout": -1}, "SQLiteStore timeout must be a number of seconds >= 0, got -1"),
        ({"timeout": float("nan")}, "SQLiteStore timeout must be a number of seconds >= 0, got nan"),
        ({"timeout": True}, "SQLiteStore timeout must be a number of seconds >= 0, got True"),
    ],
)
def test_bad_options_fail_at_construction(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    # Not an AttributeError at construction, nor a TypeError from sqlite3 at the first operation.
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        SQLiteStore(tmp_path / "b.db", **kwargs)


def _reserve_in_child(budget: Budget, ids: Any) -> None:
    ids.put(budget.reserve(prompt_tokens=1, max_output_tokens=1).hold_id)


def test_a_forked_child_makes_hold_ids_of_its_own(tmp_path: Any) -> None:
    # Parent and child share the store, so equal hold ids would overwrite each other's holds and
    # leave the held counters up for good.
    import multiprocessing

    budget = Budget(Limits(max_llm_calls=10), name="b", store=f"sqlite:///{tmp_path}/b.db")
    ctx = multiprocessing.get_context("fork")
    ids = ctx.Queue()
    child = ctx.Process(target=_reserve_in_child, args=(budget, ids), daemon=True)
    child.start()
    child_id = ids.get(timeout=30)
    child.join(timeout=30)
    mine = budget.reserve(prompt_tokens=1, max_output_tokens=1)
    assert mine.hold_id != child_id
    assert budget.snapshot().held_llm_calls == 2


def _slow_call_in_child(budget: Budget, started: Any) -> None:
    with budget.llm_call(prompt_tokens=1, max_output_tokens=1) as call:
        started.put(True)
        time.sleep(2.0)  # over three leases long: only renewals keep the hold
        call.settle({"input_tokens": 1, "output_tokens": 1})


def test_a_forked_child_renews_its_own_leases(tmp_path: Any) -> None:
    import multiprocessing

    budget = Budget(Limits(max_llm_calls=10), name="b", store=f"sqlite:///{tmp_path}/b.db", lease_ttl=0.6)
    with budget.llm_call(prompt_tokens=1, max_output_tokens=1) as call:  # the parent's lease keeper runs
        call.settle({"input_tokens": 1, "output_tokens": 1})
    ctx = multiprocessing.get_context("fork")
    started = ctx.Queue()
    child = ctx.Process(target=_slow_call_in_child, args=(budget, started), daemon=True)
    child.start()
    assert started.get(timeout=30) is True
    time.sleep(1.4)  # past two leases
    assert budget.check().allowed  # a store operation: it expires holds whose lease ran out
    assert budget.snapshot().held_llm_calls == 1  # the child's, renewed by the child's own keeper
    child.join(timeout=30)
    assert child.exitcode == 0
    assert (budget.snapshot().llm_calls, budget.snapshot().held_llm_calls) == (2, 0)


def _open_new_files_together(paths: list[str], start: Any, results: Any) -> None:
    for path in paths:
        start.wait(timeout=30)
        try:
            budget = Budget(Limits(max_llm_calls=100), name="b", store=f"sqlite:///{path}")
            budget.reserve(prompt_tokens=10, max_output_tokens=10).settle({"input_tokens": 10, "output_tokens": 5})
            budget.store.close()
        except Exception as exc:  # reported by the parent: a child's traceback would be lost
            results.put(f"{path}: {exc!r}")
        else:
            results.put(None)


@pytest.mark.slow
def test_processes_creating_the_same_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    # The first operations on a new file switch it to WAL and create the tables. Each round starts
    # every process on a new file at the same moment, so that they contend for exactly that.
    import multiprocessing

    processes, rounds = 6, 15
    paths = [str(tmp_path / f"b{i}.db") for i in range(rounds)]
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Barrier(processes), ctx.Queue()
    children = [
        ctx.Process(target=_open_new_files_together, args=(paths, start, results), daemon=True)
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in range(processes * rounds)]
    for child in children:
        child.join(timeout=30)
    assert [o for o in outcomes if o is not None] == []
    assert [child.exitcode for child in children] == [0] * processes
    for path in paths:
        with SQLiteStore(path) as store:
            snap = Budget(Limits(max_llm_calls=100), name="b", store=store).snapshot()
        assert (snap.llm_calls, snap.total_tokens, snap.held_llm_calls) == (processes, 15 * processes, 0)


def test_a_file_locked_for_longer_than_the_timeout_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN EXCLUSIVE")  # no other connection can switch the file to WAL meanwhile
    began = time.monotonic()
    with pytest.raises(StoreError, match=re.escape("OperationalError: database is locked")):
        SQLiteStore(path, timeout=0.3)
    assert 0.3 <= time.monotonic() - began < 5
    other.execute("ROLLBACK")
    with SQLiteStore(path, timeout=0.3) as store:  # the lock is gone: the same file opens
        assert Budget(Limits(max_llm_calls=1), name="b", store=store).snapshot().llm_calls == 0
    other.close()
