"""Job operations that users ask for: submit, status, list, cancel, retry.

Each takes a session inside the caller's transaction and returns what must be queued once that
transaction has committed: a task must never reach a worker before its rows exist.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from . import adapters as adapters_
from . import embeddings, quickread
from .exceptions import AmbiguousJob, InputFileError, InvalidState, JobNotFound
from .inputs import is_embedding, iter_parsed, validate_params
from .models import Chunk, ChunkStatus, Item, ItemStatus, Job, JobStatus, utcnow
from .settings import DEFAULT_MODEL, Settings
from .work import bump_counters, finish_job_if_done, lock_job

# Good lines are stored a batch at a time: this many chunks' worth of rows per round of inserts.
# Large enough that round trips and statement overhead vanish, small enough to stay flat in memory.
CHUNKS_PER_FLUSH = 64
BAD_FLUSH = 2000
# ... and never more than about this many bytes of line data held at once: 64 chunks of 1 MiB
# lines would otherwise be 64 GiB.
FLUSH_BYTES = 64 * 1024**2

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


def get_job(session: Session, ref: str, owner: str | None = None) -> Job:
    """The job with this id, else the one job with this name (AmbiguousJob if several share it).

    `owner` (an API key's hash; None: every job) scopes both lookups: another owner's job is not
    found, and a shared name lists only the owner's own jobs.
    """
    job = session.get(Job, ref)
    if job is not None and (owner is None or job.owner == owner):
        return job
    query = select(Job).where(Job.name == ref)
    if owner is not None:
        query = query.where(Job.owner == owner)
    named = list(session.scalars(query.order_by(Job.created_at.desc()).limit(MAX_LISTED_MATCHES + 1)))
    if not named:
        raise JobNotFound(ref)
    if len(named) > 1:
        raise AmbiguousJob(ref, [(j.id, j.status.value, j.created_at.isoformat()) for j in named])
    return named[0]


MAX_LISTED_MATCHES = quickread.MAX_LISTED_MATCHES


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
           on_line: Callable[[int], None] | None = None, adapters: adapters_.Adapters | None = None,
           job: Job | None = None, endpoint: str | None = None, task: str | None = None) -> Submitted:
    """Parse and store a JSONL file as a job, its items and its chunks.

    `job`: an existing, still empty job row to fill (an HTTP batch, created before its file is parsed).
    `endpoint`: the batch's endpoint; a line whose `url` names another is a bad line, as OpenAI has it.

    Streams the file and stores it a batch at a time: the chunk rows of a batch in one
    multi-row INSERT ... RETURNING, then its items in bulk (COPY on PostgreSQL, executemany on
    SQLite), all on the session's connection, in the caller's transaction. Under --strict any
    bad line raises InputFileError after the whole file was read, and the caller's rollback
    stores nothing.

    `task` (issue 21): `generate` or `embed`; None takes the model's kind when it is known to embed,
    else the kind of the file's first valid line. Lines of the other kind are bad lines.
    """
    params = validate_params(params or {}, "job parameters", limits=settings.limits)
    adapters = adapters_.check_sources(adapters or adapters_.Adapters())  # issue 11: before anything is stored
    now = utcnow()
    if job is None:  # the HTTP API makes the job first, while its file is validated
        job = Job(model=model or settings.model, name=name, params=params, source=source, status=JobStatus.queued,
                  adapters=adapters.names or None,
                  created_at=now, total=0, pending=0, running=0, succeeded=0, failed=0, cancelled=0,
                  prompt_tokens=0, completion_tokens=0, cached_tokens=0)
        session.add(job)
        session.flush()
    job_id = job.id
    out = Submitted(job=job)
    task = task or embeddings.default_task(job.model)
    if task is not None and job.task != task:
        job.task = task
        session.flush()
    writer = _ItemWriter(session)
    chunk_size = max(1, settings.chunk_size)
    flush_at = chunk_size * CHUNKS_PER_FLUSH
    pending, failed = ItemStatus.pending.value, ItemStatus.failed.value
    queued_at = writer.stored("queued_at", now)
    insert_chunks = insert(Chunk.__table__).returning(Chunk.__table__.c.id, sort_by_parameter_order=True)
    good: list[tuple[int, str, str]] = []  # (line, custom_id, request as JSON text)
    bad: list[tuple] = []
    errors: list[str] = []
    buffered = [0, 0]  # bytes held in good, in bad
    # The last chunk, when a flush by bytes wrote it before it was full: [id, items so far].
    open_chunk: list[int] | None = None

    def flush_good() -> None:
        nonlocal open_chunk
        if not good:
            return
        rows = []
        start = 0
        if open_chunk is not None:  # top up the chunk the previous flush left open
            start = min(chunk_size - open_chunk[1], len(good))
            for line, custom_id, request in good[:start]:
                rows.append((job_id, open_chunk[0], line, custom_id, pending, request, queued_at, 0))
            session.execute(update(Chunk).where(Chunk.id == open_chunk[0]).values(size=Chunk.size + start))
            open_chunk[1] += start
            if open_chunk[1] == chunk_size:
                open_chunk = None
        first_seq = len(out.chunk_ids)
        sizes = [min(chunk_size, len(good) - i) for i in range(start, len(good), chunk_size)]
        ids = list(session.execute(insert_chunks, [
            dict(job_id=job_id, seq=first_seq + k, size=n, status=ChunkStatus.pending, attempts=0)
            for k, n in enumerate(sizes)
        ]).scalars()) if sizes else []
        out.chunk_ids.extend(ids)
        for k, chunk_id in enumerate(ids):
            for line, custom_id, request in good[start + k * chunk_size:start + (k + 1) * chunk_size]:
                rows.append((job_id, chunk_id, line, custom_id, pending, request, queued_at, 0))
        if sizes and sizes[-1] < chunk_size:
            open_chunk = [ids[-1], sizes[-1]]  # later lines fill it up before a new chunk starts
        writer.insert(_ITEM_COLUMNS, rows)
        good.clear()
        buffered[0] = 0

    def flush_bad() -> None:
        writer.insert(_BAD_COLUMNS, bad)
        bad.clear()
        buffered[1] = 0

    total = n_bad = 0
    storing = True  # under --strict, stop storing once the file is known bad
    try:
        for parsed in iter_parsed(fp, settings.limits):
            total += 1
            parsed = adapters_.resolve(parsed, adapters)  # issue 11: the line's adapter, by name
            if endpoint is not None:
                parsed = _check_endpoint(parsed, endpoint)
            if task is None and parsed.error is None:  # issue 21: the first valid line decides
                task = embeddings.EMBED if is_embedding(parsed.request) else embeddings.GENERATE
                _set_task(session, job, task, model is None and job.model == settings.model == DEFAULT_MODEL)
            if task is not None:
                parsed = embeddings.check_line(parsed, task, job.model)
            if parsed.error:
                n_bad += 1
                if strict:
                    errors.append(parsed.error)
                    storing = False
                    good.clear()
                else:
                    bad.append((job_id, parsed.line, parsed.custom_id, failed, queued_at, queued_at, 0,
                                "invalid_input", parsed.error))
                    buffered[1] += len(parsed.error) + len(parsed.custom_id or "")
                    if len(bad) >= BAD_FLUSH or buffered[1] >= FLUSH_BYTES:
                        flush_bad()
            elif storing:
                request = _dumps(parsed.request)
                good.append((parsed.line, parsed.custom_id, request))
                buffered[0] += len(request) + len(parsed.custom_id)
                if len(good) >= flush_at or buffered[0] >= FLUSH_BYTES:
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


def _check_endpoint(parsed, endpoint: str):
    """A line of an HTTP batch whose `url` is not the batch's endpoint: a bad line (lines without a url,
    llmbatch's own forms, run as they are)."""
    url = parsed.request.get("url") if parsed.error is None else None
    if url is None or url == endpoint:
        return parsed
    return dataclasses.replace(parsed, request=None,
                               error=f"line {parsed.line}: url {url!r} does not match the batch's endpoint {endpoint!r}")


def _set_task(session: Session, job: Job, task: str, default_model: bool) -> None:
    """Record the task the lines chose; an embedding job given no model gets the bundled embedder
    (the default model generates text)."""
    values: dict = {"task": task}
    if task == embeddings.EMBED and default_model:
        values["model"] = embeddings.DEFAULT_EMBED_MODEL
    session.execute(update(Job).where(Job.id == job.id).values(**values))
    for k, v in values.items():
        set_committed_value(job, k, v)


def validate(fp: typing.BinaryIO, settings: Settings) -> tuple[int, list[str]]:
    """(lines read, errors) without storing anything."""
    total, errors = 0, []
    for parsed in iter_parsed(fp, settings.limits):
        total += 1
        if parsed.error:
            errors.append(parsed.error)
    return total, errors


def job_summary(job: Job) -> dict:
    """The job's summary: quickread.COLUMNS, in order (status by value, times in ISO 8601)."""
    out = {c: getattr(job, c) for c in quickread.COLUMNS}
    out["status"] = job.status.value
    for c in quickread.TIMES:
        out[c] = out[c].isoformat() if out[c] else None
    return out


def list_jobs(session: Session, limit: int = 20) -> list[Job]:
    return list(session.scalars(select(Job).order_by(Job.created_at.desc()).limit(limit)))


def cancel(session: Session, job_id: str) -> Job:
    """Cancel pending work now; running micro-batches finish and their results are kept."""
    job = get_job(session, job_id)
    job_id = job.id  # job_id may have been its name
    lock_job(session, job_id)  # first, as every writer of a job's rows does (see work.py)
    session.refresh(job)
    if job.status in (JobStatus.completed, JobStatus.cancelled, JobStatus.failed):
        raise InvalidState(f"job {job_id} is already {job.status.value}")
    session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.cancelling, cancelling_at=utcnow()))
    n = session.execute(
        update(Item).where(Item.job_id == job_id, Item.status == ItemStatus.pending)
        .values(status=ItemStatus.cancelled, finished_at=utcnow())
    ).rowcount
    bump_counters(session, job_id, pending=-n, cancelled=n)
    finish_job_if_done(session, job_id)
    session.refresh(job)
    return job


