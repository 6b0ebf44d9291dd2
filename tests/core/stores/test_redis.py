"""Redis specifics: error mapping, key layout (one Cluster slot per family), URLs, the bounded ledger."""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
import os
import re
import threading
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest

redis = pytest.importorskip("redis")
from redis import exceptions as redis_exceptions  # noqa: E402
from redis.crc import key_slot  # noqa: E402

from budgetary import Budget, ConfigurationError, Limits, StoreError  # noqa: E402
from budgetary.core.stores import store_from_url  # noqa: E402
from budgetary.core.stores.redis import RedisStore, backend_errors  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::budgetary.core.prices.UnpricedModelWarning")

# Raised for programming mistakes in redis-py itself (pipelines, fork misuse, policies), never by a command.
NOT_COMMAND_ERRORS = {"ChildDeadlockedError", "CrossSlotTransactionError", "IncorrectPolicyType",
                      "InvalidPipelineStack"}  # fmt: skip


def _exception(cls: type[BaseException]) -> BaseException:
    try:
        return cls("boom")
    except (TypeError, ValueError):
        return cls("1 127.0.0.1:7000")  # MovedError, AskError: "<slot> <host:port>"


def test_every_redis_exception_is_a_store_error() -> None:
    classes = [c for _, c in inspect.getmembers(redis_exceptions, inspect.isclass) if issubclass(c, Exception)]
    assert len(classes) > 20
    for cls in classes:
        if cls.__name__ in NOT_COMMAND_ERRORS:
            continue
        assert issubclass(cls, backend_errors()), cls


FAILURES = ["ConnectionError", "TimeoutError", "ResponseError", "NoScriptError", "BusyLoadingError", "ReadOnlyError",
            "OutOfMemoryError", "MovedError", "ClusterDownError"]  # fmt: skip


@pytest.mark.parametrize("name", FAILURES)
def test_failing_commands_raise_store_error(name: str) -> None:
    store = RedisStore("redis://127.0.0.1:1/0", key_prefix="t:")
    error = _exception(getattr(redis_exceptions, name))

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    store._invoke = fail  # type: ignore[method-assign]
    store._client.lrange = fail  # type: ignore[method-assign]
    with pytest.raises(
        StoreError, match=re.escape(f"Redis store redis://127.0.0.1:1/0 failed (ensure_budget): {name}")
    ):
        Budget(Limits(), name="b", store=store)
    with pytest.raises(StoreError) as info:
        store.entries('["b"]')
    assert info.value.__cause__ is error
    with pytest.raises(StoreError):
        store.has_agent('["b"]', "a")


def test_unreachable_server_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="ConnectionError"):
        Budget(Limits(), name="b", store="redis://127.0.0.1:1/0")


@pytest.mark.parametrize("value", [-1, 0, "5", float("nan"), float("inf"), True])
def test_a_bad_socket_timeout_fails_at_construction(value: Any) -> None:
    # It reached the socket layer, which raised a bare ValueError or TypeError at the first operation.
    message = f"RedisStore socket_timeout must be a number of seconds > 0 or None, got {value!r}"
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        RedisStore("redis://127.0.0.1:1/0", socket_timeout=value)


def test_socket_timeout_none_waits_without_a_limit() -> None:
    RedisStore("redis://127.0.0.1:1/0", socket_timeout=None).close()


def test_passwords_are_not_shown() -> None:
    store = RedisStore("redis://user:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in store.url and "s3cret" not in repr(store)


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        ("redis://127.0.0.1:1/abc", "its path must be a DB number"),
        ("redis://127.0.0.1:1/1/2", "its path must be a DB number"),  # redis-py would take DB 12
        ("redis-cluster://127.0.0.1:1/abc", "its path must be a DB number"),  # refused before connecting
        ("redis-cluster://127.0.0.1:1/1", "a Redis Cluster has only DB 0"),  # was a StoreError from connecting
        ("rediss-cluster://127.0.0.1:1/?db=2", "a Redis Cluster has only DB 0"),
        ("redis://127.0.0.1:1/0?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
        ("redis://127.0.0.1:1/0?no_such_option=1", "no_such_option"),
        ("unix:///tmp/no.sock?db=abc", "Invalid value for 'db'"),
        ("redis://127.0.0.1:abc/0", "Port could not be cast"),
        ("redis://[::1/0", "Invalid IPv6 URL"),
    ],
)
def test_malformed_urls_are_configuration_errors(url: str, cause: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(f"Redis store URL {url} is not valid: ") + ".*" + cause):
        Budget(Limits(), name="b", store=url)


