"""Fixtures that start or reach real services, and fail clearly when one is missing.

Redis must answer on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (database `test`);
override with LLMBATCH_TEST_REDIS_URL and LLMBATCH_TEST_POSTGRES_URL.
"""

from __future__ import annotations

import os
import uuid

import pytest

from llmbatch.jobs.settings import DEFAULT_MODEL, Settings

REDIS_URL = os.environ.get("LLMBATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379")
POSTGRES_URL = os.environ.get("LLMBATCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_START = ('redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no '
               '--dir /var/lib/redis --logfile /var/log/redis/ci.log')
PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


@pytest.fixture(scope="session", autouse=True)
def _test_env(tmp_path_factory):
    """Keep every test's state out of the real ~/.llmbatch, except the converted bundled model.

    That one is shared with the user's runs (one copy on disk, converted once): it is written
    atomically (a rename) and only read after, so tests and users cannot disturb each other.
    """
    from llmbatch.jobs.settings import home_dir

    os.environ.setdefault("LLMBATCH_MODEL_CACHE", str(home_dir() / "models"))  # before HOME moves
    home = tmp_path_factory.mktemp("llmbatch-home")
    os.environ["LLMBATCH_HOME"] = str(home)
    os.environ.pop("LLMBATCH_DATABASE_URL", None)
    os.environ.pop("LLMBATCH_MODEL", None)
    yield


def redis_url(db: int) -> str:
    return f"{REDIS_URL.rstrip('/')}/{db}"


def _redis_db(db: int):
    """A Redis database of its own, emptied first. Fails (never skips) when Redis is down."""
    import redis

    url = redis_url(db)
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}); start it with: {REDIS_START}")
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture
def broker_url():
    """The broker for tests that start workers."""
    yield from _redis_db(9)


@pytest.fixture
def quiet_broker_url():
    """A broker no test worker ever listens on, for tests that count queued messages."""
    yield from _redis_db(10)


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL schema per test, dropped afterwards."""
    from sqlalchemy import create_engine
    from sqlalchemy.schema import CreateSchema, DropSchema

    admin = create_engine(POSTGRES_URL)
    schema = "t_" + uuid.uuid4().hex[:12]
    try:
        with admin.begin() as conn:
            conn.execute(CreateSchema(schema))
    except Exception as exc:
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_URL} ({exc}); start it with: {PG_START}")
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(DropSchema(schema, cascade=True))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'llmbatch.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def db(db_url):
    from llmbatch.jobs.db import Database

    database = Database(db_url)
    database.ensure_schema()
    yield database
    database.dispose()


@pytest.fixture
def settings(db_url):
    return Settings.from_env(database_url=db_url, broker_url=redis_url(9), chunk_size=4, lease_seconds=30)


@pytest.fixture(scope="session")
def engine():
    """The bundled SmolLM2-135M in NF4 on the CPU, loaded once for the session."""
    from llmbatch.worker.engine import EngineConfig, load_engine

    return load_engine(EngineConfig(model=DEFAULT_MODEL, cache_dir=os.environ["LLMBATCH_MODEL_CACHE"]))