def fail_job(session: Session, job_id: str, code: str, message: str) -> Job:
    """The job can never run here (its model does not load): its unfinished items fail with
    `code` and `message`, and the job is `failed`; what already finished is kept."""
    lock_job(session, job_id)
    now = utcnow()
    moved = dict(session.execute(
        select(Item.status, func.count()).where(Item.job_id == job_id,
                                                Item.status.in_([ItemStatus.pending, ItemStatus.running]))
        .group_by(Item.status)).all())
    session.execute(update(Item).where(Item.job_id == job_id,
                                       Item.status.in_([ItemStatus.pending, ItemStatus.running]))
                    .values(status=ItemStatus.failed, finished_at=now, error_code=code, error_message=message))
    session.execute(update(Chunk).where(Chunk.job_id == job_id, Chunk.status != ChunkStatus.done)
                    .values(status=ChunkStatus.done, finished_at=now, lease_until=None, last_error=message))
    n_pending, n_running = moved.get(ItemStatus.pending, 0), moved.get(ItemStatus.running, 0)
    bump_counters(session, job_id, pending=-n_pending, running=-n_running, failed=n_pending + n_running)
    session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.failed, finished_at=now))
    return session.get(Job, job_id)


# Failures a second try can fix. A bad line (invalid_input), a request the engine cannot run
# (invalid_request) or a prompt too long for the model (context_length_exceeded) fails again.
RETRYABLE_ERRORS = ("engine_error", "out_of_memory")


