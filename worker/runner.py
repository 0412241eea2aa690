"""Run a chunk: claim it, generate its items, write results per micro-batch, release it.

The same code runs inside the Celery task and in `llmbatch run`'s in-process drain. It holds
each chunk under a lease that a heartbeat thread keeps renewing; a worker that dies stops
renewing, and the chunk is taken up again once the lease lapses.

The GPU never waits on the database. The engine runs on the calling thread; a bookkeeper thread
beside it does every database round trip of the run: it writes each micro-batch of results (one
transaction each, in the order the engine yielded them), claims the job's next pending chunk
when the engine asks for more work (handed over at the engine's next ask, so the tail of one
chunk decodes with the head of the next), and watches the job for a cancel. The engine only
waits when the bookkeeper falls WRITE_BACKLOG micro-batches behind (back-pressure, so a database
that stays down does not pile results up in memory), or when it has nothing left to run but a
claim still in flight. A chunk's own message, when it arrives, finds it taken or done and is
skipped.

Cancel: once the job is cancelling, the ids of every item held go to the engine's `cancelled`
hook; the engine drops their rows at its next step and hands them back as cancelled results,
which are written like any other (so whatever finished first is kept). A chunk whose lease was
lost is dropped from the engine the same way.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
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

WRITE_BACKLOG = 64  # micro-batches the bookkeeper may fall behind before the engine waits for it
CANCEL_POLL_S = 0.5  # how often the bookkeeper reads the job's status while results are quiet
CANCELLED = "cancelled"  # the engine's finish_reason (and error_code) for a dropped request


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
    engine knows requests, not lines). A request the engine dropped on cancel ends `cancelled`."""
    if getattr(r, "finish_reason", None) == CANCELLED:  # an EmbedResult has none
        return work.ItemResult(item_id=r.id, status=ItemStatus.cancelled, prompt_tokens=r.usage.prompt_tokens,
                               completion_tokens=r.usage.completion_tokens, started_at=_ts(r.started_at),
                               finished_at=_ts(r.finished_at), cached_tokens=r.usage.cached_tokens)
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


_END = object()  # the engine is done: write what is queued, settle the chunks still held, stop


