"""Files for the HTTP API: uploaded batch inputs, and the output and error files of a batch.

An upload is written to LLMBATCH_FILES_DIR under a temporary name, counted as it arrives, and
renamed to its id only once it is whole and within the size limit; its row is inserted after the
rename, so a row always has its bytes. Output and error files are never stored: their ids name a
job, and their content is the job's export, rendered when asked for (their size is measured once
the batch is finished and kept on its row, see batches.generated_file_size).

`owner` is the SHA-256 of the caller's API key, or None when the server runs without keys (then
everything is visible). A file of another owner is reported as not found, never as forbidden.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select, tuple_
from sqlalchemy.orm import Session

from .exceptions import FileNotFound, FileTooLarge, InvalidRequest, StorageQuotaExceeded
from .models import File, Job, new_file_id, utcnow
from .settings import Settings

PURPOSE_BATCH = "batch"
# The ids of a job's generated files: file-<job id>-output (succeeded lines), -errors (failed and cancelled).
_GENERATED = re.compile(r"^file-(job_[0-9a-f]+)-(output|errors)$")
GENERATED_STATES = {"output": ("succeeded",), "errors": ("failed", "cancelled")}
UPLOAD_PREFIX = ".upload-"
# A partial upload not written to for this long belongs to a server that died mid-request. An
# upload in progress writes every few milliseconds; the margin covers a client stalled for minutes.
STALE_UPLOAD_SECONDS = 600
MAX_LIST = 10_000  # OpenAI's largest `limit` for files.list


def owner_of(api_key: str) -> str:
    """What is stored for a key: its SHA-256 (keys are long random strings, so no salt is needed)."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def files_dir(settings: Settings) -> Path:
    return Path(settings.files_dir or settings.home / "files")


def file_path(settings: Settings, file_id: str) -> Path:
    return files_dir(settings) / file_id


def generated_file_id(job_id: str, kind: str) -> str:
    return f"file-{job_id}-{kind}"


@dataclass(frozen=True)
class GeneratedFile:
    """An output or error file: the job's results with the given item states, in OpenAI's shape."""

    id: str
    job: Job
    kind: str  # output | errors

    @property
    def states(self) -> tuple[str, ...]:
        return GENERATED_STATES[self.kind]

    @property
    def filename(self) -> str:
        return f"{self.job.id}_{self.kind}.jsonl"


def storage_used(session: Session, owner: str | None) -> int:
    """Bytes of uploaded files the owner keeps stored (generated files take no space: they are rendered)."""
    who = File.owner.is_(None) if owner is None else File.owner == owner
    return session.scalar(select(func.coalesce(func.sum(File.bytes), 0)).where(who))


def quota_left(session: Session, settings: Settings, owner: str | None) -> int | None:
    """Bytes the owner may still upload under LLMBATCH_MAX_STORAGE_BYTES_PER_KEY; None without a quota."""
    quota = settings.limits.max_storage_bytes_per_key
    return None if quota <= 0 else max(0, quota - storage_used(session, owner))


def _quota_error(settings: Settings) -> StorageQuotaExceeded:
    return StorageQuotaExceeded(f"storage quota exceeded: this key may keep at most "
                                f"{settings.limits.max_storage_bytes_per_key} bytes of files; delete some first")


