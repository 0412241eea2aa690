"""Batches for the HTTP API (the OpenAI Batches API) over jobs.

A batch is a job plus a `batches` row, with the same id. `create_batch` stores both at once with
the job `validating` and returns: parsing a large file takes seconds to minutes, so it happens
later, in `ingest`, off the request path (a separate process, see jobs/api/ingest.py).

`ingest` parses and stores the whole file in ONE transaction that also holds the batch row
locked (PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED; SQLite: its single write lock). If the
process dies mid-parse, the database rolls the transaction back and drops the lock, so the batch
is still `validating`, with nothing stored, and any server's sweep takes it up again; while a
parse is alive, no other server can take the same batch. No lease or clock is involved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import or_, select, tuple_, update
from sqlalchemy.orm import Session

from . import embeddings, service, work, workers
from .db import Database
from .exceptions import InputFileError, InvalidRequest, JobNotFound
from .files import GENERATED_STATES, PURPOSE_BATCH, GeneratedFile, file_path, generated_file_id, get_file
from .models import Batch, Job, JobStatus, utcnow
from .inputs import EMBEDDINGS_URL
from .settings import DEFAULT_MODEL, Settings, redact_url

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")  # embeddings: issue 21
COMPLETION_WINDOWS = ("24h",)
MAX_LIST = 100


def create_batch(session: Session, settings: Settings, *, input_file_id: str, endpoint: str,
                 completion_window: str, metadata: dict | None, model: str | None, owner: str | None) -> Job:
    """Check the request and store the batch as a `validating` job; parsing comes later (`ingest`)."""
    if endpoint not in ENDPOINTS:
        raise InvalidRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}", "endpoint")
    if completion_window not in COMPLETION_WINDOWS:
        raise InvalidRequest(f"completion_window must be '24h', got {completion_window!r}", "completion_window")
    if metadata is not None:
        if not isinstance(metadata, dict) or len(metadata) > 16 or not all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items()):
            raise InvalidRequest("metadata must be at most 16 string keys (64 chars) with string values (512 chars)",
                                 "metadata")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise InvalidRequest("model must be a non-empty string", "model")
    if not isinstance(input_file_id, str):
        raise InvalidRequest("input_file_id must be a string", "input_file_id")
    f = get_file(session, input_file_id, owner)
    if isinstance(f, GeneratedFile) or f.purpose != PURPOSE_BATCH:
        raise InvalidRequest(f"file {input_file_id} was not uploaded with purpose 'batch'", "input_file_id")
    task = embeddings.EMBED if endpoint == EMBEDDINGS_URL else embeddings.GENERATE  # the endpoint decides
    if model is None and task == embeddings.EMBED and settings.model == DEFAULT_MODEL:
        model = embeddings.DEFAULT_EMBED_MODEL  # the default model generates text
    job = Job(model=model or settings.model, source=f.filename, params={}, status=JobStatus.validating,
              owner=owner, created_at=utcnow(), total=0, pending=0, running=0, succeeded=0, failed=0, cancelled=0,
              prompt_tokens=0, completion_tokens=0, task=task)
    session.add(job)
    session.flush()
    session.add(Batch(job_id=job.id, input_file_id=input_file_id, endpoint=endpoint,
                      completion_window=completion_window, batch_metadata=metadata))
    session.flush()
    return job


class _Cancelled(Exception):
    """The batch was cancelled while its file was parsed: roll the parse back."""


def ingest(db: Database, settings: Settings, job_id: str) -> str:
    """Parse a validating batch's file into items and chunks, then queue the chunks.

    Returns what happened: parsed, failed (the file is unusable: the batch is `failed`), busy
    (another process is parsing it), done (not validating any more) or cancelled.
    """
    try:
        with db.write() as s:
            batch = s.scalars(select(Batch).where(Batch.job_id == job_id).with_for_update(skip_locked=True)).first()
            if batch is None:
                return "busy"
            job = s.scalars(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).one()
            if job.status is not JobStatus.validating:
                return "done"
            try:
                fp = open(file_path(settings, batch.input_file_id), "rb", buffering=1 << 20)
            except FileNotFoundError:
                raise InputFileError(f"input file {batch.input_file_id} was deleted before it was parsed") from None
            with fp:
                submitted = service.submit(s, fp, settings, job=job, endpoint=batch.endpoint, task=job.task)
            # Under the job row's lock now (submit moved its counters): a cancel either committed
            # before, and this parse is rolled back, or waits and then cancels what was stored.
            moved = s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.validating)
                              .values(status=JobStatus.queued)).rowcount
            if not moved:
                raise _Cancelled()
            work.finish_job_if_done(s, job_id)  # a file of only bad lines is complete at once
            model, chunk_ids = job.model, submitted.chunk_ids
    except _Cancelled:
        return "cancelled"
    except InputFileError as exc:
        with db.write() as s:
            failed = s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.validating)
                               .values(status=JobStatus.failed, finished_at=utcnow())).rowcount
            if failed:
                s.execute(update(Batch).where(Batch.job_id == job_id).values(error=str(exc)[:10_000]))
        return "failed"
    enqueue(db, settings, model, job_id, chunk_ids)
    return "parsed"


def enqueue(db: Database, settings: Settings, model: str, job_id: str, chunk_ids: list[int]) -> bool:
    """Publish the chunks; False (logged, chunks left unqueued for `requeue_unqueued`) if the broker is down."""
    from .queues import enqueue_chunks

    try:
        enqueue_chunks(model, [(job_id, c) for c in chunk_ids], settings.broker_url)
    except Exception as exc:
        log.warning("batch %s is stored, but the broker at %s is unreachable (%s); its chunks are queued later",
                    job_id, redact_url(settings.broker_url), type(exc).__name__)
        return False
    with db.write() as s:
        work.mark_enqueued(s, chunk_ids)
    return True


def validating_batches(session: Session, limit: int = 100) -> list[str]:
    """Batches whose file is not parsed yet: new ones, and any whose parser died."""
    return list(session.scalars(select(Job.id).where(Job.status == JobStatus.validating)
                                .order_by(Job.created_at).limit(limit)))


def requeue_unqueued(db: Database, settings: Settings, older_than_s: float = 60.0) -> int:
    """Queue the chunks of batches whose broker was down when they were parsed; returns chunks queued."""
    from datetime import timedelta

    from .models import Chunk, ChunkStatus

    cutoff = utcnow() - timedelta(seconds=older_than_s)
    with db.read() as s:
        rows = s.execute(select(Job.model, Job.id, Chunk.id).join(Chunk, Chunk.job_id == Job.id)
                         .join(Batch, Batch.job_id == Job.id)
                         .where(Chunk.status == ChunkStatus.pending, Chunk.enqueued_at.is_(None),
                                Job.status.in_([JobStatus.queued, JobStatus.running]), Job.created_at < cutoff)
                         .order_by(Chunk.id).limit(10_000)).all()
    by_job: dict[tuple[str, str], list[int]] = {}
    for model, job_id, chunk_id in rows:
        by_job.setdefault((model, job_id), []).append(chunk_id)
    n = 0
    for (model, job_id), chunk_ids in by_job.items():
        if enqueue(db, settings, model, job_id, chunk_ids):
            n += len(chunk_ids)
    return n


# -- output and error files ---------------------------------------------------------------------------


class _ByteCounter:
    """A text sink that keeps only the UTF-8 size of what is written to it."""

    def __init__(self):
        self.n = 0

    def write(self, text: str) -> None:
        self.n += len(text.encode("utf-8"))


def _measure(session: Session, job: Job, kinds=tuple(GENERATED_STATES)) -> dict[str, int]:
    """Generated files' sizes (output, errors), by rendering them into counters (nothing is kept)."""
    from .export import export

    sizes = {}
    for kind in kinds:
        counter = _ByteCounter()
        export(session, job, counter, "openai", only=GENERATED_STATES[kind])
        sizes[kind] = counter.n
    return sizes


