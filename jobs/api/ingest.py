"""Parsing batch files off the request path, in a child process.

Parsing a million lines is CPU-bound for seconds: in a thread of the server it would hold the
GIL and slow every request, so it runs in a process pool of its own (spawned: no copy of the
server's state or connections). What is in flight lives in the database (the batch is
`validating` until its parse commits, see jobs/batches.py), so a sweep re-submits batches whose
parser died, in this server or another one. The same child measures the output and error files
of finished batches (batches.measure_generated_files), which renders them: CPU-bound as well.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
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


def _init_child() -> None:
    # Parsing is background work: on a busy machine, requests to the server go first.
    os.nice(10)
    # Ctrl-C reaches the whole process group: the server stops this child itself (Ingestor.close),
    # so the child must not die first with a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _ingest(settings: Settings, job_id: str) -> str:
    """Runs in the child process."""
    return batches.ingest(_database(settings.database_url), settings, job_id)


def _measure(settings: Settings) -> str:
    """Runs in the child process: rendering a big export to size it is CPU-bound too."""
    return f"sized the files of {batches.measure_generated_files(_database(settings.database_url))} batch(es)"


SIZES = "sizes"  # the in-flight key of the file-size sweep (batch ids start with "job_")


class Ingestor:
    """One child process parses one batch at a time (SQLite takes one writer anyway)."""

    def __init__(self, settings: Settings, processes: int = 1):
        self.settings = settings
        self.pool = ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_child)
        self.in_flight: set[str] = set()
        self.lock = Lock()
        self.closed = False

    def submit(self, job_id: str) -> None:
        """Parse the batch in the child (unless it is in flight here already)."""
        self._run(job_id, _ingest, self.settings, job_id)

    def _run(self, key: str, fn, *args) -> None:
        with self.lock:
            if key in self.in_flight or self.closed:
                return  # closed: a batch stays `validating`, and the next server's sweep parses it
            self.in_flight.add(key)
        try:
            future = self.pool.submit(fn, *args)
        except RuntimeError:  # closed meanwhile (the pool refuses new work after shutdown)
            with self.lock:
                self.in_flight.discard(key)
            return
        future.add_done_callback(lambda f: self._done(key, f))

    def _done(self, key: str, future: Future) -> None:
        with self.lock:
            self.in_flight.discard(key)
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            # A batch is still `validating`, or its sizes unstored: the next sweep tries again.
            log.error("%s failed: %s: %s", "sizing files" if key == SIZES else f"parsing batch {key}",
                      type(exc).__name__, exc)
        elif key != SIZES:
            log.info("batch %s: %s", key, future.result())

    def sweep(self, db: Database) -> None:
        """Submit every validating batch not already in flight here; queue chunks a dead broker left behind;
        measure the output and error files of batches that finished since."""
        with db.read() as s:
            for job_id in batches.validating_batches(s):
                self.submit(job_id)
        batches.requeue_unqueued(db, self.settings)
        self._run(SIZES, _measure, self.settings)

    def close(self, grace_s: float = 2.0) -> None:
        """Stop the child and multiprocessing's resource tracker, and wait until both are gone.

        A parse still running is ended: its transaction rolls back and the batch stays
        `validating` for a sweep to redo. Left to the interpreter's exit, a parse would hold the
        exit up until it ended, and a process ended by a signal (uvicorn's default is to re-raise
        it) runs no atexit: both children outlived a server stopped by SIGTERM.
        """
        with self.lock:
            self.closed = True
        # No public handle on the children, nor on the thread that manages them (3.14 adds
        # terminate_workers); shutdown(wait=False) forgets both, so they are taken first.
        processes = list((self.pool._processes or {}).values())
        manager = self.pool._executor_manager_thread
        self.pool.shutdown(wait=False, cancel_futures=True)  # an idle child exits on its own
        for p in processes:
            p.join(grace_s)
            if p.is_alive():
                p.terminate()
                p.join(grace_s)
            if p.is_alive():
                p.kill()
                p.join()
        if manager is not None:
            manager.join()  # it ends once its children have
        del manager, processes  # the thread object holds the pool's queues, a process its sentinel
        # The queues unregister their semaphores when collected: before the tracker stops, or it
        # would warn about them as leaked (and a late unregister would start a new tracker).
        gc.collect()
        resource_tracker._resource_tracker._stop()
