"""Celery tasks: thin wrappers that take ids, re-read state from the database and run a chunk."""

from __future__ import annotations

import logging
import os
import socket
from functools import lru_cache

from celery import signals

from llmbatch.jobs.db import Database
from llmbatch.jobs.settings import Settings
from llmbatch.worker.app import TASK_RUN_CHUNK, app

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def settings() -> Settings:
    return Settings.from_env()


@lru_cache(maxsize=1)
def database() -> Database:
    return Database(settings().database_url)


@lru_cache(maxsize=1)
def engine():
    """The model, loaded once per worker process on its first task."""
    from llmbatch.worker.engines import make_engine

    return make_engine(settings().model, settings())


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@app.task(name=TASK_RUN_CHUNK, acks_late=True, reject_on_worker_lost=True)
def run_chunk(job_id: str, chunk_id: int) -> None:
    from llmbatch.worker.runner import run_chunk as run

    eng = engine()  # load before claiming, so the lease is not spent on loading
    outcome = run(database(), eng, chunk_id, worker_name(), settings().lease_seconds)
    log.info("job %s chunk %s: claimed=%s done=%s lost=%s", job_id, chunk_id, outcome.claimed, outcome.done,
             outcome.lost)


@signals.worker_process_init.connect
def _fresh_connections(**_):
    # A forked child must not share the parent's database connections.
    database.cache_clear()


@signals.worker_ready.connect
def _start_recovery(sender=None, **_):
    from llmbatch.worker.recovery import start_recovery_thread

    start_recovery_thread(database(), settings().lease_seconds)