def _store_sizes(db: Database, job_id: str, finished_at, sizes: dict[str, int]) -> None:
    with db.write() as s:
        job = s.get(Job, job_id)
        if job is None or job.finished_at != finished_at:  # retried meanwhile: these sizes are stale
            return
        s.execute(update(Batch).where(Batch.job_id == job_id).values(
            output_bytes=sizes["output"], error_bytes=sizes["errors"], sized_for=finished_at))


def _sized(batch: Batch | None, job: Job) -> dict[str, int] | None:
    if batch is None or batch.sized_for is None or job.finished_at is None or batch.sized_for != job.finished_at:
        return None
    return {"output": batch.output_bytes, "errors": batch.error_bytes}


def generated_file_size(db: Database, f: GeneratedFile) -> int:
    """The size of an output or error file: stored once its batch is finished (the sweep measures
    it), measured and stored here if the sweep has not come by yet."""
    with db.read() as s:
        job = s.get(Job, f.job.id)
        sizes = _sized(s.get(Batch, job.id), job)
        if sizes is not None:
            return sizes[f.kind]
        if job.status not in (JobStatus.completed, JobStatus.cancelled) or job.finished_at is None:
            return _measure(s, job, (f.kind,))[f.kind]  # still changing: nothing to keep
        finished_at, sizes = job.finished_at, _measure(s, job)
    _store_sizes(db, job.id, finished_at, sizes)
    return sizes[f.kind]


