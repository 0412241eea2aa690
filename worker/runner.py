"""Run a chunk: claim it, generate its items, write results per micro-batch, release it.

The same code runs inside the Celery task and in `llmbatch run`'s in-process drain. It holds
each chunk under a lease that a heartbeat thread keeps renewing; a worker that dies stops
renewing, and the chunk is taken up again once the lease lapses.

While a chunk's tail decodes, the engine asks for more work, and the next pending chunk of the
same job is claimed from the database and fed in, so the GPU never idles between chunks. That
chunk's own message, when it arrives, finds it taken or done and is skipped.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from llmbatch.jobs import work
from llmbatch.jobs.adapters import source_of
from llmbatch.jobs.db import Database
from llmbatch.jobs.models import Chunk, Item, ItemStatus, Job, JobStatus
from llmbatch.worker.embedder import EmbedRequest, EmbedResult, embed_item_result, to_embed_request
from llmbatch.worker.engine import Request, Result, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class ChunkOutcome:
    claimed: bool
    done: int = 0  # items given a final result
    completion_tokens: int = 0
    lost: bool = False  # the lease lapsed and another worker took the chunk


def to_request(item: Item, job: Job) -> Request | EmbedRequest:
    req = item.request or {}
    if "input" in req:  # issue 21: an embedding line
        return to_embed_request(item.id, req)
    params = SamplingParams.from_dict({**(job.params or {}), **req.get("params", {})})
    return Request(id=item.id, prompt=req.get("prompt"), messages=req.get("messages"), params=params,
                   adapter=source_of(req.get("adapter"), job.adapters))


def _ts(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=timezone.utc)


def to_item_result(r: Result | EmbedResult, line: int | None = None) -> work.ItemResult:
    """The row to write; `line` prefixes an error message, as bad input lines' errors are (the
    engine knows requests, not lines)."""
    message = r.error_message
    if message is not None and line is not None:
        message = f"line {line}: {message}"
    if isinstance(r, EmbedResult):  # issue 21: vectors, stored as float32 bytes
        return embed_item_result(r, message)
    return work.ItemResult(
        item_id=r.id, status=ItemStatus.succeeded if r.ok else ItemStatus.failed, output=r.output,
        finish_reason=r.finish_reason, prompt_tokens=r.usage.prompt_tokens,
        completion_tokens=r.usage.completion_tokens, started_at=_ts(r.started_at), finished_at=_ts(r.finished_at),
        error_code=r.error_code, error_message=message, warning=r.warning, logprobs=r.logprobs,
        cached_tokens=r.usage.cached_tokens,
        choices=[{"output": c.output, "finish_reason": c.finish_reason, "completion_tokens": c.completion_tokens,
                  "logprobs": c.logprobs} for c in r.choices] or None)


class Heartbeat(threading.Thread):
    """Renews the leases of the chunks held, every third of a lease, while long micro-batches run."""

    def __init__(self, db: Database, worker: str, lease_seconds: int):
        super().__init__(daemon=True, name=f"lease-{worker}")
        self.db, self.worker, self.lease_seconds = db, worker, lease_seconds
        self.chunks: set[int] = set()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.lease_seconds / 3):
            for chunk_id in list(self.chunks):
                try:
                    if not self.db.retrying(lambda s: work.renew_lease(s, chunk_id, self.worker, self.lease_seconds)):
                        self.chunks.discard(chunk_id)  # taken over; record_results will say so too
                except Exception:  # the database is down: keep trying, the lease has slack
                    log.warning("could not renew the lease on chunk %s", chunk_id, exc_info=True)

    def stop(self) -> None:
        self.stopped.set()


@dataclass
class Held:
    """A chunk this worker holds, and its items still without a result."""

    chunk: Chunk
    waiting: set[int]


def _take(db: Database, chunk_id: int, worker: str, lease_seconds: int, max_attempts: int):
    """Claim a chunk and read its job and unfinished items; None if it is done, held elsewhere, or
    given up (after max_attempts claims its unfinished items fail)."""
    chunk = db.retrying(lambda s: work.claim_chunk(s, chunk_id, worker, lease_seconds, max_attempts))
    if chunk is None:
        return None
    job, items = db.retrying(lambda s: (s.get(Job, chunk.job_id), work.running_items(s, chunk_id)), write=False)
    return chunk, job, items


def run_chunk(db: Database, engine, chunk_id: int, worker: str, lease_seconds: int,
              on_results: Callable[[list[Result]], None] | None = None, prefetch: bool = True,
              max_attempts: int = work.DEFAULT_MAX_ATTEMPTS) -> ChunkOutcome:
    """Run the chunk and, with prefetch, the job's next pending chunks as the engine asks for more."""
    taken = _take(db, chunk_id, worker, lease_seconds, max_attempts)
    if taken is None:
        log.info("chunk %s is done or held by a live worker; skipping", chunk_id)
        return ChunkOutcome(claimed=False)
    chunk, job, items = taken
    outcome = ChunkOutcome(claimed=True)
    if job.status in (JobStatus.cancelling, JobStatus.cancelled):
        db.retrying(lambda s: (work.cancel_running(s, chunk), work.finish_chunk(s, chunk, worker)))
        return outcome
    held: dict[int, Held] = {}
    owner: dict[int, int] = {}  # item id -> chunk id
    lines: dict[int, int] = {}  # item id -> its input line
    heartbeat = Heartbeat(db, worker, lease_seconds)

    def hold(c: Chunk, its_items: list[Item]) -> list[Request]:
        held[c.id] = Held(c, {i.id for i in its_items})
        owner.update((i.id, c.id) for i in its_items)
        lines.update((i.id, i.line) for i in its_items)
        heartbeat.chunks.add(c.id)
        return [to_request(i, job) for i in its_items]

    def more() -> list[Request]:
        """The job's next pending chunk, claimed now; none when the job has no more."""
        while prefetch:
            next_id = db.retrying(lambda s: work.next_pending_chunk(s, job.id), write=False)
            if next_id is None:
                return []
            nxt = _take(db, next_id, worker, lease_seconds, max_attempts)
            if nxt is not None:  # else another worker took it first: look again
                log.info("job %s: feeding chunk %s while chunk(s) %s finish", job.id, next_id, sorted(held))
                return hold(nxt[0], nxt[2])
        return []

    requests = hold(chunk, items)
    heartbeat.start()
    try:
        for results in _run(engine, job)(requests, more=more):
            by_chunk: dict[int, list[Result]] = {}
            for r in results:
                by_chunk.setdefault(owner[r.id], []).append(r)
            for cid, rs in by_chunk.items():
                h = held.get(cid)
                if h is None:
                    continue  # lost earlier: another worker has it
                rows = [to_item_result(r, lines.get(r.id)) for r in rs]
                if not db.retrying(lambda s: work.record_results(s, h.chunk, worker, rows, lease_seconds)):
                    log.warning("lost the lease on chunk %s; another worker has it", cid)
                    outcome.lost = True
                    heartbeat.chunks.discard(cid)
                    del held[cid]
                    continue
                h.waiting -= {r.id for r in rs}
                outcome.done += len(rs)
                outcome.completion_tokens += sum(r.usage.completion_tokens for r in rs)
                if not h.waiting:
                    db.retrying(lambda s: work.finish_chunk(s, h.chunk, worker))
                    heartbeat.chunks.discard(cid)
                    del held[cid]
            if on_results:
                on_results(results)
            if not held:
                break  # everything held is written or lost
            if _cancelling(db, job.id):
                # Stop within one micro-batch: the rest of the held chunks is cancelled, results kept.
                for h in held.values():
                    db.retrying(lambda s: (work.cancel_running(s, h.chunk), work.finish_chunk(s, h.chunk, worker)))
                held.clear()
                break
        for h in held.values():  # the engine ended without a result for some items
            db.retrying(lambda s: work.finish_chunk(s, h.chunk, worker))
        return outcome
    except Exception as exc:
        # Keep the cause with each chunk held and hand them back now; after max_attempts one is given up.
        cause = f"{type(exc).__name__}: {exc}"
        for h in held.values():
            db.retrying(lambda s: work.fail_attempt(s, h.chunk, worker, cause))
        raise
    finally:
        heartbeat.stop()


def _run(engine, job: Job):
    """issue 21: an embedding job's chunks run through the engine's `embed`, a text job's through `generate`."""
    if job.task != "embed":
        return engine.generate
    if not hasattr(engine, "embed"):
        raise RuntimeError(f"job {job.id} asks for embeddings, but this worker's model generates text")
    return engine.embed


def _cancelling(db: Database, job_id: str) -> bool:
    status = db.retrying(lambda s: s.get(Job, job_id).status, write=False)
    return status in (JobStatus.cancelling, JobStatus.cancelled)
