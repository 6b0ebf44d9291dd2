"""SQLite specifics: URLs, error mapping, one file shared by threads and by store handles."""

from __future__ import annotations

import sqlite3
from pathlib import Path

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
    ],
)
def test_urls_follow_the_sqlalchemy_convention(url: str, path: str) -> None:
    assert sqlite_path(url) == path


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite:///file:x?mode=memory"])
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
