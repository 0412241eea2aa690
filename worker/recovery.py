"""Takes up work whose worker died or whose message the broker lost.

Runs as a thread in every worker's main process, every quarter lease:

- A running chunk whose lease lapsed (its worker died) goes back to pending and is queued
  again. Celery's Redis transport would redeliver its unacked message only after the
  visibility timeout (an hour), far too late.
- Pending chunks queued a while ago, on a queue that holds fewer messages than that (Redis
  restarted without persistence, or was flushed), are queued again.

Several workers sweeping at once is harmless: a stale chunk is released by exactly one UPDATE,
and a duplicate message is turned away when it is claimed.
"""

from __future__ import annotations

import logging
import threading

from llmbatch.jobs import work
from llmbatch.jobs.db import Database
from llmbatch.worker.app import app, enqueue_chunks, queue_name

log = logging.getLogger(__name__)


def messages_held(model: str) -> int:
    """Messages the broker holds for this model: waiting in its queue, or taken but not yet acked."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        # The unacked hash spans every queue; counting it all errs on the side of not requeueing.
        return channel.client.llen(queue_name(model)) + channel.client.hlen(channel.unacked_key)


def _requeue(db: Database, chunks_by_model: work.Requeue, why: str) -> int:
    for model, chunks in chunks_by_model.items():
        log.warning("requeueing %d chunk(s) of %s: %s", len(chunks), model, why)
        enqueue_chunks(model, chunks)
        db.retrying(lambda s: work.mark_enqueued(s, [c for _, c in chunks]))
    return sum(map(len, chunks_by_model.values()))


def sweep(db: Database, lease_seconds: int) -> int:
    """Requeue chunks of dead workers and chunks whose messages were lost; returns how many."""
    requeued = _requeue(db, db.retrying(work.release_stale_chunks), "their worker stopped renewing its lease")
    # A cancelling job's chunk that is back to pending is finished here, not requeued: its
    # message may never have been published, and the job must still reach `cancelled`.
    if settled := db.retrying(work.settle_cancelled_chunks):
        log.info("cancelled the items of %d unclaimed chunk(s) of cancelling jobs", settled)
    with db.read() as s:
        waiting = work.unstarted_chunks(s, lease_seconds)
    # A queue that holds as many messages as it has chunks waiting may simply be busy.
    lost = {model: chunks for model, chunks in waiting.items() if messages_held(model) < len(chunks)}
    return requeued + _requeue(db, lost, "the broker holds fewer messages than there are chunks waiting")


def start_recovery_thread(db: Database, lease_seconds: int) -> threading.Thread:
    interval = max(1.0, lease_seconds / 4)

    def loop() -> None:
        stop = threading.Event()
        while not stop.wait(interval):
            try:
                sweep(db, lease_seconds)
            except Exception:  # the broker or database is down: try again next round
                log.warning("recovery sweep failed; will try again", exc_info=True)

    thread = threading.Thread(target=loop, daemon=True, name="llmbatch-recovery")
    thread.start()
    return thread