def test_a_malformed_url_is_named_without_its_password() -> None:
    for url in ["redis://user:s3cret@127.0.0.1:1/abc", "redis://user:s3cret@[::1/0", "http://user:s3cret@host/0"]:
        with pytest.raises(ConfigurationError) as info:
            RedisStore(url)
        assert "s3cret" not in str(info.value) and "***@" in str(info.value)


def test_an_unreachable_cluster_is_a_store_error_naming_the_url(capsys: pytest.CaptureFixture[str]) -> None:
    from budgetary.cli import main

    with pytest.raises(StoreError, match=re.escape("Redis store redis-cluster://:***@127.0.0.1:1 failed (connect)")):
        Budget(Limits(), name="b", store="redis-cluster://:s3cret@127.0.0.1:1")
    assert main(["--store", "redis-cluster://127.0.0.1:1", "report", "x"]) == 1
    assert capsys.readouterr().err.startswith("budgetary: Redis store redis-cluster://127.0.0.1:1 failed (connect)")


@pytest.mark.redis
def test_a_cluster_url_at_a_server_without_cluster_mode_is_a_store_error(redis_url: str) -> None:
    parts = urlsplit(redis_url)
    url = f"redis-cluster://{parts.hostname}:{parts.port or 6379}"
    with pytest.raises(StoreError, match=re.escape(f"Redis store {url} failed (connect): RedisClusterException")):
        RedisStore(url)


def test_a_client_passed_in_is_named_by_its_address() -> None:
    import redis.asyncio

    assert RedisStore(redis.Redis(host="cache", port=7000, db=3)).url == "redis://cache:7000/3"
    assert RedisStore(redis.Redis(host="cache", ssl=True)).url == "rediss://cache:6379/0"
    assert RedisStore(redis.Redis(unix_socket_path="/run/r.sock", db=2)).url == "unix:///run/r.sock?db=2"
    assert RedisStore(redis.asyncio.Redis(host="cache", ssl=True)).url == "rediss://cache:6379/0"
    # An asyncio cluster client connects on first use: no cluster is needed to name it.
    assert RedisStore(redis.asyncio.RedisCluster(host="node-1", port=7000)).url == "redis-cluster://node-1:7000"
    assert RedisStore(redis.asyncio.RedisCluster(host="node-1", ssl=True)).url == "rediss-cluster://node-1:6379"


@pytest.mark.parametrize("prefix", ["a{b", "a}b"])
def test_key_prefix_must_not_move_the_hash_tag(prefix: str) -> None:
    with pytest.raises(ConfigurationError, match="without braces"):
        RedisStore("redis://127.0.0.1:1/0", key_prefix=prefix)


def test_store_from_url_knows_redis_and_sqlite(tmp_path: Any) -> None:
    assert isinstance(store_from_url("redis://127.0.0.1:1/0"), RedisStore)
    assert isinstance(store_from_url("rediss://127.0.0.1:1/0"), RedisStore)
    with pytest.raises(ConfigurationError, match="in-memory database cannot be shared"):
        store_from_url("sqlite:///:memory:")
    store = store_from_url(f"sqlite:///{tmp_path}/b.db")
    assert store.url == f"sqlite:///{tmp_path}/b.db"
    store.close()


