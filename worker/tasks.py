"""Celery tasks: thin wrappers that take ids, re-read state from the database and run a chunk."""

from __future__ import annotations

import logging
import os
import signal
import socket
from functools import lru_cache

from celery import signals

from llmbatch.jobs.db import Database
from llmbatch.jobs.settings import Settings
from llmbatch.worker.app import TASK_RUN_CHUNK, app, enqueue_chunks

log = logging.getLogger(__name__)

# `llmbatch worker` names a file here; a pool process that cannot load the model writes why into
# it and stops the worker, which then exits with that one message (instead of load -> fail ->
# requeue forever).
FAILFILE_ENV = "LLMBATCH_WORKER_FAILFILE"


@lru_cache(maxsize=1)
def settings() -> Settings:
    return Settings.from_env()


@lru_cache(maxsize=1)
def database() -> Database:
    return Database(settings().database_url)


@lru_cache(maxsize=1)
def engine():
    """The model, loaded once per worker process when the process starts (see _load_model)."""
    from llmbatch.worker.engines import make_engine

    return make_engine(settings().model, settings())


def worker_name() -> str:
    name = f"{socket.gethostname()}:{os.getpid()}"
    # Echo output is never model output: say so on every result it writes.
    return name + " [echo engine]" if settings().engine == "echo" else name


def _job_model(chunk_id: int) -> str | None:
    from sqlalchemy import select

    from llmbatch.jobs.models import Chunk, Job

    return database().retrying(lambda s: s.scalar(
        select(Job.model).join(Chunk, Chunk.job_id == Job.id).where(Chunk.id == chunk_id)), write=False)


def _requeue(model: str, job_id: str, chunk_id: int) -> None:
    from llmbatch.jobs import work

    enqueue_chunks(model, [(job_id, chunk_id)])
    database().retrying(lambda s: work.mark_enqueued(s, [chunk_id]))


@app.task(name=TASK_RUN_CHUNK, acks_late=True, reject_on_worker_lost=True)
def run_chunk(job_id: str, chunk_id: int) -> None:
    from llmbatch.worker.runner import run_chunk as run

    model = _job_model(chunk_id)
    if model is None:
        log.info("chunk %s no longer exists; skipping", chunk_id)
        return
    if model != settings().model:
        # Never run a job on a model it did not ask for; hand the message to that model's queue.
        log.warning("chunk %s of job %s is for model %s, but this worker holds %s: moved to its queue",
                    chunk_id, job_id, model, settings().model)
        _requeue(model, job_id, chunk_id)
        return
    eng = engine()  # loaded at process start; cached
    s = settings()
    try:
        outcome = run(database(), eng, chunk_id, worker_name(), s.lease_seconds, max_attempts=s.max_attempts)
    except Exception:
        # The cause is stored on the chunk and the chunk is pending again: queue it for another try
        # (after LLMBATCH_MAX_ATTEMPTS claims its items fail instead).
        log.exception("job %s chunk %s failed; queueing it again", job_id, chunk_id)
        _requeue(model, job_id, chunk_id)
        return
    log.info("job %s chunk %s: claimed=%s done=%s lost=%s", job_id, chunk_id, outcome.claimed, outcome.done,
             outcome.lost)


_presence = None  # this process's row in the workers table, once its model is loaded


@signals.worker_process_init.connect
def _load_model(**_):
    global _presence
    import time

    # A forked child must not share the parent's database connections.
    database.cache_clear()
    # Load before this process takes any message, so a model that cannot load stops the worker
    # with one clear error instead of failing every chunk it is handed.
    failfile = os.environ.get(FAILFILE_ENV)
    started = time.monotonic()
    try:
        eng = engine()
        from llmbatch.worker.presence import Presence

        _presence = Presence(database(), worker_name(), settings().model, settings().engine, eng)
        _presence.register()  # visible (`llmbatch workers`, /v1/models) only once it can serve
        _presence.start()
    except Exception as exc:
        from llmbatch.jobs.exceptions import ModelUnavailable

        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        message = first_line if isinstance(exc, ModelUnavailable) else \
            f"cannot load model {settings().model!r}: {type(exc).__name__}: {first_line}"
        if not failfile:
            log.error("%s", message)
        elif not os.path.exists(failfile):  # another pool process already reported it
            with open(failfile, "w") as f:
                f.write(message)
        os.kill(os.getppid(), signal.SIGTERM)  # stop the worker: no process of it can serve
        os._exit(1)
    log.info("ready: model %s loaded in %.1f s on %s; worker %s", settings().model, time.monotonic() - started,
             _presence.me.gpu or "no device (echo engine)", _presence.me.id)


@signals.worker_process_shutdown.connect
def _leave(**_):
    if _presence is not None:
        _presence.stop()


@signals.worker_ready.connect
def _start_recovery(sender=None, **_):
    from llmbatch.worker.recovery import start_recovery_thread

    start_recovery_thread(database(), settings().lease_seconds)