def measure_generated_files(db: Database, limit: int = 20) -> int:
    """Measure and store the file sizes of finished batches that have none (or stale ones); returns how many."""
    with db.read() as s:
        job_ids = list(s.scalars(
            select(Job.id).join(Batch, Batch.job_id == Job.id)
            .where(Job.status.in_([JobStatus.completed, JobStatus.cancelled]), Job.finished_at.is_not(None),
                   or_(Batch.sized_for.is_(None), Batch.sized_for != Job.finished_at))
            .order_by(Job.finished_at).limit(limit)))
    for job_id in job_ids:
        with db.read() as s:
            job = s.get(Job, job_id)
            finished_at, sizes = job.finished_at, _measure(s, job)
        _store_sizes(db, job_id, finished_at, sizes)
    return len(job_ids)


# -- reading ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchView:
    job: Job
    batch: Batch


def get_batch(session: Session, batch_id: str, owner: str | None) -> BatchView:
    row = session.execute(select(Job, Batch).join(Batch, Batch.job_id == Job.id).where(Job.id == batch_id)).first()
    if row is None or (owner is not None and row[0].owner != owner):
        raise JobNotFound(batch_id)
    return BatchView(*row)


def list_batches(session: Session, owner: str | None, after: str | None = None, limit: int = 20
                 ) -> tuple[list[BatchView], bool]:
    """Newest first; `after` is the id of the last batch of the previous page. Returns (page, has_more)."""
    if not 1 <= limit <= MAX_LIST:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIST}", "limit")
    query = select(Job, Batch).join(Batch, Batch.job_id == Job.id)
    if owner is not None:
        query = query.where(Job.owner == owner)
    if after:
        cursor = get_batch(session, after, owner).job
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(cursor.created_at, cursor.id))
    rows = session.execute(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all()
    return [BatchView(*r) for r in rows[:limit]], len(rows) > limit


def unserved_warning(session: Session, view: BatchView) -> str | None:
    """workers.unserved_warning for a batch still waiting to run; None once it has finished."""
    if view.job.status in (JobStatus.completed, JobStatus.cancelled, JobStatus.failed):
        return None
    return workers.unserved_warning(session, view.job.model)


def cancel_batch(session: Session, batch_id: str, owner: str | None) -> BatchView:
    get_batch(session, batch_id, owner)  # the owner check; then exactly what `llmbatch cancel` does
    service.cancel(session, batch_id)
    return get_batch(session, batch_id, owner)


_STATUS = {
    JobStatus.validating: "validating", JobStatus.failed: "failed", JobStatus.queued: "in_progress",
    JobStatus.running: "in_progress", JobStatus.completed: "completed", JobStatus.cancelling: "cancelling",
    JobStatus.cancelled: "cancelled",
}


def batch_object(view: BatchView, warning: str | None = None) -> dict:
    """The OpenAI Batch object. request_counts: completed = succeeded items, failed = failed items.

    warning: a note for `errors` that does not fail the batch (no live worker serves its model)."""
    job, batch = view.job, view.batch

    def ts(dt):
        return int(dt.timestamp()) if dt else None

    status = _STATUS[job.status]
    finished = job.status in (JobStatus.completed, JobStatus.cancelled)
    errors = None
    if job.status is JobStatus.failed:
        errors = {"object": "list", "data": [{"code": "invalid_file", "message": batch.error, "param": "input_file_id",
                                              "line": None}]}
    elif warning is not None and job.status not in (JobStatus.completed, JobStatus.cancelled):
        errors = {"object": "list", "data": [{"code": "model_not_served", "message": warning, "param": "model",
                                              "line": None}]}
    return {
        "id": job.id, "object": "batch", "endpoint": batch.endpoint, "errors": errors,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window, "status": status,
        "output_file_id": generated_file_id(job.id, "output") if finished and job.succeeded else None,
        "error_file_id": generated_file_id(job.id, "errors") if finished and (job.failed or job.cancelled) else None,
        "created_at": ts(job.created_at), "in_progress_at": ts(job.started_at), "expires_at": None,
        "finalizing_at": None,
        "completed_at": ts(job.finished_at) if job.status is JobStatus.completed else None,
        "failed_at": ts(job.finished_at) if job.status is JobStatus.failed else None,
        "expired_at": None, "cancelling_at": ts(job.cancelling_at),
        "cancelled_at": ts(job.finished_at) if job.status is JobStatus.cancelled else None,
        "request_counts": {"total": job.total, "completed": job.succeeded, "failed": job.failed},
        "usage": {"input_tokens": job.prompt_tokens, "output_tokens": job.completion_tokens,
                  "total_tokens": job.prompt_tokens + job.completion_tokens,
                  "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}},
        "metadata": batch.batch_metadata, "model": job.model,
    }