@pytest.mark.redis
def test_family_keys_share_one_slot_and_hostile_names_stay_data(redis_url: str, key_prefix: str) -> None:
    store = RedisStore(redis_url, key_prefix=key_prefix)
    names = ["day", 'day"}{', "day\n:ledger", "{day}"]
    for name in names:
        root = Budget(Limits(max_llm_calls=5), name=name, store=store)
        child = Budget(Limits(), name="run:{x}", parent=root)
        child.record(None, {"input_tokens": 1, "output_tokens": 1})
        child.reserve(prompt_tokens=1, max_output_tokens=1)
    client = redis.Redis.from_url(redis_url)
    keys = sorted(k.decode() for k in client.scan_iter(match=key_prefix + "*"))
    client.close()
    families: dict[str, set[int]] = {}
    for key in keys:
        tag = re.fullmatch(re.escape(key_prefix) + r"\{([0-9a-f]{24})\}:(levels|holds|ledger)", key)
        assert tag is not None, key
        families.setdefault(tag.group(1), set()).add(key_slot(key.encode()))
    assert len(families) == len(names)
    assert all(len(slots) == 1 for slots in families.values())
    for name in names:
        assert Budget(Limits(max_llm_calls=5), name=name, store=store).snapshot().llm_calls == 1
    store.close()


@pytest.mark.redis
def test_a_settle_that_does_not_know_the_holds_amounts_reads_the_hold(redis_url: str, key_prefix: str) -> None:
    store = RedisStore(redis_url, key_prefix=key_prefix)
    budget = Budget(Limits(max_total_tokens=1_000), name="b", store=store)
    reservation = budget.reserve(prompt_tokens=100, max_output_tokens=200)
    store._hold_keys.clear()  # as if another process had made the hold: the script reads it
    reservation.settle({"input_tokens": 100, "output_tokens": 50})
    snap = budget.snapshot()
    assert (snap.held_tokens, snap.held_llm_calls, snap.total_tokens) == (0, 0, 150)
    store.close()


@pytest.mark.redis
def test_ledger_is_bounded(redis_url: str, key_prefix: str) -> None:
    store = RedisStore(redis_url, key_prefix=key_prefix, ledger_max_len=5)
    budget = Budget(Limits(), name="b", store=store)
    for i in range(12):
        budget.record(None, {"input_tokens": i, "output_tokens": 0})
    history = budget.ledger.history()
    assert [e.usage.input_tokens for e in history if e.usage] == [7, 8, 9, 10, 11]
    assert [e.id for e in history] == [8, 9, 10, 11, 12]
    assert budget.snapshot().input_tokens == sum(range(12))  # counters are never trimmed
    store.close()


