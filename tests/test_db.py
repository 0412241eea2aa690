"""Migrations build the schema from a blank database on both backends, matching the models."""

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from llmbatch.jobs.db import Database
from llmbatch.jobs.models import Base


def test_upgrade_blank_database_matches_models(db_url):
    db = Database(db_url)
    assert not db.schema_is_current()
    db.upgrade()
    assert db.schema_is_current()
    with db.engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) >= {"jobs", "items", "chunks", "alembic_version"}
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"
    db.dispose()


def test_ensure_schema_is_idempotent(db_url):
    db = Database(db_url)
    db.ensure_schema()
    db.ensure_schema()
    assert db.schema_is_current()
    db.dispose()


def test_sqlite_uses_wal_and_busy_timeout(sqlite_url):
    db = Database(sqlite_url)
    with db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 5000
    db.dispose()


def test_sqlite_write_transactions_take_the_lock_up_front(sqlite_url):
    """BEGIN IMMEDIATE: a second writer waits on the busy timeout instead of failing mid-transaction."""
    db = Database(sqlite_url)
    db.ensure_schema()
    statements = []
    from sqlalchemy import event

    event.listen(db.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with db.write() as s:
        s.execute(text("SELECT 1"))
    with db.read() as s:
        s.execute(text("SELECT 1"))
    begins = [st for st in statements if st.startswith("BEGIN")]
    assert begins == ["BEGIN IMMEDIATE", "BEGIN"]
    db.dispose()


def test_db_upgrade_command(sqlite_url):
    from click.testing import CliRunner

    from llmbatch.jobs.cli import cli

    result = CliRunner().invoke(cli, ["--database-url", sqlite_url, "db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert Database(sqlite_url).schema_is_current()


def test_schema_head_constant_is_the_newest_migration():
    from alembic.script import ScriptDirectory

    from llmbatch.jobs.db import SCHEMA_HEAD

    db = Database("sqlite://")
    assert ScriptDirectory.from_config(db.alembic_config).get_heads() == [SCHEMA_HEAD]
