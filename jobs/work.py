"""How a chunk of work moves through its states, with the job's counters kept in step.

Every function takes a session inside the caller's write transaction, so each transition
commits whole or not at all. Guards in the WHERE clauses make each one idempotent: a chunk
delivered twice, or taken up again after its worker died, never yields a second result for
an item, and nothing final is overwritten.

Lock order. A transaction that writes rows of more than one table locks the job's row first
(`lock_job`, SELECT ... FOR UPDATE), then its chunks, then its items, and moves the job's
counters last (that row is already held). Every such transaction of one job therefore queues on
the job's row before it holds anything else, so two of them (a claim and a cancel, say) can
never wait on each other in a cycle on PostgreSQL. SQLite takes the whole database at BEGIN
IMMEDIATE, so there the order is moot.

Clocks. Leases and heartbeats are stamped and compared with the database's clock (`db_time`),
never a host's, so a worker whose clock is skewed can neither steal a live chunk nor let its
own lease lapse early.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import String, and_, bindparam, func, or_, select, type_coerce, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from .models import Chunk, ChunkStatus, Item, ItemStatus, Job, JobStatus, UTCDateTime, utcnow

ITEMS = Item.__table__
DEFAULT_MAX_ATTEMPTS = 3
ENGINE_ERROR = "engine_error"


def db_time(session: Session, seconds: int = 0) -> ColumnElement:
    """The database's current time plus `seconds`, as SQL comparable with UTCDateTime columns."""
    if session.get_bind().dialect.name == "sqlite":
        # UTCDateTime stores naive UTC text with microseconds; build the same layout ('%f' is
        # SS.SSS), so text comparison orders it correctly against stored values.
        text = func.strftime("%Y-%m-%d %H:%M:%f", "now", f"{seconds:+d} seconds", type_=String).concat("000")
        return type_coerce(text, UTCDateTime())
    return func.now() + timedelta(seconds=seconds)


def lock_job(session: Session, job_id: str) -> None:
    """Take the job's row lock: the first lock of any transaction that writes more than one table."""
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())


@dataclass(frozen=True)
class ItemResult:
    """What a worker writes back for one item."""

    item_id: int
    status: ItemStatus  # succeeded or failed; cancelled for one dropped from the engine on cancel
    output: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error_code: str | None = None
    error_message: str | None = None
    logprobs: list | None = None  # issue 10
    choices: list | None = None  # issue 10: choices 1..n-1
    cached_tokens: int = 0  # of prompt_tokens, from a shared prefix
    warning: str | None = None
    embedding: bytes | None = None  # issue 21: float32 vectors, one per input (jobs/embeddings.pack)
    embedding_dim: int | None = None


def bump_counters(session: Session, job_id: str, **deltas: int) -> None:
    """Add to the job's counters in one statement (`x = x + n`), safe under concurrent writers."""
    deltas = {k: v for k, v in deltas.items() if v}
    if deltas:
        cols = Job.__table__.c
        session.execute(update(Job).where(Job.id == job_id).values({cols[k]: cols[k] + v for k, v in deltas.items()}))


