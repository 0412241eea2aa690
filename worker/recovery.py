"""Takes up the chunks of dead workers: their lease lapses, the chunk goes back on the queue.

Runs as a thread in every worker's main process. Celery's Redis transport would redeliver an
unacked message only after its visibility timeout (an hour), far too late; the database lease
notices a dead worker within lease_seconds. Several workers sweeping at once is harmless: each
stale chunk is released by exactly one UPDATE, and a duplicate message is skipped at claim.
"""

from __future__ import annotations

import logging
import threading

from jobs import work
from jobs.db import Database
from worker.app import enqueue_chunks

log = logging.getLogger(__name__)


def sweep(db: Database) -> int:
    """Requeue chunks whose lease lapsed; returns how many."""
    stale = db.retrying(work.release_stale_chunks)
    by_model: dict[str, list[tuple[str, int]]] = {}
    if stale:
        with db.read() as s:
            for job_id, chunk_id in stale:
                by_model.setdefault(work.job_model(s, job_id), []).append((job_id, chunk_id))
    for model, chunks in by_model.items():
        log.warning("requeueing %d chunk(s) of model %s whose worker stopped renewing its lease", len(chunks), model)
        enqueue_chunks(model, chunks)
    return len(stale)


def start_recovery_thread(db: Database, lease_seconds: int) -> threading.Thread:
    interval = max(1.0, lease_seconds / 4)

    def loop() -> None:
        stop = threading.Event()
        while not stop.wait(interval):
            try:
                sweep(db)
            except Exception:
                log.warning("recovery sweep failed; will try again", exc_info=True)

    thread = threading.Thread(target=loop, daemon=True, name="llmbatch-recovery")
    thread.start()
    return thread