@pytest.mark.redis
def test_a_client_can_be_passed_in_and_is_not_closed(redis_url: str, key_prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with RedisStore(client, key_prefix=key_prefix) as store:
        Budget(Limits(max_llm_calls=1), name="b", store=store).record(None, {"input_tokens": 1, "output_tokens": 1})
    assert client.ping()
    assert (
        Budget(Limits(max_llm_calls=1), name="b", store=RedisStore(client, key_prefix=key_prefix)).snapshot().llm_calls
        == 1
    )
    client.close()


@pytest.mark.redis
def test_the_function_library_is_loaded_again_when_the_server_lost_it(redis_url: str, key_prefix: str) -> None:
    store = RedisStore(redis_url, key_prefix=key_prefix)
    budget = Budget(Limits(max_llm_calls=5), name="b", store=store)
    store._client.function_delete(store._program.name)  # a restart without persistence, or FUNCTION FLUSH
    budget.record(None, {"input_tokens": 1, "output_tokens": 1})
    assert budget.snapshot().llm_calls == 1
    assert len(store._client.function_list(library=store._program.name)) == 1
    store.close()


@pytest.mark.redis
def test_servers_without_functions_get_the_same_program_by_evalsha(redis_url: str, key_prefix: str) -> None:
    store = RedisStore(redis_url, key_prefix=key_prefix)

    def no_functions(*args: Any, **kwargs: Any) -> Any:
        raise redis_exceptions.ResponseError("unknown command 'FCALL', with args beginning with: ")

    store._fcall = no_functions  # type: ignore[method-assign]
    budget = Budget(Limits(max_llm_calls=1), name="b", store=store)
    budget.reserve(prompt_tokens=3, max_output_tokens=2).settle({"input_tokens": 3, "output_tokens": 1})
    assert not store._functions
    assert not budget.check().allowed
    assert budget.snapshot().total_tokens == 4
    store.close()


def _connections(redis_url: str, name: str) -> list[int]:
    """Ids of the server's connections whose client name is ``name``."""
    admin = redis.Redis.from_url(redis_url)
    try:
        return [c["id"] for c in admin.client_list() if c["name"] == name]
    finally:
        admin.close()


def _named(redis_url: str) -> tuple[str, str]:
    name = f"budgetary-test-{uuid.uuid4().hex[:8]}"
    return f"{redis_url}{'&' if '?' in redis_url else '?'}client_name={name}", name


@pytest.mark.redis
def test_a_connection_the_server_closed_while_idle_is_replaced_before_the_next_call(
    redis_url: str, key_prefix: str
) -> None:
    url, name = _named(redis_url)
    store = RedisStore(url, key_prefix=key_prefix)
    budget = Budget(Limits(max_llm_calls=5), name="b", store=store)
    budget.record(None, {"input_tokens": 1, "output_tokens": 1})
    before = _connections(redis_url, name)
    assert before
    admin = redis.Redis.from_url(redis_url)
    for client_id in before:  # an idle timeout, a failover, or CLIENT KILL: the server drops us
        admin.client_kill_filter(_id=client_id)
    admin.close()
    budget.reserve(prompt_tokens=1, max_output_tokens=1).settle({"input_tokens": 1, "output_tokens": 1})
    assert budget.snapshot().llm_calls == 2
    assert not set(_connections(redis_url, name)) & set(before)
    store.close()


@pytest.mark.redis
def test_threads_calling_at_once_each_get_whole_replies(redis_url: str, key_prefix: str) -> None:
    store = RedisStore(redis_url, key_prefix=key_prefix)
    budget = Budget(Limits(max_llm_calls=1_000), name="b", store=store)
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(50):
            budget.reserve(prompt_tokens=3, max_output_tokens=2).settle({"input_tokens": 3, "output_tokens": 1})

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = budget.snapshot()
    assert (snap.llm_calls, snap.total_tokens, snap.held_llm_calls) == (400, 1_600, 0)
    store.close()


@pytest.mark.redis
def test_a_forked_child_does_not_share_its_parents_connection(redis_url: str, key_prefix: str) -> None:
    store = RedisStore(redis_url, key_prefix=key_prefix)
    budget = Budget(Limits(max_llm_calls=1_000), name="b", store=store)
    budget.record(None, {"input_tokens": 1, "output_tokens": 1})  # the parent's connection is open
    ctx = multiprocessing.get_context("fork")
    done = ctx.Queue()

    def child() -> None:  # the same store object, inherited
        for _ in range(100):
            budget.reserve(prompt_tokens=3, max_output_tokens=2).settle({"input_tokens": 3, "output_tokens": 1})
        done.put(True)

    proc = ctx.Process(target=child, daemon=True)
    proc.start()
    for _ in range(100):
        budget.reserve(prompt_tokens=3, max_output_tokens=2).settle({"input_tokens": 3, "output_tokens": 1})
    assert done.get(timeout=60) is True
    proc.join(timeout=60)
    assert proc.exitcode == 0
    snap = budget.snapshot()
    assert (snap.llm_calls, snap.total_tokens, snap.held_llm_calls) == (201, 802, 0)
    store.close()


@pytest.mark.redis
def test_close_closes_every_threads_connection(redis_url: str, key_prefix: str) -> None:
    url, name = _named(redis_url)
    store = RedisStore(url, key_prefix=key_prefix)
    budget = Budget(Limits(), name="b", store=store)
    threads = [threading.Thread(target=budget.record, args=(None, {"input_tokens": 1, "output_tokens": 1}))
               for _ in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _connections(redis_url, name)
    store.close()
    assert _connections(redis_url, name) == []


TLS_URL = os.environ.get("BUDGETARY_REDIS_TLS_URL")


@pytest.fixture
def tls_url() -> str:
    """A rediss:// URL; skips (fails under BUDGETARY_REQUIRE_REDIS_TLS=1) without a TLS server."""
    reason = None
    if not TLS_URL:
        reason = "BUDGETARY_REDIS_TLS_URL is not set (a rediss:// URL; .ci/test-servers starts a TLS server)"
    else:
        try:
            redis.Redis.from_url(TLS_URL, socket_connect_timeout=1).ping()
        except Exception as exc:
            reason = f"no TLS Redis at {TLS_URL} ({exc!r})"
    if reason is not None:
        if os.environ.get("BUDGETARY_REQUIRE_REDIS_TLS") == "1":
            pytest.fail(f"BUDGETARY_REQUIRE_REDIS_TLS=1 but {reason}")
        pytest.skip(reason)
    assert TLS_URL is not None
    return TLS_URL


@pytest.mark.redis
def test_a_rediss_url_serves_sync_and_async_calls_and_keeps_its_tls_connection(tls_url: str) -> None:
    prefix = f"budgetary-test:{uuid.uuid4().hex[:10]}:"
    admin = redis.Redis.from_url(tls_url)
    store = RedisStore(tls_url, key_prefix=prefix)
    budget = Budget(Limits(max_llm_calls=100), name="b", store=store)
    budget.record(None, {"input_tokens": 1, "output_tokens": 1})  # this thread's connection is open
    before = admin.info("stats")["total_connections_received"]
    for _ in range(30):
        budget.reserve(prompt_tokens=3, max_output_tokens=2).settle({"input_tokens": 3, "output_tokens": 1})
    assert admin.info("stats")["total_connections_received"] == before  # no reconnect per call over TLS

    async def go() -> None:
        async with budget.llm_call(prompt_tokens=3, max_output_tokens=2) as call:
            await call.asettle({"input_tokens": 3, "output_tokens": 1})
        await store.aclose()

    asyncio.run(go())
    snap = budget.snapshot()
    assert (snap.llm_calls, snap.total_tokens, snap.held_llm_calls) == (32, 126, 0)
    store.close()
    for key in admin.scan_iter(match=prefix + "*"):
        admin.delete(key)
    admin.close()


def test_a_budget_whose_state_the_server_lost_raises_store_error(
    redis_url: str, key_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Redis restarted without persistence (or a flush, an eviction) loses a family's keys: every
    call of a live `Budget` then says so as a `StoreError`, as any other store failure, not a bare
    KeyError of the store's internals; the CLI still says there is no such budget."""
    from budgetary.cli import main

    store = RedisStore(redis_url, key_prefix=key_prefix)
    day = Budget(Limits(max_llm_calls=10, window="1d"), name="day", store=store)
    run = Budget(Limits(max_llm_calls=5), name="run", parent=day)
    held = run.reserve(prompt_tokens=5, max_output_tokens=5)
    client = redis.Redis.from_url(redis_url)
    client.delete(*client.scan_iter(match=key_prefix + "*"))  # what the restart leaves: nothing
    client.close()
    calls = [
        lambda: held.settle({"input_tokens": 1, "output_tokens": 1}),
        lambda: run.reserve(prompt_tokens=5, max_output_tokens=5),
        run.snapshot,
        run.check,
        lambda: run.top_up(llm_calls=1),
        lambda: asyncio.run(run.areserve(prompt_tokens=5, max_output_tokens=5)),
    ]
    for call in calls:
        with pytest.raises(StoreError, match="not in the store: its state was lost"):
            call()
    assert main(["--store", redis_url, "--key-prefix", key_prefix, "report", "day", "run"]) == 1
    assert "no budget 'day/run'" in capsys.readouterr().err
    store.close()