def claim_chunk(session: Session, chunk_id: int, worker: str, lease_seconds: int,
                max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> Chunk | None:
    """Take a chunk that is pending, or running under a lapsed lease; None if someone else holds it.

    A chunk already tried `max_attempts` times is not run again: its unfinished items fail with
    engine_error and the last cause (None is returned), so one poison chunk cannot loop forever.
    """
    job_id = session.scalar(select(Chunk.job_id).where(Chunk.id == chunk_id))  # never changes: no lock needed
    if job_id is None:
        return None
    lock_job(session, job_id)
    now = utcnow()
    taken = session.execute(
        update(Chunk)
        .where(Chunk.id == chunk_id,
               or_(Chunk.status == ChunkStatus.pending,
                   and_(Chunk.status == ChunkStatus.running, Chunk.lease_until < db_time(session))))
        .values(status=ChunkStatus.running, worker=worker, lease_until=db_time(session, lease_seconds),
                attempts=Chunk.attempts + 1)
        .returning(Chunk.attempts)
    ).scalar()
    if taken is None:
        return None
    chunk = session.get(Chunk, chunk_id)
    if taken > max_attempts:
        give_up_chunk(session, chunk, worker, max_attempts)
        return None
    started = session.execute(
        update(Item).where(Item.chunk_id == chunk_id, Item.status == ItemStatus.pending)
        .values(status=ItemStatus.running)
    ).rowcount
    # Items left running by a dead worker are ours now too.
    session.execute(
        update(Item).where(Item.chunk_id == chunk_id, Item.status == ItemStatus.running)
        .values(worker=worker, started_at=now, attempts=Item.attempts + 1)
    )
    bump_counters(session, chunk.job_id, pending=-started, running=started)
    session.execute(
        update(Job).where(Job.id == chunk.job_id, Job.status == JobStatus.queued)
        .values(status=JobStatus.running, started_at=now)
    )
    return chunk


def next_pending_chunk(session: Session, job_id: str) -> int | None:
    """The job's first chunk still waiting for a worker, for a worker that can take more now."""
    return session.scalar(select(Chunk.id).where(Chunk.job_id == job_id, Chunk.status == ChunkStatus.pending)
                          .order_by(Chunk.seq).limit(1))


def running_items(session: Session, chunk_id: int) -> list[Item]:
    """The chunk's unfinished items, in one query."""
    return list(session.scalars(
        select(Item).where(Item.chunk_id == chunk_id, Item.status == ItemStatus.running).order_by(Item.line)
    ))


def give_up_chunk(session: Session, chunk: Chunk, worker: str, max_attempts: int) -> int:
    """Fail the chunk's unfinished items with engine_error and its last cause; the chunk is done."""
    cause = chunk.last_error or "no cause was recorded"
    message = f"gave up after {max_attempts} attempt(s) at this chunk; last cause: {cause}"
    now = utcnow()
    pending = _count(session, chunk.id, ItemStatus.pending)
    n = session.execute(
        update(Item).where(Item.chunk_id == chunk.id, Item.status.in_([ItemStatus.pending, ItemStatus.running]))
        .values(status=ItemStatus.failed, worker=worker, finished_at=now, error_code=ENGINE_ERROR,
                error_message=message)
    ).rowcount
    session.execute(update(Chunk).where(Chunk.id == chunk.id)
                    .values(status=ChunkStatus.done, finished_at=now, lease_until=None))
    bump_counters(session, chunk.job_id, pending=-pending, running=-(n - pending), failed=n)
    finish_job_if_done(session, chunk.job_id)
    return n


def _count(session: Session, chunk_id: int, status: ItemStatus) -> int:
    return session.scalar(select(func.count()).where(Item.chunk_id == chunk_id, Item.status == status))


def fail_attempt(session: Session, chunk: Chunk, worker: str, cause: str) -> bool:
    """Record why this attempt failed and hand the chunk back at once (no wait for the lease to lapse).

    Its items stay running: the next claim takes them up, or gives up on them.
    """
    return bool(session.execute(
        update(Chunk).where(Chunk.id == chunk.id, Chunk.worker == worker, Chunk.status == ChunkStatus.running)
        .values(status=ChunkStatus.pending, worker=None, lease_until=None, last_error=cause[:2000])
    ).rowcount)


def renew_lease(session: Session, chunk_id: int, worker: str, lease_seconds: int) -> bool:
    """Extend our lease; False if the chunk is no longer ours (it lapsed and was taken up)."""
    return bool(session.execute(
        update(Chunk).where(Chunk.id == chunk_id, Chunk.worker == worker, Chunk.status == ChunkStatus.running)
        .values(lease_until=db_time(session, lease_seconds))
    ).rowcount)


_WRITE_RESULT = (
    update(ITEMS)
    .where(ITEMS.c.id == bindparam("_id"), ITEMS.c.status == ItemStatus.running.value)
    .values(status=bindparam("_status"), output=bindparam("_output"), finish_reason=bindparam("_finish"),
            prompt_tokens=bindparam("_pt"), completion_tokens=bindparam("_ct"), cached_tokens=bindparam("_cached"),
            started_at=bindparam("_started"), finished_at=bindparam("_finished"), latency_ms=bindparam("_latency"),
            error_code=bindparam("_code"), error_message=bindparam("_message"), warning=bindparam("_warning"),
            logprobs=bindparam("_logprobs", type_=ITEMS.c.logprobs.type),
            choices=bindparam("_choices", type_=ITEMS.c.choices.type),
            embedding=bindparam("_embedding", type_=ITEMS.c.embedding.type), embedding_dim=bindparam("_dim"))
)


def record_results(session: Session, chunk: Chunk, worker: str, results: list[ItemResult],
                   lease_seconds: int) -> bool:
    """Write one micro-batch of results in one statement; False (nothing written) if we lost the chunk.

    The job's row lock, then the lease renewal's chunk row lock, come first, so a worker that
    takes the chunk over waits for this transaction, and then sees these items final.
    """
    lock_job(session, chunk.job_id)
    if not renew_lease(session, chunk.id, worker, lease_seconds):
        return False
    if not results:
        return True
    rows = []
    for r in results:
        latency = None
        if r.started_at and r.finished_at:
            latency = max(0, int((r.finished_at - r.started_at).total_seconds() * 1000))
        rows.append(dict(_id=r.item_id, _status=r.status.value, _output=r.output, _finish=r.finish_reason,
                         _pt=r.prompt_tokens, _ct=r.completion_tokens, _started=r.started_at,
                         _finished=r.finished_at, _latency=latency, _code=r.error_code, _message=r.error_message,
                         _logprobs=r.logprobs, _choices=r.choices, _cached=r.cached_tokens, _warning=r.warning,
                         _embedding=r.embedding, _dim=r.embedding_dim))
    written = session.execute(_WRITE_RESULT, rows).rowcount
    if written == len(rows):
        ok = sum(r.status is ItemStatus.succeeded for r in results)
        cancelled = sum(r.status is ItemStatus.cancelled for r in results)  # dropped from the engine on cancel
        bump_counters(session, chunk.job_id, running=-len(results), succeeded=ok, cancelled=cancelled,
                      failed=len(results) - ok - cancelled,
              prompt_tokens=sum(r.prompt_tokens for r in results),
              completion_tokens=sum(r.completion_tokens for r in results),
              cached_tokens=sum(r.cached_tokens for r in results))
    else:  # some were final already (the guard kept them): count from the rows instead
        recount_job(session, chunk.job_id)
    finish_job_if_done(session, chunk.job_id)
    return True


def recount_job(session: Session, job_id: str) -> None:
    """Set the job's counters from its items: one aggregate over the (job_id, status) index."""
    counts = {s.value: 0 for s in ItemStatus}
    prompt = completion = cached = 0
    for status, n, pt, ct, cc in session.execute(
        select(Item.status, func.count(), func.coalesce(func.sum(Item.prompt_tokens), 0),
               func.coalesce(func.sum(Item.completion_tokens), 0), func.coalesce(func.sum(Item.cached_tokens), 0))
        .where(Item.job_id == job_id).group_by(Item.status)
    ):
        counts[ItemStatus(status).value] = n
        prompt += pt
        completion += ct
        cached += cc
    session.execute(update(Job).where(Job.id == job_id).values(
        total=sum(counts.values()), prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
        **counts))


def cancel_running(session: Session, chunk: Chunk) -> int:
    """Mark the chunk's unfinished items cancelled (its job is being cancelled)."""
    lock_job(session, chunk.job_id)
    n = session.execute(
        update(Item).where(Item.chunk_id == chunk.id, Item.status == ItemStatus.running)
        .values(status=ItemStatus.cancelled, finished_at=utcnow())
    ).rowcount
    bump_counters(session, chunk.job_id, running=-n, cancelled=n)
    finish_job_if_done(session, chunk.job_id)
    return n


def finish_chunk(session: Session, chunk: Chunk, worker: str) -> int:
    """Mark our chunk done. An item the engine returned no result for fails with engine_error
    rather than staying running forever; returns how many did."""
    lock_job(session, chunk.job_id)
    now = utcnow()
    if not session.execute(
        update(Chunk).where(Chunk.id == chunk.id, Chunk.worker == worker, Chunk.status == ChunkStatus.running)
        .values(status=ChunkStatus.done, finished_at=now, lease_until=None)
    ).rowcount:
        return 0
    stranded = session.execute(
        update(Item).where(Item.chunk_id == chunk.id, Item.status == ItemStatus.running)
        .values(status=ItemStatus.failed, finished_at=now, error_code=ENGINE_ERROR,
                error_message="the engine returned no result for this item")
    ).rowcount
    if stranded:
        bump_counters(session, chunk.job_id, running=-stranded, failed=stranded)
        finish_job_if_done(session, chunk.job_id)
    return stranded


def finish_job_if_done(session: Session, job_id: str) -> None:
    """completed (or cancelled) once nothing is pending or running."""
    now = utcnow()
    for before, after in ((JobStatus.cancelling, JobStatus.cancelled),
                          (JobStatus.running, JobStatus.completed), (JobStatus.queued, JobStatus.completed)):
        session.execute(
            update(Job).where(Job.id == job_id, Job.status == before, Job.pending == 0, Job.running == 0)
            .values(status=after, finished_at=now)
        )


Requeue = dict[str, list[tuple[str, int]]]  # model -> [(job_id, chunk_id)]: what to publish, on which queue


def _by_model(rows) -> Requeue:
    by_model: Requeue = {}
    for model, job_id, chunk_id in rows:
        by_model.setdefault(model, []).append((job_id, chunk_id))
    return by_model


def release_stale_chunks(session: Session) -> Requeue:
    """Hand back chunks whose lease lapsed (their worker died), to be queued again."""
    stale = session.execute(
        update(Chunk).where(Chunk.status == ChunkStatus.running, Chunk.lease_until < db_time(session))
        .values(status=ChunkStatus.pending, enqueued_at=db_time(session), worker=None,
                last_error=func.coalesce("worker " + Chunk.worker, "a worker")
                + " stopped renewing its lease (killed, crashed or cut off)")
        .returning(Chunk.job_id, Chunk.id)
    ).all()
    if not stale:
        return {}
    models = dict(session.execute(select(Job.id, Job.model).where(Job.id.in_({job_id for job_id, _ in stale}))).all())
    return _by_model((models[job_id], job_id, chunk_id) for job_id, chunk_id in sorted(stale, key=lambda r: r[1]))


def unstarted_chunks(session: Session, older_than_seconds: int) -> Requeue:
    """Pending chunks queued over `older_than_seconds` ago (database time): their messages may be lost."""
    return _by_model(session.execute(
        select(Job.model, Chunk.job_id, Chunk.id).join(Job, Job.id == Chunk.job_id)
        .where(Chunk.status == ChunkStatus.pending, Chunk.enqueued_at < db_time(session, -older_than_seconds),
               Job.status.in_([JobStatus.queued, JobStatus.running]))
        .order_by(Chunk.id)
    ).all())


def mark_enqueued(session: Session, chunk_ids: list[int]) -> None:
    """Stamp when these chunks' messages were published (a chunk already taken keeps its stamp)."""
    for i in range(0, len(chunk_ids), 1000):
        session.execute(update(Chunk).where(Chunk.id.in_(chunk_ids[i:i + 1000]), Chunk.status == ChunkStatus.pending)
                        .values(enqueued_at=db_time(session)))


def settle_cancelled_chunks(session: Session) -> int:
    """Finish pending chunks of cancelling jobs without running them; returns how many.

    Such a chunk (released by the sweep, its message maybe never published) would otherwise
    hold its job in `cancelling` forever: its items are cancelled and the job can finish.
    """
    rows = session.execute(
        select(Chunk.job_id, Chunk.id).join(Job, Job.id == Chunk.job_id)
        .where(Chunk.status == ChunkStatus.pending, Job.status.in_([JobStatus.cancelling, JobStatus.cancelled]))
        .order_by(Chunk.job_id, Chunk.id)
    ).all()
    settled = 0
    for job_id, chunk_id in rows:
        lock_job(session, job_id)
        if not session.execute(update(Chunk).where(Chunk.id == chunk_id, Chunk.status == ChunkStatus.pending)
                               .values(status=ChunkStatus.done, finished_at=utcnow(), lease_until=None)).rowcount:
            continue  # a worker claimed it meanwhile; it cancels the items itself
        pending = _count(session, chunk_id, ItemStatus.pending)
        n = session.execute(update(Item).where(Item.chunk_id == chunk_id,
                                               Item.status.in_([ItemStatus.pending, ItemStatus.running]))
                            .values(status=ItemStatus.cancelled, finished_at=utcnow())).rowcount
        bump_counters(session, job_id, pending=-pending, running=-(n - pending), cancelled=n)
        finish_job_if_done(session, job_id)
        settled += 1
    return settled
