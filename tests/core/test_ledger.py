"""SPEC §5: the ledger is append-only, its totals equal the counters, and it exports and reads back."""

from __future__ import annotations

import io
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetary import Budget, BudgetExceeded, Limits, Price, Usage
from budgetary.core.ledger import KINDS, csv_text, read_csv, read_jsonl

MODEL = "gpt-4o-mini"


def _busy_budget() -> Budget:
    budget = Budget(Limits(max_total_tokens=2_000, max_llm_calls=6, max_tool_calls=2, max_agents=3))
    budget.agent("lead", priority=3, max_tokens=500)
    budget.agent("helper", priority=1, max_tokens=1_000)
    budget.begin_agent("lead")
    with budget.llm_call("lead", model=MODEL, prompt_tokens=300, max_output_tokens=400, location="plan") as c:
        c.settle({"input_tokens": 300, "output_tokens": 350, "input_token_details": {"cache_read": 100},
                  "output_token_details": {"reasoning": 40}, "total_tokens": 650})  # fmt: skip
    budget.check_tool("helper", "search")
    budget.skip("helper", "optional summary", location="summarise")
    try:
        with budget.llm_call("helper", model=MODEL, prompt_tokens=5_000, max_output_tokens=10):
            pass
    except BudgetExceeded:
        pass
    with budget.llm_call("helper", model=MODEL, prompt_tokens=10, max_output_tokens=10):
        pass  # forgot to settle: charged as estimated
    return budget


def test_entries_have_every_field_and_increasing_ids():
    budget = _busy_budget()
    entries = budget.ledger.history()
    assert [e.id for e in entries] == sorted(e.id for e in entries)
    assert {e.kind for e in entries} <= set(KINDS)
    llm = budget.ledger.history(kind="llm")[0]
    assert (llm.agent, llm.model, llm.location, llm.budget, llm.run_id) == ("lead", MODEL, "plan", "budget",
                                                                            budget.run_id)  # fmt: skip
    assert llm.usage is not None and llm.usage.cache_read_tokens == 100 and llm.usage.reasoning_tokens == 40
    assert llm.cost_usd is not None and llm.cost_usd > 0 and not llm.estimated
    transfer = budget.ledger.history(kind="transfer")[0]
    assert (transfer.agent, transfer.donor, transfer.amount) == ("lead", "helper", 200)  # hold 700 - 500
    deny = budget.ledger.history(kind="deny")[0]
    assert deny.agent == "helper" and deny.resource == "total_tokens"
    assert budget.ledger.history(kind="skip")[0].location == "summarise"
    assert budget.ledger.history(kind="tool")[0].location == "search"
    assert budget.ledger.history(kind="llm")[-1].estimated


def test_history_filters_by_agent_kind_and_run():
    budget = _busy_budget()
    assert {e.agent for e in budget.ledger.history(agent="lead")} == {"lead"}
    assert len(budget.ledger.history()) > len(budget.ledger.history(agent="lead"))
    assert budget.ledger.history(run_id="someone-else") == []


def test_totals_of_the_entries_equal_the_counters():
    budget = _busy_budget()
    snap = budget.snapshot()
    llm = budget.ledger.history(kind="llm")
    assert sum(e.usage.input_tokens for e in llm) == snap.input_tokens
    assert sum(e.usage.output_tokens for e in llm) == snap.output_tokens
    assert sum(e.cost_usd for e in llm) == snap.cost_usd
    assert len(llm) == snap.llm_calls
    assert len(budget.ledger.history(kind="tool")) == snap.tool_calls
    assert len(budget.ledger.history(kind="agent_start")) == snap.agents_started


def test_jsonl_round_trip(tmp_path):
    budget = _busy_budget()
    path = tmp_path / "ledger.jsonl"
    text = budget.ledger.to_jsonl(path)
    assert path.read_text() == text and text.count("\n") == len(budget.ledger.history())
    assert read_jsonl(path) == budget.ledger.history()
    assert read_jsonl(io.StringIO(text)) == budget.ledger.history()


