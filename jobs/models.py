"""ORM models: a job, its items (one per input line) and its chunks (one Celery task each)."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, DateTime, Enum, ForeignKey, Index, Integer, LargeBinary, MetaData, String,
                        Text)
from sqlalchemy.types import TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so migrations can name what they alter on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_job_id() -> str:
    return "job_" + uuid.uuid4().hex[:16]


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex[:24]


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on every backend: SQLite stores them naive, so tag them on the way out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None and dialect.name == "sqlite":
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobStatus(str, enum.Enum):
    validating = "validating"  # an HTTP batch whose input file is not parsed yet
    failed = "failed"  # that file could not be used at all (empty, not JSONL, over a limit)
    queued = "queued"
    running = "running"
    completed = "completed"
    cancelling = "cancelling"
    cancelled = "cancelled"


class ItemStatus(str, enum.Enum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_ITEM_STATES


FINAL_ITEM_STATES = frozenset({ItemStatus.succeeded, ItemStatus.failed, ItemStatus.cancelled})


class ChunkStatus(str, enum.Enum):
    pending = "pending"  # queued, or handed back for another worker to take up
    running = "running"  # held by `worker` until `lease_until`
    done = "done"


def _enum(cls: type[enum.Enum]) -> Enum:
    # Stored as plain strings (no native ENUM type), so adding a state is a cheap migration.
    return Enum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e],
                validate_strings=True, name=cls.__name__.lower())


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    name: Mapped[str | None] = mapped_column(String(200), index=True)  # jobs are looked up by name too
    model: Mapped[str] = mapped_column(String(300))
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus), default=JobStatus.queued, index=True)
    source: Mapped[str | None] = mapped_column(Text)  # the input file's path, for people
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # job-wide generation defaults
    adapters: Mapped[dict[str, str] | None] = mapped_column(JSON)  # LoRA adapter name -> local path or hub id
    # Counters move in the same transaction as the items they count, so status is O(1).
    total: Mapped[int] = mapped_column(Integer, default=0)
    pending: Mapped[int] = mapped_column(Integer, default=0)
    running: Mapped[int] = mapped_column(Integer, default=0)
    succeeded: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    cancelled: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)  # of prompt_tokens, from shared prefixes
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancelling_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # when a cancel was asked for
    # SHA-256 of the API key that created the job over HTTP (never the key); None from the CLI.
    owner: Mapped[str | None] = mapped_column(String(64), index=True)
    # issue 21: what the job's lines ask for, `generate` (text) or `embed` (vectors); never both.
    task: Mapped[str] = mapped_column(String(16), default="generate", server_default="generate")

    COUNTERS = ("pending", "running", "succeeded", "failed", "cancelled")

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.COUNTERS}


class Chunk(Base):
    __tablename__ = "chunks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)  # 0-based position in the job
    size: Mapped[int] = mapped_column(Integer)
    status: Mapped[ChunkStatus] = mapped_column(_enum(ChunkStatus), default=ChunkStatus.pending)
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims so far; LLMBATCH_MAX_ATTEMPTS caps them
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Why the last attempt failed (an engine exception, or a worker that stopped renewing its
    # lease), kept on the chunk so it outlives the worker that saw it.
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_chunks_status_lease_until", "status", "lease_until"),)


class Item(Base):
    """One input line and, once final, its one result: the row itself makes results exactly-once."""

    __tablename__ = "items"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    chunk_id: Mapped[int | None] = mapped_column(ForeignKey("chunks.id", ondelete="SET NULL"), index=True)
    line: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str] = mapped_column(String(256))
    status: Mapped[ItemStatus] = mapped_column(_enum(ItemStatus), default=ItemStatus.pending)
    request: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # normalized line; None for a bad line
    output: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    cached_tokens: Mapped[int | None] = mapped_column(Integer)  # of prompt_tokens, from a shared prefix
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    # issue 10. logprobs: one entry per generated token of the first choice, when the line asked;
    # choices: choices 1..n-1 of an n > 1 line, [{"output", "finish_reason", "completion_tokens", "logprobs"}].
    logprobs: Mapped[list | None] = mapped_column(JSON(none_as_null=True))
    choices: Mapped[list | None] = mapped_column(JSON(none_as_null=True))
    # A note on a result that is not an error, e.g. that the context left less room than max_tokens.
    warning: Mapped[str | None] = mapped_column(Text)
    # issue 21: an embedding line's vectors, one per input, float32 little-endian back to back (never
    # JSON text: a million 1,024-dimension vectors are 4 GB so, and about 3x that as text).
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    embedding_dim: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        # One row per line: export order, and what makes a double submit of a line impossible.
        Index("uq_items_job_id_line", "job_id", "line", unique=True),
        Index("ix_items_job_id_status", "job_id", "status"),
    )


class File(Base):
    """An uploaded input file (OpenAI Files API); its bytes live under LLMBATCH_FILES_DIR/<id>."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_file_id)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)  # SHA-256 of the API key
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Batch(Base):
    """The OpenAI Batches API's view of a job created over HTTP: one row per such job, same id."""

    __tablename__ = "batches"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    input_file_id: Mapped[str] = mapped_column(String(40))  # no FK: deleting the file keeps the batch
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    # `metadata` is taken on declarative classes.
    batch_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    error: Mapped[str | None] = mapped_column(Text)  # why validation failed (job status `failed`)
    # Sizes of the output and error files (rendered on download, so measured once and kept here),
    # valid for the job's finished_at equal to `sized_for`: a retry finishes the job anew.
    output_bytes: Mapped[int | None] = mapped_column(BigInteger)
    error_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sized_for: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Worker(Base):
    """A worker process holding a model: registered once it has loaded it, heartbeating while it runs.

    `last_seen` is stamped with the database's clock (as leases are); a worker is live while it
    was seen within workers.LIVE_SECONDS.
    """

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # the worker name items carry: host:pid
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    gpu: Mapped[str | None] = mapped_column(String(200))  # e.g. "cuda:0 NVIDIA H200", or "cpu"
    model: Mapped[str] = mapped_column(String(300))
    engine: Mapped[str] = mapped_column(String(16))  # model | echo
    adapters: Mapped[list | None] = mapped_column(JSON(none_as_null=True))  # LoRA adapter sources loaded now
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