class Bookkeeper(threading.Thread):
    """Every database round trip of a run, on a thread beside the engine (see the module docstring).

    The engine thread calls put() with each micro-batch, more() and cancelled() from inside
    engine.generate, and take_claimed() once the engine has run out of work. State the two threads
    share is guarded by one lock; the database is touched from this thread only (and the heartbeat's).
    """

    def __init__(self, db: Database, job: Job, worker: str, lease_seconds: int, max_attempts: int,
                 prefetch: bool, heartbeat: Heartbeat, outcome: ChunkOutcome):
        super().__init__(daemon=True, name=f"bookkeeper-{worker}")
        self.db, self.job, self.worker = db, job, worker
        self.lease_seconds, self.max_attempts = lease_seconds, max_attempts
        self.heartbeat, self.outcome = heartbeat, outcome
        self.results: queue.Queue = queue.Queue(maxsize=WRITE_BACKLOG)
        self.lock = threading.Lock()
        self.answered = threading.Condition(self.lock)
        self.held: dict[int, Held] = {}
        self.owner: dict[int, int] = {}  # item id -> chunk id
        self.lines: dict[int, int] = {}  # item id -> its input line
        self.claimed: list[Request] = []  # claimed, not yet handed to the engine
        self.wanted = False  # the engine asked for more and no claim has answered yet
        self.exhausted = not prefetch  # no further chunk will be claimed
        self.dropped: frozenset[int] = frozenset()  # item ids the engine should drop (only grows)
        self.cancelling = False
        self.error: BaseException | None = None
        self.handback: str | None = None  # set by abort(): hand the held chunks back with this cause

    # -- the engine thread's side --------------------------------------------

    def hold(self, chunk: Chunk, items: list[Item]) -> list[Request]:
        with self.lock:
            return self._hold(chunk, items)

    def more(self) -> list[Request]:
        """The engine's `more`: requests claimed since it last asked; never waits on the database."""
        with self.lock:
            fresh, self.claimed = self.claimed, []
            if not fresh and not self.exhausted:
                self.wanted = True  # the bookkeeper claims the next chunk; handed over at the next ask
            return fresh

    def cancelled(self) -> frozenset[int]:
        """The engine's `cancelled` hook: asked once per step, so just a read."""
        return self.dropped

    def put(self, results: list[Result]) -> None:
        """Queue a micro-batch for writing; waits only while WRITE_BACKLOG are queued (back-pressure)."""
        self._raise_if_failed()
        while True:
            try:
                self.results.put(results, timeout=1.0)
                return
            except queue.Full:
                self._raise_if_failed()

    def take_claimed(self) -> list[Request]:
        """The engine ran out of work: wait for the claim it asked for (if any) and take what came."""
        with self.answered:
            while self.wanted and self.error is None and self.is_alive():
                self.answered.wait(0.5)
            fresh, self.claimed = self.claimed, []
        self._raise_if_failed()
        return fresh

    def finish(self) -> None:
        self._close()
        self._raise_if_failed()

    def abort(self, cause: str) -> None:
        """The engine failed: write what it finished, then hand the held chunks back with `cause`."""
        self.handback = cause
        self._close()

    def _close(self) -> None:
        while self.is_alive():
            try:
                self.results.put(_END, timeout=1.0)
                break
            except queue.Full:
                continue
        self.join()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    # -- this thread ---------------------------------------------------------

    def _hold(self, chunk: Chunk, items: list[Item]) -> list[Request]:
        self.held[chunk.id] = Held(chunk, {i.id for i in items})
        self.owner.update((i.id, chunk.id) for i in items)
        self.lines.update((i.id, i.line) for i in items)
        self.heartbeat.chunks.add(chunk.id)
        return [to_request(i, self.job) for i in items]

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # the engine thread raises it at its next put()
            self.error = exc
            with self.answered:
                self.answered.notify_all()
            self._drain()

    def _serve(self) -> None:
        checked = time.monotonic()
        while True:
            try:
                results = self.results.get(timeout=CANCEL_POLL_S / 2)
            except queue.Empty:
                results = None
            if results is _END:
                self._settle()
                return
            if results:
                self._write(results)
            if time.monotonic() - checked >= CANCEL_POLL_S:
                checked = time.monotonic()
                self._check_cancel()
            if self.wanted:
                self._claim_next()

    def _drain(self) -> None:
        """After a failure: keep taking micro-batches (dropped) so the engine thread never blocks on put()."""
        while self.results.get() is not _END:
            pass

    def _write(self, results: list[Result]) -> None:
        by_chunk: dict[int, list[Result]] = {}
        for r in results:
            by_chunk.setdefault(self.owner[r.id], []).append(r)
        for cid, rs in by_chunk.items():
            h = self.held.get(cid)
            if h is None:
                continue  # lost earlier: another worker has it
            rows = [to_item_result(r, self.lines.get(r.id)) for r in rs]
            if not self.db.retrying(lambda s: work.record_results(s, h.chunk, self.worker, rows, self.lease_seconds)):
                log.warning("lost the lease on chunk %s; another worker has it", cid)
                self.outcome.lost = True
                self._release(cid, drop=True)
                continue
            h.waiting -= {r.id for r in rs}
            self.outcome.done += sum(getattr(r, "finish_reason", None) != CANCELLED for r in rs)
            self.outcome.completion_tokens += sum(r.usage.completion_tokens for r in rs)
            if not h.waiting:
                self.db.retrying(lambda s: work.finish_chunk(s, h.chunk, self.worker))
                self._release(cid)

    def _release(self, chunk_id: int, drop: bool = False) -> None:
        with self.lock:
            h = self.held.pop(chunk_id)
            if drop and h.waiting:  # the engine need not spend a step more on them
                self.dropped = self.dropped | h.waiting
        self.heartbeat.chunks.discard(chunk_id)

    def _check_cancel(self) -> None:
        if self.cancelling:
            return
        status = self.db.retrying(lambda s: s.get(Job, self.job.id).status, write=False)
        if status not in (JobStatus.cancelling, JobStatus.cancelled):
            return
        log.info("job %s is cancelled: dropping its %d held item(s) from the engine", self.job.id,
                 sum(len(h.waiting) for h in self.held.values()))
        with self.answered:
            unfed = {self.owner[r.id] for r in self.claimed}  # claimed, never handed to the engine
            self.cancelling, self.exhausted, self.claimed = True, True, []
            self.dropped = self.dropped | {i for h in self.held.values() for i in h.waiting}
            if self.wanted:
                self.wanted = False
                self.answered.notify_all()
        for cid in unfed:
            h = self.held[cid]
            self.db.retrying(lambda s: (work.cancel_running(s, h.chunk), work.finish_chunk(s, h.chunk, self.worker)))
            self._release(cid)

    def _claim_next(self) -> None:
        """Claim the job's next pending chunk for the engine (none when the job has no more)."""
        fresh: list[Request] = []
        while not self.cancelling:
            next_id = self.db.retrying(lambda s: work.next_pending_chunk(s, self.job.id), write=False)
            if next_id is None:
                break
            nxt = _take(self.db, next_id, self.worker, self.lease_seconds, self.max_attempts)
            if nxt is not None:  # else another worker took it first: look again
                log.info("job %s: feeding chunk %s while chunk(s) %s finish", self.job.id, next_id, sorted(self.held))
                with self.lock:
                    fresh = self._hold(nxt[0], nxt[2])
                break
        with self.answered:
            self.claimed += fresh
            self.exhausted = self.exhausted or not fresh
            self.wanted = False
            self.answered.notify_all()

    def _settle(self) -> None:
        """The engine is done: the chunks still held are handed back, cancelled, or done."""
        for cid, h in list(self.held.items()):
            if self.handback is not None:
                self.db.retrying(lambda s: work.fail_attempt(s, h.chunk, self.worker, self.handback))
            elif self.cancelling:
                self.db.retrying(lambda s: (work.cancel_running(s, h.chunk), work.finish_chunk(s, h.chunk, self.worker)))
            else:  # the engine ended without a result for some items: finish_chunk fails them
                self.db.retrying(lambda s: work.finish_chunk(s, h.chunk, self.worker))
            self._release(cid)


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
    heartbeat = Heartbeat(db, worker, lease_seconds)
    book = Bookkeeper(db, job, worker, lease_seconds, max_attempts, prefetch, heartbeat, outcome)
    requests = book.hold(chunk, items)
    heartbeat.start()
    book.start()
    try:
        while requests:
            for results in _run(engine, job)(requests, more=book.more, cancelled=book.cancelled):
                book.put(results)
                if on_results:
                    on_results(results)
            requests = book.take_claimed()  # a chunk claimed as the engine went idle
        book.finish()
        return outcome
    except Exception as exc:
        # Write what finished, keep the cause with each chunk held and hand them back now; after
        # max_attempts one is given up.
        cause = f"{type(exc).__name__}: {exc}"
        if book.error is None:
            book.abort(cause)
        else:  # the bookkeeper itself failed (the database): a last try, else the leases lapse
            book.abort(cause)
            for h in list(book.held.values()):
                try:
                    db.retrying(lambda s: work.fail_attempt(s, h.chunk, worker, cause), attempts=1)
                except Exception:
                    log.warning("could not hand chunk %s back; its lease will lapse", h.chunk.id)
        raise
    finally:
        heartbeat.stop()


def _run(engine, job: Job):
    """issue 21: an embedding job's chunks run through the engine's `embed`, a text job's through `generate`."""
    if job.task != "embed":
        return engine.generate
    if not hasattr(engine, "embed"):
        raise RuntimeError(f"job {job.id} asks for embeddings, but this worker's model generates text")
    # A pool of vectors takes well under a second: a cancel is met at the next chunk, not inside one.
    return lambda requests, more=None, cancelled=None: engine.embed(requests, more=more)
