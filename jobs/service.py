"""Job operations that users ask for: submit, status, list, cancel, retry.

Each takes a session inside the caller's transaction and returns what must be queued once that
transaction has committed: a task must never reach a worker before its rows exist.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from .exceptions import InputFileError, InvalidState, JobNotFound
from .inputs import iter_parsed, validate_params
from .models import Chunk, ChunkStatus, Item, ItemStatus, Job, JobStatus, utcnow
from .settings import Settings
from .work import bump_counters, finish_job_if_done

# Good lines are stored a batch at a time: this many chunks' worth of rows per round of inserts.
# Large enough that round trips and statement overhead vanish, small enough to stay flat in memory.
CHUNKS_PER_FLUSH = 64
BAD_FLUSH = 2000

_ITEM_COLUMNS = ("job_id", "chunk_id", "line", "custom_id", "status", "request", "queued_at", "attempts")
_BAD_COLUMNS = ("job_id", "line", "custom_id", "status", "queued_at", "finished_at", "attempts", "error_code",
                "error_message")
# Literal statements for the two column sets (no SQL is built by formatting strings).
_COPY = {
    _ITEM_COLUMNS: "COPY items (job_id, chunk_id, line, custom_id, status, request, queued_at, attempts) FROM STDIN",
    _BAD_COLUMNS: "COPY items (job_id, line, custom_id, status, queued_at, finished_at, attempts, error_code, "
                  "error_message) FROM STDIN",
}
_INSERT = {
    _ITEM_COLUMNS: "INSERT INTO items (job_id, chunk_id, line, custom_id, status, request, queued_at, attempts) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    _BAD_COLUMNS: "INSERT INTO items (job_id, line, custom_id, status, queued_at, finished_at, attempts, error_code, "
                  "error_message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
}
_dumps = json.JSONEncoder().encode  # what SQLAlchemy's JSON type stores (json.dumps), without a new encoder per call


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


class _ItemWriter:
    """Bulk inserts of item rows on the session's own connection, inside its transaction.

    PostgreSQL: COPY FROM STDIN. SQLite: the driver's executemany on plain tuples. Both skip
    SQLAlchemy's per-row work; values are given exactly as SQLAlchemy's types would store them.
    """

    def __init__(self, session: Session):
        conn = session.connection()
        self.dialect = conn.dialect
        self.dbapi = conn.connection.dbapi_connection
        self.pg = self.dialect.name == "postgresql"
        if not self.pg and self.dialect.name != "sqlite":
            self.dbapi = None  # another backend: plain executemany through SQLAlchemy
        self.session = session
        if self.dbapi is not None and not self.pg:
            cur = self.dbapi.cursor()
            # A bigger page cache for this connection while a million index entries go in (64 MB at most).
            cur.execute("PRAGMA cache_size=-65536")
            cur.close()

    def close(self) -> None:
        if self.dbapi is not None and not self.pg:
            cur = self.dbapi.cursor()
            cur.execute("PRAGMA cache_size=-2000")  # back to SQLite's default for whoever uses it next
            cur.close()

    def stored(self, column: str, value):
        """A value as the column's SQLAlchemy type would bind it (for SQLite's text datetimes)."""
        if self.pg or self.dbapi is None:
            return value
        proc = Item.__table__.c[column].type.dialect_impl(self.dialect).bind_processor(self.dialect)
        return proc(value) if proc else value

    def insert(self, columns: tuple[str, ...], rows: list[tuple]) -> None:
        if not rows:
            return
        if self.dbapi is None:
            table = Item.__table__
            self.session.execute(insert(table), [dict(zip(columns, r)) for r in rows])
        elif self.pg:
            with self.dbapi.cursor() as cur:
                with cur.copy(_COPY[columns]) as copy:
                    write = copy.write_row
                    for row in rows:
                        write(row)
        else:
            cur = self.dbapi.cursor()
            try:
                cur.executemany(_INSERT[columns], rows)
            finally:
                cur.close()


def submit(session: Session, fp: typing.BinaryIO, settings: Settings, *, model: str | None = None,
           name: str | None = None, params: dict | None = None, strict: bool = False, source: str | None = None,
           on_line: Callable[[int], None] | None = None, job: Job | None = None) -> Submitted:
    """Parse and store a JSONL file as a job, its items and its chunks.

    `job`: an existing, still empty job row to fill (an HTTP batch, created before its file is parsed).

    Streams the file and stores it a batch at a time: the chunk rows of a batch in one
    multi-row INSERT ... RETURNING, then its items in bulk (COPY on PostgreSQL, executemany on
    SQLite), all on the session's connection, in the caller's transaction. Under --strict any
    bad line raises InputFileError after the whole file was read, and the caller's rollback
    stores nothing.
    """
    params = validate_params(params or {}, "job parameters", limits=settings.limits)
    now = utcnow()
    if job is None:
        job = Job(model=model or settings.model, name=name, params=params, source=source, status=JobStatus.queued,
                  created_at=now, total=0, pending=0, running=0, succeeded=0, failed=0, cancelled=0,
                  prompt_tokens=0, completion_tokens=0)
        session.add(job)
        session.flush()
    job_id = job.id
    out = Submitted(job=job)
    writer = _ItemWriter(session)
    chunk_size = max(1, settings.chunk_size)
    flush_at = chunk_size * CHUNKS_PER_FLUSH
    pending, failed = ItemStatus.pending.value, ItemStatus.failed.value
    queued_at = writer.stored("queued_at", now)
    insert_chunks = insert(Chunk.__table__).returning(Chunk.__table__.c.id, sort_by_parameter_order=True)
    good: list[tuple[int, str, str]] = []  # (line, custom_id, request as JSON text)
    bad: list[tuple] = []
    errors: list[str] = []

    def flush_good() -> None:
        if not good:
            return
        first_seq = len(out.chunk_ids)
        sizes = [min(chunk_size, len(good) - i) for i in range(0, len(good), chunk_size)]
        ids = list(session.execute(insert_chunks, [
            dict(job_id=job_id, seq=first_seq + k, size=n, status=ChunkStatus.pending, attempts=0)
            for k, n in enumerate(sizes)
        ]).scalars())
        out.chunk_ids.extend(ids)
        rows = []
        for k, chunk_id in enumerate(ids):
            for line, custom_id, request in good[k * chunk_size:(k + 1) * chunk_size]:
                rows.append((job_id, chunk_id, line, custom_id, pending, request, queued_at, 0))
        writer.insert(_ITEM_COLUMNS, rows)
        good.clear()

    def flush_bad() -> None:
        writer.insert(_BAD_COLUMNS, bad)
        bad.clear()

    total = n_bad = 0
    storing = True  # under --strict, stop storing once the file is known bad
    try:
        for parsed in iter_parsed(fp, settings.limits):
            total += 1
            if parsed.error:
                n_bad += 1
                if strict:
                    errors.append(parsed.error)
                    storing = False
                    good.clear()
                else:
                    bad.append((job_id, parsed.line, parsed.custom_id, failed, queued_at, queued_at, 0,
                                "invalid_input", parsed.error))
                    if len(bad) >= BAD_FLUSH:
                        flush_bad()
            elif storing:
                good.append((parsed.line, parsed.custom_id, _dumps(parsed.request)))
                if len(good) >= flush_at:
                    flush_good()
            if on_line and total % 1000 == 0:
                on_line(total)
        if errors:
            raise InputFileError(f"{len(errors)} bad line(s); nothing was stored (--strict)", errors)
        flush_good()
        flush_bad()
    finally:
        writer.close()
    if on_line:
        on_line(total)
    bump_counters(session, job_id, total=total, pending=total - n_bad, failed=n_bad)
    finish_job_if_done(session, job_id)  # a file of only bad lines is complete at once
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


def cancel(session: Session, job_id: str) -> Job:
    """Cancel pending work now; running micro-batches finish and their results are kept."""
    job = get_job(session, job_id)
    if job.status in (JobStatus.completed, JobStatus.cancelled, JobStatus.failed):
        raise InvalidState(f"job {job_id} is already {job.status.value}")
    session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.cancelling))
    n = session.execute(
        update(Item).where(Item.job_id == job_id, Item.status == ItemStatus.pending)
        .values(status=ItemStatus.cancelled, finished_at=utcnow())
    ).rowcount
    bump_counters(session, job_id, pending=-n, cancelled=n)
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
    bump_counters(session, job_id, failed=-n, pending=n)
    session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.queued, finished_at=None))
    session.execute(update(Chunk).where(Chunk.id.in_(chunk_ids)).values(status=ChunkStatus.pending, worker=None))
    return chunk_ids


def unqueued_chunks(session: Session, job_id: str) -> list[int]:
    """Pending chunks that never reached the broker (it was down at submit)."""
    return list(session.scalars(select(Chunk.id).where(
        Chunk.job_id == job_id, Chunk.status == ChunkStatus.pending, Chunk.enqueued_at.is_(None))))
