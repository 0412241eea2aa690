"""Alembic environment: runs against the engine handed over by jobs.db, or LLMBATCH_DATABASE_URL."""

from alembic import context
from sqlalchemy import pool

from llmbatch.jobs.models import Base

config = context.config
target_metadata = Base.metadata


def _engine():
    engine = config.attributes.get("engine")
    if engine is not None:
        return engine
    from sqlalchemy import create_engine

    from llmbatch.jobs.settings import Settings

    url = config.get_main_option("sqlalchemy.url") or Settings.from_env().database_url
    return create_engine(url, poolclass=pool.NullPool)


def run_migrations_offline() -> None:
    context.configure(url=str(_engine().url), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    with _engine().connect() as connection:
        # render_as_batch: SQLite can only ALTER by copying tables; batch mode does that for us.
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
