"""The ``budgetary`` command reads a shared budget's figures and ledger from its store, from another process."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from budgetary import Budget, Limits
from budgetary.cli import main
from budgetary.core.ledger import read_csv, read_jsonl


def _spend(store: object) -> Budget:
    day = Budget(Limits(max_cost_usd=5, max_total_tokens=50_000, window="1d"), name="tenant acme", store=store)
    run = Budget(Limits(max_llm_calls=3), name='report "42"', parent=day)
    run.agent("writer", max_tokens=2_000)
    run.agent("critic")
    run.record("writer", {"input_tokens": 500, "output_tokens": 200}, model="gpt-4o-mini")
    with run.llm_call("critic", model="gpt-4o-mini", prompt_tokens=100, max_output_tokens=50) as call:
        call.settle({"input_tokens": 100, "output_tokens": 40})
    run.check_tool("critic", "search")
    return run


def _cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def test_report_shows_each_level_and_the_agents(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    run = _spend(url)
    code, text = _cli("--store", url, "report", "tenant acme", 'report "42"')
    assert code == 0
    lines = text.splitlines()
    assert lines[0] == 'budget tenant acme/report "42"'
    assert any(line.split() == ["LLM", "calls", "2", "/", "3", "0"] for line in lines)
    parent = lines.index(next(line for line in lines if line.startswith("budget tenant acme ")))
    assert "window resets" in lines[parent]
    assert any(line.split() == ["total", "tokens", "840", "/", "50000", "0"] for line in lines[parent:])
    writer = next(line for line in lines if line.startswith("writer"))
    report = run.report()["writer"]
    assert writer.split() == ["writer", str(report["allocated"]), str(report["consumed"]), str(report["remaining"])]
    assert next(line for line in lines if line.startswith("critic")).split() == ["critic", "-", "140", "-"]


def test_ledger_exports_round_trip_and_filter(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    run = _spend(url)
    code, text = _cli("--store", url, "ledger", "tenant acme", "--format", "jsonl")
    assert code == 0
    assert [e.to_dict() for e in read_jsonl(io.StringIO(text))] == [e.to_dict() for e in run.ledger.history()]
    code, text = _cli("--store", url, "ledger", "tenant acme", 'report "42"', "--kind", "llm", "--format", "csv")
    assert [(e.agent, e.usage.total_tokens) for e in read_csv(io.StringIO(text))] == [("writer", 700), ("critic", 140)]
    code, text = _cli("--store", url, "ledger", "tenant acme", "--agent", "critic", "--last", "1")
    rows = text.splitlines()
    assert len(rows) == 2 and rows[1].split()[3:6] == ["tool", "critic", "search"]


def test_an_unknown_ledger_kind_is_refused_not_an_empty_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A typo (`--kind denied`) printed no entries with status 0, as if nothing had been refused.
    url = f"sqlite:///{tmp_path / 'b.db'}"
    _spend(url)
    with pytest.raises(SystemExit) as info:
        _cli("--store", url, "ledger", "tenant acme", "--kind", "denied")
    assert info.value.code == 2
    assert "invalid choice: 'denied'" in capsys.readouterr().err
    code, text = _cli("--store", url, "ledger", "tenant acme", "--kind", "tool")
    assert code == 0 and len(text.splitlines()) == 2  # the header and the one tool call


def test_errors_are_one_line_and_a_nonzero_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    _spend(url)
    assert _cli("--store", url, "report", "no such budget")[0] == 1
    assert "no budget 'no such budget'" in capsys.readouterr().err
    assert _cli("--store", "memory://", "report", "x")[0] == 2
    assert "memory://" in capsys.readouterr().err
    assert _cli("--store", "sqlite:///", "report", "x")[0] == 1


@pytest.mark.redis
def test_the_command_reads_redis_from_another_process(redis_url: str, key_prefix: str) -> None:
    from budgetary.core.stores.redis import RedisStore

    run = _spend(RedisStore(redis_url, key_prefix=key_prefix))
    done = subprocess.run(
        [sys.executable, "-m", "budgetary", "--store", redis_url, "--key-prefix", key_prefix, "ledger",
         "tenant acme", 'report "42"', "--format", "jsonl"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["id"] for line in done.stdout.splitlines()] == [e.id for e in run.ledger.history()]


@pytest.mark.redis
def test_a_report_does_not_trim_a_redis_ledger_the_application_keeps(
    redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from budgetary.core.stores.redis import RedisStore

    store = RedisStore(redis_url, key_prefix=key_prefix, ledger_max_len=0)  # the app keeps every entry
    run = _spend(store)
    dying = Budget(run.parent.limits, name="tenant acme", store=store, lease_ttl=0.05)  # type: ignore[union-attr]
    dying.reserve(model="gpt-4o-mini", prompt_tokens=1)  # and its worker dies: the lease expires
    time.sleep(0.1)
    kept = [e.id for e in run.ledger.history()]
    # A store the command opened with a default length would trim on the write a read makes (the
    # expired lease's release entry): make that default small enough to show.
    monkeypatch.setitem(RedisStore.__init__.__kwdefaults__, "ledger_max_len", 2)
    code, text = _cli("--store", redis_url, "--key-prefix", key_prefix, "report", "tenant acme", 'report "42"')
    assert code == 0, text
    assert [e.id for e in run.ledger.history()][: len(kept)] == kept
    assert [e.kind for e in dying.ledger.history()][-1] == "release"  # the report's write happened


def test_a_key_prefix_needs_a_redis_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("--store", f"sqlite:///{tmp_path / 'b.db'}", "--key-prefix", "x:", "report", "a")[0] == 1
    assert "--key-prefix applies to Redis stores only" in capsys.readouterr().err


def test_top_up_raises_the_named_budgets_limits_and_nothing_else(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    run = _spend(url)
    code, text = _cli("--store", url, "top-up", "tenant acme", 'report "42"', "--llm-calls", "2")
    assert code == 0 and any(line.split() == ["LLM", "calls", "2", "/", "5", "0"] for line in text.splitlines())
    assert run.snapshot().limits.max_llm_calls == 5  # the application sees the raised limit
    assert run.snapshot().parent.limits.max_total_tokens == 50_000  # the parent is untouched
    code, _ = _cli("--store", url, "top-up", "tenant acme", "--total-tokens", "1000", "--cost-usd", "0.5")
    assert code == 0
    day = run.snapshot().parent
    assert day.limits.max_total_tokens == 51_000 and str(day.limits.max_cost_usd) == "5.5"


def test_top_up_of_a_resource_the_budget_sets_no_limit_on_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    run = _spend(url)  # the run limits LLM calls only; its parent, tokens and cost
    before = run.snapshot()
    assert _cli("--store", url, "top-up", "tenant acme", 'report "42"', "--total-tokens", "5000")[0] == 1
    assert "sets no limit on total_tokens: --total-tokens would change nothing there" in capsys.readouterr().err
    assert run.snapshot().limits == before.limits and run.snapshot().parent == before.parent
    code, _ = _cli("--store", url, "top-up", "tenant acme", 'report "42"', "--total-tokens", "5000", "--llm-calls", "1")
    assert code == 0 and "--total-tokens would change nothing there; raising the others" in capsys.readouterr().err
    assert run.snapshot().limits.max_llm_calls == before.limits.max_llm_calls + 1


def test_top_up_refuses_bad_amounts_and_unknown_budgets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    run = _spend(url)
    assert _cli("--store", url, "top-up", "tenant acme")[0] == 1
    assert "needs an amount" in capsys.readouterr().err
    assert _cli("--store", url, "top-up", "tenant acme", "--total-tokens", "1000", "--llm-calls", "-1")[0] == 1
    assert "llm_calls must be >= 0" in capsys.readouterr().err
    assert run.snapshot().parent.limits.max_total_tokens == 50_000  # nothing applied from a refused top-up
    assert _cli("--store", url, "top-up", "elsewhere", "--llm-calls", "1")[0] == 1
    assert _cli("--store", url, "report", "elsewhere")[0] == 1  # and it was not created
