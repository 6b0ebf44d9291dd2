"""Test setup shared by every test: offline environment, tiktoken cache, Redis fixture."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Frameworks read these at import time: set them before any test module imports CrewAI/LiteLLM.
for _name, _value in {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "OTEL_SDK_DISABLED": "true",
    "CREWAI_DISABLE_VERSION_CHECK": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "CREWAI_TESTING": "true",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}.items():
    os.environ.setdefault(_name, _value)

_SHARED_CACHE = Path(__file__).resolve().parents[1].parent / "shared" / "tiktoken_cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _SHARED_CACHE.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_SHARED_CACHE)

REDIS_URL = os.environ.get("BUDGETARY_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_REDIS = os.environ.get("BUDGETARY_REQUIRE_REDIS") == "1"


def tiktoken_cache_present() -> bool:
    """Whether tiktoken can load its encodings offline here."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    return bool(cache) and Path(cache).is_dir() and any(Path(cache).iterdir())


def redis_available() -> str | None:
    """None if Redis answers at REDIS_URL, else the reason it does not."""
    try:
        import redis
    except ImportError:
        return "redis-py is not installed (pip install 'budgetary[redis]')"
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
        client.ping()
        client.close()
    except Exception as exc:
        return f"Redis is not reachable at {REDIS_URL} ({exc!r}); set BUDGETARY_REDIS_URL"
    return None


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis URL for one test; skips (or fails under BUDGETARY_REQUIRE_REDIS=1) when Redis is down."""
    reason = redis_available()
    if reason is not None:
        if REQUIRE_REDIS:
            pytest.fail(f"BUDGETARY_REQUIRE_REDIS=1 but {reason}")
        pytest.skip(reason)
    yield REDIS_URL


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    """A fresh Redis key prefix for one test; every key under it is deleted afterwards."""
    import redis

    prefix = f"budgetary-test:{uuid.uuid4().hex[:10]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=prefix + "*", count=1000):
        client.delete(key)
    client.close()


class FakeClock:
    """A clock tests move by hand (`Budget(clock=...)`)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