def retry(session: Session, job_id: str) -> list[int]:
    """Requeue the failed items that can succeed on a second try, and cancelled items (so a
    cancelled job can be resumed); returns the chunks to queue."""
    job = get_job(session, job_id)
    job_id = job.id  # job_id may have been its name
    lock_job(session, job_id)
    session.refresh(job)
    if job.status not in (JobStatus.completed, JobStatus.cancelled):
        raise InvalidState(f"job {job_id} is {job.status.value}; retry it once it has finished")
    # Failed items a second try can fix, and cancelled items (a cancelled job resumes). Bad input
    # lines have no chunk.
    retryable = (Item.job_id == job_id, Item.chunk_id.is_not(None),
                 or_(and_(Item.status == ItemStatus.failed, Item.error_code.in_(RETRYABLE_ERRORS)),
                     Item.status == ItemStatus.cancelled))
    chunk_ids = sorted(session.scalars(select(Item.chunk_id).where(*retryable).distinct()))
    if not chunk_ids:
        return []
    moved = dict(session.execute(select(Item.status, func.count()).where(*retryable).group_by(Item.status)).all())
    n_failed, n_cancelled = moved.get(ItemStatus.failed, 0), moved.get(ItemStatus.cancelled, 0)
    # Chunks before items (the lock order); a retried chunk gets its full number of attempts again.
    session.execute(update(Chunk).where(Chunk.id.in_(chunk_ids))
                    .values(status=ChunkStatus.pending, worker=None, attempts=0, last_error=None))
    session.execute(
        update(Item).where(*retryable).values(
            status=ItemStatus.pending, output=None, finish_reason=None, error_code=None, error_message=None,
            warning=None, prompt_tokens=None, completion_tokens=None, cached_tokens=None, finished_at=None,
            latency_ms=None, queued_at=utcnow()))
    bump_counters(session, job_id, failed=-n_failed, cancelled=-n_cancelled, pending=n_failed + n_cancelled)
    session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.queued, finished_at=None,
                                                                cancelling_at=None))
    return chunk_ids


def unqueued_chunks(session: Session, job_id: str) -> list[int]:
    """Pending chunks that never reached the broker (it was down at submit)."""
    return list(session.scalars(select(Chunk.id).where(
        Chunk.job_id == job_id, Chunk.status == ChunkStatus.pending, Chunk.enqueued_at.is_(None))))
