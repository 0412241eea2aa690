"""Job operations that users ask for: submit, status, list, cancel, retry.

Each takes a session inside the caller's transaction and returns what must be queued once that
transaction has committed: a task must never reach a worker before its rows exist.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from .exceptions import InputFileError, InvalidState, JobNotFound
from .inputs import ParsedLine, iter_parsed, validate_params
from .models import Chunk, ChunkStatus, Item, ItemStatus, Job, JobStatus, utcnow
from .settings import Settings
from .work import _bump, finish_job_if_done

INSERT_BATCH = 2000  # rows per executemany: big enough to amortise round trips, small in memory


@dataclass
class Submitted:
    job: Job
    chunk_ids: list[int] = field(default_factory=list)
    bad_lines: int = 0


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(job_id)
    return job


def submit(session: Session, fp: typing.BinaryIO, settings: Settings, *, model: str | None = None,
           name: str | None = None, params: dict | None = None, strict: bool = False, source: str | None = None,
           on_line: Callable[[int], None] | None = None) -> Submitted:
    """Parse and store a JSONL file as a job, its items and its chunks.

    Streams the file; rows go in with executemany in batches. Under --strict any bad line
    raises InputFileError after the whole file was read, and the caller's rollback stores nothing.
    """
    params = validate_params(params or {}, "job parameters", limits=settings.limits)
    now = utcnow()
    job = Job(model=model or settings.model, name=name, params=params, source=source, status=JobStatus.queued,
              created_at=now, total=0, pending=0, running=0, succeeded=0, failed=0, cancelled=0,
              prompt_tokens=0, completion_tokens=0)
    session.add(job)
    session.flush()
    out = Submitted(job=job)
    good: list[ParsedLine] = []
    bad: list[ParsedLine] = []
    errors: list[str] = []

    def flush_good() -> None:
        if not good:
            return
        chunk_id = session.execute(
            insert(Chunk).returning(Chunk.id),
            dict(job_id=job.id, seq=len(out.chunk_ids), size=len(good), status=ChunkStatus.pending, attempts=0),
        ).scalar_one()
        out.chunk_ids.append(chunk_id)
        session.execute(insert(Item), [
            dict(job_id=job.id, chunk_id=chunk_id, line=p.line, custom_id=p.custom_id,
                 status=ItemStatus.pending, request=p.request, queued_at=now, attempts=0)
            for p in good
        ])
        good.clear()

    def flush_bad() -> None:
        if not bad:
            return
        session.execute(insert(Item), [
            dict(job_id=job.id, line=p.line, custom_id=p.custom_id, status=ItemStatus.failed,
                 queued_at=now, finished_at=now, attempts=0, error_code="invalid_input", error_message=p.error)
            for p in bad
        ])
        bad.clear()

    total = n_bad = 0
    for parsed in iter_parsed(fp, settings.limits):
        total += 1
        if parsed.error:
            n_bad += 1
            if strict:
                errors.append(parsed.error)
                continue
            bad.append(parsed)
            if len(bad) >= INSERT_BATCH:
                flush_bad()
        elif not strict or not errors:  # under --strict, stop storing once the file is known bad
            good.append(parsed)
            if len(good) >= settings.chunk_size:
                flush_good()
        if on_line and total % 1000 == 0:
            on_line(total)
    if errors:
        raise InputFileError(f"{len(errors)} bad line(s); nothing was stored (--strict)", errors)
    flush_good()
    flush_bad()
    if on_line:
        on_line(total)
    _bump(session, job.id, total=total, pending=total - n_bad, failed=n_bad)
    finish_job_if_done(session, job.id)  # a file of only bad lines is complete at once
    session.refresh(job)
    out.bad_lines = n_bad
    return out


def validate(fp: typing.BinaryIO, settings: Settings) -> tuple[int, list[str]]:
    """(lines read, errors) without storing anything."""
    total, errors = 0, []
    for parsed in iter_parsed(fp, settings.limits):
        total += 1
        if parsed.error:
            errors.append(parsed.error)
    return total, errors


def job_summary(job: Job) -> dict:
    def iso(dt):
        return dt.isoformat() if dt else None

    return {
        "id": job.id, "name": job.name, "status": job.status.value, "model": job.model, "total": job.total,
        **job.counts(),
        "prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
        "created_at": iso(job.created_at), "started_at": iso(job.started_at), "finished_at": iso(job.finished_at),
    }


def list_jobs(session: Session, limit: int = 20) -> list[Job]:
    return list(session.scalars(select(Job).order_by(Job.created_at.desc()).limit(limit)))


def mark_enqueued(session: Session, chunk_ids: list[int]) -> None:
    for i in range(0, len(chunk_ids), 1000):
        session.execute(update(Chunk).where(Chunk.id.in_(chunk_ids[i:i + 1000])).values(enqueued_at=utcnow()))


def cancel(session: Session, job_id: str) -> Job:
    """Cancel pending work now; running micro-batches finish and their results are kept."""
    job = get_job(session, job_id)
    if job.status in (JobStatus.completed, JobStatus.cancelled):
        raise InvalidState(f"job {job_id} is already {job.status.value}")
    session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.cancelling))
    n = session.execute(
        update(Item).where(Item.job_id == job_id, Item.status == ItemStatus.pending)
        .values(status=ItemStatus.cancelled, finished_at=utcnow())
    ).rowcount
    _bump(session, job_id, pending=-n, cancelled=n)
    finish_job_if_done(session, job_id)
    session.refresh(job)
    return job


def retry(session: Session, job_id: str) -> list[int]:
    """Requeue the failed items that can succeed on a second try; returns the chunks to queue."""
    job = get_job(session, job_id)
    if job.status not in (JobStatus.completed, JobStatus.cancelled):
        raise InvalidState(f"job {job_id} is {job.status.value}; retry it once it has finished")
    retryable = (Item.job_id == job_id, Item.status == ItemStatus.failed, Item.chunk_id.is_not(None))
    chunk_ids = list(session.scalars(select(Item.chunk_id).where(*retryable).distinct()))
    if not chunk_ids:
        return []
    n = session.execute(
        update(Item).where(*retryable).values(
            status=ItemStatus.pending, output=None, finish_reason=None, error_code=None, error_message=None,
            prompt_tokens=None, completion_tokens=None, finished_at=None, latency_ms=None, queued_at=utcnow())
    ).rowcount
    _bump(session, job_id, failed=-n, pending=n)
    session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.queued, finished_at=None))
    session.execute(update(Chunk).where(Chunk.id.in_(chunk_ids)).values(status=ChunkStatus.pending, worker=None))
    return chunk_ids


def unqueued_chunks(session: Session, job_id: str) -> list[int]:
    """Pending chunks that never reached the broker (it was down at submit)."""
    return list(session.scalars(select(Chunk.id).where(
        Chunk.job_id == job_id, Chunk.status == ChunkStatus.pending, Chunk.enqueued_at.is_(None))))
