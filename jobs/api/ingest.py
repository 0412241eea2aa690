"""Parsing batch files off the request path, in a child process.

Parsing a million lines is CPU-bound for seconds: in a thread of the server it would hold the
GIL and slow every request, so it runs in a process pool of its own (spawned: no copy of the
server's state or connections). What is in flight lives in the database (the batch is
`validating` until its parse commits, see jobs/batches.py), so a sweep re-submits batches whose
parser died, in this server or another one.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from functools import lru_cache
from multiprocessing import resource_tracker
from threading import Lock

from llmbatch.jobs import batches
from llmbatch.jobs.db import Database
from llmbatch.jobs.settings import Settings

log = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def _database(url: str) -> Database:
    return Database(url)


def _lower_priority() -> None:
    # Parsing is background work: on a busy machine, requests to the server go first.
    os.nice(10)


def _ingest(settings: Settings, job_id: str) -> str:
    """Runs in the child process."""
    return batches.ingest(_database(settings.database_url), settings, job_id)


class Ingestor:
    """One child process parses one batch at a time (SQLite takes one writer anyway)."""

    def __init__(self, settings: Settings, processes: int = 1):
        self.settings = settings
        self.pool = ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_lower_priority)
        self.in_flight: set[str] = set()
        self.lock = Lock()
        self.closed = False

    def submit(self, job_id: str) -> None:
        with self.lock:
            if job_id in self.in_flight or self.closed:
                return  # closed: the batch stays `validating`, and the next server's sweep parses it
            self.in_flight.add(job_id)
        try:
            future = self.pool.submit(_ingest, self.settings, job_id)
        except RuntimeError:  # closed meanwhile (the pool refuses new work after shutdown)
            with self.lock:
                self.in_flight.discard(job_id)
            return
        future.add_done_callback(lambda f: self._done(job_id, f))

    def _done(self, job_id: str, future: Future) -> None:
        with self.lock:
            self.in_flight.discard(job_id)
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            # Still `validating`: the next sweep tries again.
            log.error("parsing batch %s failed: %s: %s", job_id, type(exc).__name__, exc)
        else:
            log.info("batch %s: %s", job_id, future.result())

    def sweep(self, db: Database) -> None:
        """Submit every validating batch not already in flight here; queue chunks a dead broker left behind."""
        with db.read() as s:
            for job_id in batches.validating_batches(s):
                self.submit(job_id)
        batches.requeue_unqueued(db, self.settings)

    def close(self, grace_s: float = 2.0) -> None:
        """Stop the child and multiprocessing's resource tracker, and wait until both are gone.

        A parse still running is ended: its transaction rolls back and the batch stays
        `validating` for a sweep to redo. Left to the interpreter's exit, they would outlive a
        server stopped by SIGTERM (uvicorn ends by re-raising the signal, so no atexit runs).
        """
        with self.lock:
            self.closed = True
        processes = list((self.pool._processes or {}).values())  # no public handle on the children
        self.pool.shutdown(wait=False, cancel_futures=True)  # an idle child exits on its own
        for p in processes:
            p.join(grace_s)
            if p.is_alive():
                p.terminate()
                p.join(grace_s)
            if p.is_alive():
                p.kill()
                p.join()
        self.pool.shutdown(wait=True)
        # The pool's queues unregister their semaphores when collected: before the tracker stops,
        # or it would warn about them as leaked (and a late unregister would start a new one).
        gc.collect()
        resource_tracker._resource_tracker._stop()