def test_csv_round_trip(tmp_path):
    budget = _busy_budget()
    path = tmp_path / "ledger.csv"
    budget.ledger.to_csv(path)
    header = path.read_text().splitlines()[0].split(",")
    assert {"input_tokens", "cache_read_tokens", "reasoning_tokens", "cost_usd", "estimated"} <= set(header)
    assert read_csv(path) == budget.ledger.history()


@settings(max_examples=50, deadline=None)
@given(
    calls=st.lists(
        st.tuples(st.integers(0, 3_000), st.integers(0, 3_000), st.integers(0, 100), st.booleans()), max_size=30
    )
)
def test_counters_equal_ledger_totals_whatever_happens(calls):
    budget = Budget(Limits(max_total_tokens=20_000, max_cost_usd="0.01"))
    for inp, out, cached_pct, settle in calls:
        try:
            with budget.llm_call(model=MODEL, prompt_tokens=inp, max_output_tokens=out) as c:
                if settle:
                    c.settle(Usage(input_tokens=inp, output_tokens=out, cache_read_tokens=inp * cached_pct // 100))
        except BudgetExceeded:
            pass
        snap = budget.snapshot()
        llm = budget.ledger.history(kind="llm")
        assert sum(e.usage.total_tokens for e in llm) == snap.total_tokens
        assert sum((e.cost_usd for e in llm), Decimal(0)) == snap.cost_usd
        assert snap.held_tokens == 0
        assert snap.total_tokens <= 20_000


@settings(max_examples=50, deadline=None)
@given(costs=st.lists(st.decimals(min_value=0, max_value=1, places=15) | st.none(), max_size=20))
def test_ledger_costs_equal_the_counters_whatever_a_provider_reports(costs):
    # Provider-reported costs may carry more digits than the nano-dollars the counters keep.
    budget = Budget(Limits(max_cost_usd=100))
    for i, cost in enumerate(costs):
        usage = Usage(input_tokens=i, output_tokens=1, cost_usd=cost)
        if i % 2:
            budget.record(None, usage, model=MODEL)
        else:
            with budget.llm_call(model=MODEL, prompt_tokens=i, max_output_tokens=1) as c:
                c.settle(usage)
    llm = budget.ledger.history(kind="llm")
    assert sum((e.cost_usd for e in llm), Decimal(0)) == budget.snapshot().cost_usd
    assert all(e.cost_usd >= c for e, c in zip(llm, costs, strict=True) if c is not None)


def test_an_llm_entry_prices_its_usage_and_behaves_like_a_plain_entry(tmp_path):
    """Entries price their usage on first read; to the reader they are ordinary frozen dataclasses."""
    import copy
    import dataclasses
    import pickle

    from budgetary import Price
    from budgetary.core.ledger import LedgerEntry
    from budgetary.core.prices import UnpricedModelWarning

    budget = Budget(Limits(max_cost_usd=1), prices={"m": Price(input_mtok="3", output_mtok="15")})
    entry = budget.record(None, Usage(input_tokens=1_000, output_tokens=200), model="m")
    twin = budget.record(None, Usage(input_tokens=1_000, output_tokens=200), model="m")
    expected = Decimal("0.006")  # 1,000 x $3/M + 200 x $15/M
    assert entry.cost_usd == expected
    assert entry.usage is not None and entry.usage.cost_usd == expected
    assert twin.usage == entry.usage and twin.cost_usd == expected  # read in the other order
    assert dataclasses.replace(entry) == entry
    assert pickle.loads(pickle.dumps(entry)) == entry
    assert copy.deepcopy(entry) == entry
    assert LedgerEntry.from_dict(entry.to_dict()) == entry
    assert hash(entry) == hash(dataclasses.replace(entry))
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.cost_usd = Decimal(0)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        entry.no_such_field  # type: ignore[attr-defined]  # noqa: B018
    with pytest.warns(UnpricedModelWarning):
        unpriced = Budget().record(None, Usage(input_tokens=5), model="unknown-model-x")
    assert unpriced.cost_usd is None and unpriced.usage == Usage(input_tokens=5)
    plain = LedgerEntry(id=1, time=0.0, budget="b", agent=None, kind="skip")
    assert plain.usage is None and plain.cost_usd is None


def test_a_bounded_memory_ledger_keeps_the_newest_entries_and_exact_counters() -> None:
    from budgetary.core.stores import MemoryStore

    budget = Budget(Limits(max_total_tokens=1_000), name="daily", store=MemoryStore(ledger_max_len=5))
    budget.agent("worker", max_tokens=800)
    for i in range(12):
        with budget.llm_call("worker", model=MODEL, prompt_tokens=10, max_output_tokens=10) as call:
            call.settle({"input_tokens": 10, "output_tokens": i})
    history = budget.ledger.history()
    assert [e.id for e in history] == [8, 9, 10, 11, 12]
    assert [e.usage.output_tokens for e in history if e.usage] == [7, 8, 9, 10, 11]
    assert budget.snapshot().total_tokens == 120 + sum(range(12))  # counters are never trimmed
    assert budget.report()["worker"]["consumed"] == 120 + sum(range(12))
    assert len(read_jsonl(io.StringIO(budget.ledger.to_jsonl()))) == 5


@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_a_memory_ledger_bound_must_be_a_count(bad: object) -> None:
    from budgetary import ConfigurationError
    from budgetary.core.stores import MemoryStore

    with pytest.raises(ConfigurationError, match="ledger_max_len must be an int >= 0"):
        MemoryStore(ledger_max_len=bad)  # type: ignore[arg-type]


# Text that CSV must carry: line breaks of every kind, separators, quotes, unicode, and the empty
# string (not ``None``). No NUL: Python 3.10's csv writer refuses it.
_TEXT = st.one_of(
    st.sampled_from(["", "line1\nline2", "cr\rinside", "crlf\r\nend", "\n", 'a "quoted", comma', "naïve ☃ 🙂"]),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8),
)
_COUNT = st.integers(0, 3_000)


@st.composite
def _ledger_budgets(draw: st.DrawFn) -> Budget:
    """A budget whose ledger has entries of every kind, built through the public API on the memory store."""
    models = draw(st.lists(_TEXT, min_size=1, max_size=3, unique=True))
    prices = {m: Price(input_mtok="3", output_mtok="15") for m in models if draw(st.booleans())}
    limits = Limits(max_total_tokens=draw(st.integers(1_000, 30_000)), max_cost_usd=draw(st.sampled_from(["0.02", 1])))
    clock = draw(st.floats(0, 4e9))
    budget = Budget(limits, name=draw(_TEXT.filter(bool)), prices=prices, allow_unpriced=True, clock=lambda: clock)
    child = Budget(name=draw(_TEXT.filter(bool)), parent=budget)
    agents = draw(st.lists(_TEXT.filter(bool), min_size=1, max_size=3, unique=True))  # "" is no agent's name
    for level in (budget, child):
        for name in agents:
            if draw(st.booleans()):
                level.agent(name, priority=draw(st.integers(1, 3)), max_tokens=draw(st.integers(50, 5_000)))
            else:
                level.agent(name, priority=draw(st.integers(1, 3)), max_cost_usd=draw(st.sampled_from(["0.001", 1])))
    for _ in range(draw(st.integers(1, 12))):
        level, agent = draw(st.sampled_from((budget, child))), draw(st.sampled_from(agents))
        model, where = draw(st.one_of(st.none(), st.sampled_from(models))), draw(st.one_of(st.none(), _TEXT))
        op = draw(st.sampled_from(("record", "settle", "unsettled", "release", "skip", "tool", "start", "transfer")))
        try:
            if op == "record":
                level.record(agent, Usage(input_tokens=draw(_COUNT), output_tokens=draw(_COUNT)), model=model,
                             estimated=draw(st.booleans()), location=where)  # fmt: skip
            elif op in ("settle", "unsettled", "release"):
                with level.llm_call(agent, model=model, prompt_tokens=draw(_COUNT), max_output_tokens=draw(_COUNT),
                                    location=where) as call:  # fmt: skip
                    if op == "settle":
                        inp = draw(_COUNT)
                        call.settle({"input_tokens": inp, "output_tokens": draw(_COUNT),
                                     "input_token_details": {"cache_read": draw(st.integers(0, inp))}})  # fmt: skip
                    elif op == "release":
                        raise RuntimeError(draw(_TEXT))
            elif op == "skip":
                level.skip(agent, draw(_TEXT), location=where)
            elif op == "tool":
                level.check_tool(agent, draw(_TEXT))
            elif op == "start":
                level.begin_agent(agent, location=where)
            else:
                usd = level.contract(agent).unit == "usd"
                level.reallocate(agent, draw(st.sampled_from(["0.0005", 1] if usd else [100, 1])))
        except (BudgetExceeded, RuntimeError):
            pass
    return budget


@pytest.mark.filterwarnings("ignore::budgetary.core.prices.UnpricedModelWarning")
@settings(max_examples=150, deadline=None)
@given(budget=_ledger_budgets())
def test_csv_reads_back_every_field_of_every_entry(budget: Budget, tmp_path_factory: pytest.TempPathFactory) -> None:
    entries = budget.ledger.history()
    path = tmp_path_factory.mktemp("csv") / "ledger.csv"
    text = budget.ledger.to_csv(path)
    for source in (path, io.StringIO(text)):
        back = read_csv(source)
        assert back == entries  # typed: None is not "", a usage is a `Usage`
        assert [e.to_dict() for e in back] == [e.to_dict() for e in entries]  # Decimals to the digit
    assert read_jsonl(io.StringIO(budget.ledger.to_jsonl())) == entries  # the same bar as JSON lines


def test_csv_keeps_line_breaks_empty_strings_and_held_costs(tmp_path: Path) -> None:
    budget = Budget(Limits(max_cost_usd=1), prices={"": Price(input_mtok="3", output_mtok="15")})
    budget.agent("a", max_tokens=1_000)
    budget.agent("line1\nline2", max_cost_usd="0.5")
    budget.record("a", Usage(input_tokens=10), model="", location="cr\rinside")
    budget.skip("line1\nline2", location='a "quoted",\r\ncomma ☃')  # reason ""
    with pytest.raises(RuntimeError), budget.llm_call("a", model="", prompt_tokens=100, max_output_tokens=100):
        raise RuntimeError("provider down")
    # No agent can be named "" now, but a ledger written before may name one: it must read back as "", not None.
    entries = [replace(e, agent="") if e.agent == "a" else e for e in budget.ledger.history()]
    path = tmp_path / "ledger.csv"
    path.write_text(csv_text(entries), encoding="utf-8", newline="")
    with open(path, encoding="utf-8", newline="") as file:
        assert read_csv(file) == read_csv(path) == entries
    llm, skip, release = read_csv(path)
    assert (llm.agent, llm.model, llm.location, llm.resource) == ("", "", "cr\rinside", None)
    assert (skip.agent, skip.reason, skip.location, skip.model) == ("line1\nline2", "", 'a "quoted",\r\ncomma ☃', None)
    assert release.kind == "release" and release.cost_usd is None
    assert release.usage is not None and release.usage.cost_usd == Decimal("0.0018")  # 100 x $3/M + 100 x $15/M held
    text = path.read_bytes().decode()
    assert text.split("\n")[0].split(",")[-2:] == ["usage_cost_usd", "empty_strings"]
    assert ',"agent model"\n' in text and ',"reason"\n' in text  # a spreadsheet shows "" and None as blank cells


def test_csv_written_before_the_usage_cost_and_empty_string_columns_still_reads() -> None:
    old = (
        "id,time,budget,agent,kind,model,input_tokens,output_tokens,cache_read_tokens,cache_write_tokens,"
        "reasoning_tokens,total_tokens,cost_usd,estimated,run_id,location,resource,reason,donor,amount,scopes\n"
        '1,1.5,budget,lead,llm,m,300,350,100,0,40,650,0.006,False,r1,plan,,,,,"[""[\\""budget\\""]""]"\n'
    )
    (entry,) = read_csv(io.StringIO(old))
    assert (entry.agent, entry.model, entry.location, entry.reason, entry.scopes) == ("lead", "m", "plan", None,
                                                                                     ('["budget"]',))  # fmt: skip
    assert entry.usage == Usage(input_tokens=300, output_tokens=350, cache_read_tokens=100, reasoning_tokens=40,
                                cost_usd=Decimal("0.006"))  # fmt: skip
    assert entry.cost_usd == Decimal("0.006")
