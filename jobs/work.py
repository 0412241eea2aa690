"""How a chunk of work moves through its states, with the job's counters kept in step.

Every function takes a session inside the caller's write transaction, so each transition
commits whole or not at all. Guards in the WHERE clauses make each one idempotent: a chunk
delivered twice, or taken up again after its worker died, never yields a second result for
an item, and nothing final is overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from .models import Chunk, ChunkStatus, Item, ItemStatus, Job, JobStatus, utcnow

ITEMS = Item.__table__


@dataclass(frozen=True)
class ItemResult:
    """What a worker writes back for one item."""

    item_id: int
    status: ItemStatus  # succeeded or failed
    output: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error_code: str | None = None
    error_message: str | None = None
    warning: str | None = None


def bump_counters(session: Session, job_id: str, **deltas: int) -> None:
    """Add to the job's counters in one statement (`x = x + n`), safe under concurrent writers."""
    deltas = {k: v for k, v in deltas.items() if v}
    if deltas:
        cols = Job.__table__.c
        session.execute(update(Job).where(Job.id == job_id).values({cols[k]: cols[k] + v for k, v in deltas.items()}))


def claim_chunk(session: Session, chunk_id: int, worker: str, lease_seconds: int) -> Chunk | None:
    """Take a chunk that is pending, or running under a lapsed lease; None if someone else holds it."""
    now = utcnow()
    taken = session.execute(
        update(Chunk)
        .where(Chunk.id == chunk_id,
               or_(Chunk.status == ChunkStatus.pending,
                   and_(Chunk.status == ChunkStatus.running, Chunk.lease_until < now)))
        .values(status=ChunkStatus.running, worker=worker, lease_until=now + timedelta(seconds=lease_seconds),
                attempts=Chunk.attempts + 1)
    ).rowcount
    if not taken:
        return None
    chunk = session.get(Chunk, chunk_id)
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


def running_items(session: Session, chunk_id: int) -> list[Item]:
    """The chunk's unfinished items, in one query."""
    return list(session.scalars(
        select(Item).where(Item.chunk_id == chunk_id, Item.status == ItemStatus.running).order_by(Item.line)
    ))


def renew_lease(session: Session, chunk_id: int, worker: str, lease_seconds: int) -> bool:
    """Extend our lease; False if the chunk is no longer ours (it lapsed and was taken up)."""
    return bool(session.execute(
        update(Chunk).where(Chunk.id == chunk_id, Chunk.worker == worker, Chunk.status == ChunkStatus.running)
        .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
    ).rowcount)


_WRITE_RESULT = (
    update(ITEMS)
    .where(ITEMS.c.id == bindparam("_id"), ITEMS.c.status == ItemStatus.running.value)
    .values(status=bindparam("_status"), output=bindparam("_output"), finish_reason=bindparam("_finish"),
            prompt_tokens=bindparam("_pt"), completion_tokens=bindparam("_ct"),
            started_at=bindparam("_started"), finished_at=bindparam("_finished"), latency_ms=bindparam("_latency"),
            error_code=bindparam("_code"), error_message=bindparam("_message"), warning=bindparam("_warning"))
)


def record_results(session: Session, chunk: Chunk, worker: str, results: list[ItemResult],
                   lease_seconds: int) -> bool:
    """Write one micro-batch of results in one statement; False (nothing written) if we lost the chunk.

    The lease renewal takes the chunk's row lock first, so a worker that takes the chunk over
    waits for this transaction, and then sees these items final.
    """
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
                         _warning=r.warning))
    written = session.execute(_WRITE_RESULT, rows).rowcount
    if written == len(rows):
        ok = sum(r.status is ItemStatus.succeeded for r in results)
        bump_counters(session, chunk.job_id, running=-len(results), succeeded=ok, failed=len(results) - ok,
              prompt_tokens=sum(r.prompt_tokens for r in results),
              completion_tokens=sum(r.completion_tokens for r in results))
    else:  # some were final already (the guard kept them): count from the rows instead
        recount_job(session, chunk.job_id)
    finish_job_if_done(session, chunk.job_id)
    return True


def recount_job(session: Session, job_id: str) -> None:
    """Set the job's counters from its items: one aggregate over the (job_id, status) index."""
    counts = {s.value: 0 for s in ItemStatus}
    prompt = completion = 0
    for status, n, pt, ct in session.execute(
        select(Item.status, func.count(), func.coalesce(func.sum(Item.prompt_tokens), 0),
               func.coalesce(func.sum(Item.completion_tokens), 0))
        .where(Item.job_id == job_id).group_by(Item.status)
    ):
        counts[ItemStatus(status).value] = n
        prompt += pt
        completion += ct
    session.execute(update(Job).where(Job.id == job_id).values(
        total=sum(counts.values()), prompt_tokens=prompt, completion_tokens=completion, **counts))


def cancel_running(session: Session, chunk: Chunk) -> int:
    """Mark the chunk's unfinished items cancelled (its job is being cancelled)."""
    n = session.execute(
        update(Item).where(Item.chunk_id == chunk.id, Item.status == ItemStatus.running)
        .values(status=ItemStatus.cancelled, finished_at=utcnow())
    ).rowcount
    bump_counters(session, chunk.job_id, running=-n, cancelled=n)
    finish_job_if_done(session, chunk.job_id)
    return n


def finish_chunk(session: Session, chunk: Chunk, worker: str) -> None:
    session.execute(
        update(Chunk).where(Chunk.id == chunk.id, Chunk.worker == worker, Chunk.status == ChunkStatus.running)
        .values(status=ChunkStatus.done, finished_at=utcnow(), lease_until=None)
    )


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
        update(Chunk).where(Chunk.status == ChunkStatus.running, Chunk.lease_until < utcnow())
        .values(status=ChunkStatus.pending, worker=None, enqueued_at=utcnow())
        .returning(Chunk.job_id, Chunk.id)
    ).all()
    if not stale:
        return {}
    models = dict(session.execute(select(Job.id, Job.model).where(Job.id.in_({job_id for job_id, _ in stale}))).all())
    return _by_model((models[job_id], job_id, chunk_id) for job_id, chunk_id in sorted(stale, key=lambda r: r[1]))


def unstarted_chunks(session: Session, queued_before: datetime) -> Requeue:
    """Pending chunks queued before `queued_before`: their messages may be lost."""
    return _by_model(session.execute(
        select(Job.model, Chunk.job_id, Chunk.id).join(Job, Job.id == Chunk.job_id)
        .where(Chunk.status == ChunkStatus.pending, Chunk.enqueued_at < queued_before,
               Job.status.in_([JobStatus.queued, JobStatus.running]))
        .order_by(Chunk.id)
    ).all())


def mark_enqueued(session: Session, chunk_ids: list[int]) -> None:
    """Stamp when these chunks' messages were published (a chunk already taken keeps its stamp)."""
    for i in range(0, len(chunk_ids), 1000):
        session.execute(update(Chunk).where(Chunk.id.in_(chunk_ids[i:i + 1000]), Chunk.status == ChunkStatus.pending)
                        .values(enqueued_at=utcnow()))
