"""Run one chunk: claim it, generate its items, write results per micro-batch, release it.

The same code runs inside the Celery task and in `llmbatch run`'s in-process drain. It holds
the chunk under a lease that a heartbeat thread keeps renewing; a worker that dies stops
renewing, and the chunk is taken up again once the lease lapses.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from llmbatch.jobs import work
from llmbatch.jobs.db import Database
from llmbatch.jobs.models import Chunk, Item, ItemStatus, Job, JobStatus
from llmbatch.worker.engine import Request, Result, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class ChunkOutcome:
    claimed: bool
    done: int = 0  # items given a final result
    completion_tokens: int = 0
    lost: bool = False  # the lease lapsed and another worker took the chunk


def to_request(item: Item, job: Job) -> Request:
    req = item.request or {}
    params = SamplingParams.from_dict({**(job.params or {}), **req.get("params", {})})
    return Request(id=item.id, prompt=req.get("prompt"), messages=req.get("messages"), params=params)


def _ts(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=timezone.utc)


def to_item_result(r: Result, line: int | None = None) -> work.ItemResult:
    """The row to write; `line` prefixes an error message, as bad input lines' errors are (the
    engine knows requests, not lines)."""
    message = r.error_message
    if message is not None and line is not None:
        message = f"line {line}: {message}"
    return work.ItemResult(
        item_id=r.id, status=ItemStatus.succeeded if r.ok else ItemStatus.failed, output=r.output,
        finish_reason=r.finish_reason, prompt_tokens=r.usage.prompt_tokens,
        completion_tokens=r.usage.completion_tokens, started_at=_ts(r.started_at), finished_at=_ts(r.finished_at),
        error_code=r.error_code, error_message=message, warning=r.warning)


class Heartbeat(threading.Thread):
    """Renews the chunk's lease every third of its length while a long micro-batch runs."""

    def __init__(self, db: Database, chunk_id: int, worker: str, lease_seconds: int):
        super().__init__(daemon=True, name=f"lease-{chunk_id}")
        self.db, self.chunk_id, self.worker, self.lease_seconds = db, chunk_id, worker, lease_seconds
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stopped.wait(self.lease_seconds / 3):
            try:
                if not self.db.retrying(lambda s: work.renew_lease(s, self.chunk_id, self.worker, self.lease_seconds)):
                    self.lost = True
                    return
            except Exception:  # the database is down: keep trying, the lease has slack
                log.warning("could not renew the lease on chunk %s", self.chunk_id, exc_info=True)

    def stop(self) -> None:
        self.stopped.set()


def run_chunk(db: Database, engine, chunk_id: int, worker: str, lease_seconds: int,
              on_results: Callable[[list[Result]], None] | None = None) -> ChunkOutcome:
    chunk: Chunk | None = db.retrying(lambda s: work.claim_chunk(s, chunk_id, worker, lease_seconds))
    if chunk is None:
        log.info("chunk %s is done or held by a live worker; skipping", chunk_id)
        return ChunkOutcome(claimed=False)
    outcome = ChunkOutcome(claimed=True)
    job, items = db.retrying(lambda s: (s.get(Job, chunk.job_id), work.running_items(s, chunk_id)), write=False)
    if job.status in (JobStatus.cancelling, JobStatus.cancelled):
        db.retrying(lambda s: (work.cancel_running(s, chunk), work.finish_chunk(s, chunk, worker)))
        return outcome
    heartbeat = Heartbeat(db, chunk_id, worker, lease_seconds)
    heartbeat.start()
    lines = {item.id: item.line for item in items}
    try:
        for results in engine.generate([to_request(item, job) for item in items]):
            rows = [to_item_result(r, lines.get(r.id)) for r in results]
            if not db.retrying(lambda s: work.record_results(s, chunk, worker, rows, lease_seconds)):
                log.warning("lost the lease on chunk %s; another worker has it", chunk_id)
                outcome.lost = True
                return outcome
            outcome.done += len(results)
            outcome.completion_tokens += sum(r.usage.completion_tokens for r in results)
            if on_results:
                on_results(results)
            if _cancelling(db, job.id):
                # Stop within one micro-batch: the rest of this chunk is cancelled, results kept.
                db.retrying(lambda s: work.cancel_running(s, chunk))
                break
        db.retrying(lambda s: work.finish_chunk(s, chunk, worker))
        return outcome
    finally:
        heartbeat.stop()


def _cancelling(db: Database, job_id: str) -> bool:
    status = db.retrying(lambda s: s.get(Job, job_id).status, write=False)
    return status in (JobStatus.cancelling, JobStatus.cancelled)