def sweep_uploads(settings: Settings, older_than_s: float = STALE_UPLOAD_SECONDS) -> int:
    """Remove partial uploads left by a server that died mid-request; returns how many."""
    directory = files_dir(settings)
    if not directory.is_dir():
        return 0
    cutoff, n = time.time() - older_than_s, 0
    for path in directory.glob(UPLOAD_PREFIX + "*"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                n += 1
        except FileNotFoundError:  # finished or swept by another server meanwhile
            pass
    return n


class Upload:
    """One upload on its way to disk. `write` raises FileTooLarge past the limit; `abort` leaves nothing.

    `quota`: what the owner may still store (quota_left); past it, StorageQuotaExceeded.
    """

    def __init__(self, settings: Settings, quota: int | None = None):
        self.settings = settings
        self.limit = settings.limits.max_file_bytes
        self.quota = quota
        directory = files_dir(settings)
        directory.mkdir(parents=True, exist_ok=True)
        self.tmp = directory / f"{UPLOAD_PREFIX}{uuid.uuid4().hex}"
        self.fp = open(self.tmp, "wb")
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.abort()
            raise FileTooLarge(f"file is larger than {self.limit} bytes")
        if self.quota is not None and self.size > self.quota:
            self.abort()
            raise _quota_error(self.settings)
        self.fp.write(data)

    def abort(self) -> None:
        if not self.fp.closed:
            self.fp.close()
        self.tmp.unlink(missing_ok=True)

    def commit(self, session: Session, *, filename: str, purpose: str, owner: str | None) -> File:
        """Rename into place and insert the row (in the caller's transaction)."""
        self.fp.flush()
        os.fsync(self.fp.fileno())
        self.fp.close()
        if purpose != PURPOSE_BATCH:
            self.abort()
            raise InvalidRequest(f"purpose must be 'batch', got {purpose!r}", "purpose")
        if self.size == 0:
            self.abort()
            raise InvalidRequest("the file is empty", "file")
        # Again in the write transaction: uploads of one key that ran side by side count together.
        left = quota_left(session, self.settings, owner)
        if left is not None and self.size > left:
            self.abort()
            raise _quota_error(self.settings)
        file_id = new_file_id()
        final = file_path(self.settings, file_id)
        self.tmp.replace(final)
        try:
            row = File(id=file_id, owner=owner, filename=filename[:255] or "upload.jsonl", purpose=purpose,
                       bytes=self.size, created_at=utcnow())
            session.add(row)
            session.flush()
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        return row


def get_file(session: Session, file_id: str, owner: str | None) -> File | GeneratedFile:
    """An uploaded or generated file the owner may see; FileNotFound otherwise."""
    m = _GENERATED.match(file_id)
    if m:
        job = session.get(Job, m.group(1))
        if job is None or (owner is not None and job.owner != owner):
            raise FileNotFound(file_id)
        return GeneratedFile(file_id, job, m.group(2))
    row = session.get(File, file_id)
    if row is None or (owner is not None and row.owner != owner):
        raise FileNotFound(file_id)
    return row


def list_files(session: Session, owner: str | None, *, purpose: str | None = None, limit: int = MAX_LIST,
               after: str | None = None, order: str = "desc") -> tuple[list[File], bool]:
    """Uploaded files, newest first (`order=asc`: oldest first); `after` is the last id of the previous
    page. Returns (page, has_more). Output and error files are reached through their batch."""
    if not 1 <= limit <= MAX_LIST:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIST}", "limit")
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"order must be 'asc' or 'desc', got {order!r}", "order")
    query = select(File)
    if owner is not None:
        query = query.where(File.owner == owner)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    key = tuple_(File.created_at, File.id)
    if after:
        cursor = get_file(session, after, owner)
        if isinstance(cursor, GeneratedFile):
            raise InvalidRequest("after must be the id of an uploaded file", "after")
        at = tuple_(cursor.created_at, cursor.id)
        query = query.where(key < at if order == "desc" else key > at)
    by = (File.created_at.desc(), File.id.desc()) if order == "desc" else (File.created_at, File.id)
    rows = list(session.scalars(query.order_by(*by).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete_file(session: Session, settings: Settings, file_id: str, owner: str | None) -> None:
    f = get_file(session, file_id, owner)
    if isinstance(f, GeneratedFile):
        raise InvalidRequest("output and error files are rendered from the batch's results and cannot be deleted",
                             "file_id")
    session.delete(f)
    session.flush()
    # The row goes first: a crash between the two leaves an orphan file on disk, never a row without bytes.
    file_path(settings, file_id).unlink(missing_ok=True)


def file_object(f: File | GeneratedFile, size: int | None = None) -> dict:
    """The OpenAI File object. A generated file's `size` comes from the caller (batches.generated_file_size)."""
    if isinstance(f, GeneratedFile):
        created = f.job.finished_at or f.job.created_at
        return {"id": f.id, "object": "file", "bytes": size or 0, "created_at": int(created.timestamp()),
                "filename": f.filename, "purpose": "batch_output", "status": "processed", "expires_at": None,
                "status_details": None}
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": int(f.created_at.timestamp()),
            "filename": f.filename, "purpose": f.purpose, "status": "processed", "expires_at": None,
            "status_details": None}
