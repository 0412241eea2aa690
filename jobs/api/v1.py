"""The OpenAI Files and Batches API. Thin: each handler checks the caller and calls the library
(jobs/files.py, jobs/batches.py)."""

from __future__ import annotations

import json
import queue
import threading
from typing import Iterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from llmbatch.jobs import batches, files, workers
from llmbatch.jobs.db import Database
from llmbatch.jobs.exceptions import InvalidRequest
from llmbatch.jobs.export import export
from llmbatch.jobs.models import Job

from .app import owner
from .upload import receive_upload

router = APIRouter(prefix="/v1")
STREAM_PIECE = 256 * 1024  # characters of export text per piece sent


# -- files --------------------------------------------------------------------------------------------


@router.post("/files")
async def create_file(request: Request, who: str | None = Depends(owner)):
    settings = request.app.state.settings

    def left():
        with request.app.state.db.read() as s:
            return files.quota_left(s, settings, who)

    quota = await run_in_threadpool(left) if settings.limits.max_storage_bytes_per_key > 0 else None
    received = await receive_upload(request, settings, quota)

    def store():
        try:
            with request.app.state.db.write() as s:
                return files.file_object(received.upload.commit(s, filename=received.filename,
                                                                purpose=received.fields["purpose"], owner=who))
        finally:
            received.upload.abort()  # no-op once committed (renamed); removes the bytes otherwise

    return await run_in_threadpool(store)


@router.get("/files")
def list_files(request: Request, purpose: str | None = None, limit: int = files.MAX_LIST, after: str | None = None,
               order: str = "desc", who: str | None = Depends(owner)):
    with request.app.state.db.read() as s:
        page, has_more = files.list_files(s, who, purpose=purpose, limit=limit, after=after, order=order)
        data = [files.file_object(f) for f in page]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


@router.get("/files/{file_id}")
def retrieve_file(file_id: str, request: Request, who: str | None = Depends(owner)):
    db: Database = request.app.state.db
    with db.read() as s:
        f = files.get_file(s, file_id, who)
    if isinstance(f, files.GeneratedFile):
        return files.file_object(f, batches.generated_file_size(db, f))
    return files.file_object(f)


@router.get("/files/{file_id}/content")
def file_content(file_id: str, request: Request, who: str | None = Depends(owner)):
    db: Database = request.app.state.db
    with db.read() as s:
        f = files.get_file(s, file_id, who)
    if isinstance(f, files.GeneratedFile):
        return StreamingResponse(_stream_export(db, f.job.id, f.states), media_type="application/jsonl")
    return FileResponse(files.file_path(request.app.state.settings, f.id), media_type="application/jsonl",
                        filename=f.filename)


@router.delete("/files/{file_id}")
def delete_file(file_id: str, request: Request, who: str | None = Depends(owner)):
    with request.app.state.db.write() as s:
        files.delete_file(s, request.app.state.settings, file_id, who)
    return {"id": file_id, "object": "file", "deleted": True}


class _Stop(Exception):
    pass


def _stream_export(db: Database, job_id: str, states: tuple[str, ...]) -> Iterator[bytes]:
    """The export, produced by a thread into a small bounded queue: memory stays flat whatever its size.

    A client that goes away closes this generator, which stops the producer at its next write.
    """
    pieces: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()

    def put(item) -> None:
        while not stop.is_set():
            try:
                pieces.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        raise _Stop()

    class Sink:
        def __init__(self):
            self.buf: list[str] = []
            self.size = 0

        def write(self, text: str) -> None:
            self.buf.append(text)
            self.size += len(text)
            if self.size >= STREAM_PIECE:
                self.flush()

        def flush(self) -> None:
            if self.buf:
                put("".join(self.buf).encode("utf-8"))
            self.buf, self.size = [], 0

    def produce() -> None:
        try:
            sink = Sink()
            with db.read() as s:  # one read transaction: a consistent snapshot of the results
                export(s, s.get(Job, job_id), sink, "openai", only=states)
            sink.flush()
            put(None)
        except _Stop:
            pass
        except BaseException as exc:
            try:
                put(exc)
            except _Stop:
                pass

    threading.Thread(target=produce, daemon=True, name=f"export-{job_id}").start()
    try:
        while True:
            item = pieces.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# -- batches ------------------------------------------------------------------------------------------


@router.post("/batches")
async def create_batch(request: Request, who: str | None = Depends(owner)):
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    missing = [k for k in ("input_file_id", "endpoint", "completion_window") if k not in body]
    if missing:
        raise InvalidRequest(f"missing required parameter {missing[0]!r}", missing[0])
    app = request.app

    def store():
        with app.state.db.write() as s:
            job = batches.create_batch(s, app.state.settings, input_file_id=body["input_file_id"],
                                       endpoint=body["endpoint"], completion_window=body["completion_window"],
                                       metadata=body.get("metadata"), model=body.get("model"), owner=who)
            view = batches.get_batch(s, job.id, who)
            return batches.batch_object(view, batches.unserved_warning(s, view))

    obj = await run_in_threadpool(store)
    if app.state.ingestor is not None:
        app.state.ingestor.submit(obj["id"])  # committed: the parse may start
    return obj


@router.get("/batches/{batch_id}")
def retrieve_batch(batch_id: str, request: Request, who: str | None = Depends(owner)):
    with request.app.state.db.read() as s:
        view = batches.get_batch(s, batch_id, who)
        return batches.batch_object(view, batches.unserved_warning(s, view))


@router.get("/batches")
def list_batches(request: Request, after: str | None = None, limit: int = 20, who: str | None = Depends(owner)):
    with request.app.state.db.read() as s:
        page, has_more = batches.list_batches(s, who, after, limit)
        data = [batches.batch_object(v) for v in page]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


@router.post("/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, request: Request, who: str | None = Depends(owner)):
    with request.app.state.db.write() as s:
        return batches.batch_object(batches.cancel_batch(s, batch_id, who))


# -- models -------------------------------------------------------------------------------------------


@router.get("/models")
def list_models(request: Request, who: str | None = Depends(owner)):
    """The models live workers hold, and the LoRA adapters loaded on them (as vLLM lists them:
    `parent` names the base model)."""
    with request.app.state.db.read() as s:
        live = workers.list_workers(s)
    data, seen = [], set()
    for w, _ in sorted(live, key=lambda p: p[0].started_at):
        if w.model not in seen:
            seen.add(w.model)
            data.append({"id": w.model, "object": "model", "created": int(w.started_at.timestamp()),
                         "owned_by": "llmbatch", "root": w.model, "parent": None})
        for a in w.adapters or []:
            if (w.model, a) not in seen:
                seen.add((w.model, a))
                data.append({"id": a, "object": "model", "created": int(w.started_at.timestamp()),
                             "owned_by": "llmbatch", "root": a, "parent": w.model})
    return {"object": "list", "data": data}
