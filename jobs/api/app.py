"""The HTTP server: the OpenAI Files and Batches API under /v1, the dashboard at /, /metrics.

Stateless over the database and the broker: any number of servers can run side by side. Handlers
that touch the database are plain `def`s, which FastAPI runs in its thread pool, so the event loop
never waits on SQL; batch files are parsed in a child process (jobs/api/ingest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmbatch.jobs import files
from llmbatch.jobs.db import Database
from llmbatch.jobs.exceptions import (AmbiguousJob, FileNotFound, FileTooLarge, InputFileError, InvalidRequest,
                                      InvalidState, JobNotFound, LLMBatchError, StorageQuotaExceeded)
from llmbatch.jobs.settings import Settings

from .auth import KeyCheck, Unauthorized
from .ingest import Ingestor

log = logging.getLogger(__name__)

SWEEP_SECONDS = float(os.environ.get("LLMBATCH_INGEST_SWEEP_SECONDS") or 10)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape: the SDK reads `error.message` into its exceptions."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def owner(request: Request) -> str | None:
    """Dependency: the caller's owner hash (None without keys); 401 for a missing or wrong key."""
    return request.app.state.keys.owner(request)


def page_owner(request: Request) -> str | None:
    """The same for HTML pages: a browser is asked for the key with HTTP Basic auth."""
    return request.app.state.keys.owner(request, browser=True)


# The framework's own errors (an unknown route, a wrong method), by status, in OpenAI's words.
HTTP_ERROR_CODES = {404: "unknown_url", 405: "method_not_allowed"}


def create_app(settings: Settings, api_keys: list[str], *, admin_keys: list[str] = (), ingest: bool = True
               ) -> FastAPI:
    db = Database(settings.database_url)
    db.ensure_schema()
    swept = files.sweep_uploads(settings)  # partial uploads of a server that died mid-request
    if swept:
        log.info("removed %d stale partial upload(s) from %s", swept, files.files_dir(settings))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        sweeper = None
        if ingest:
            app.state.ingestor = Ingestor(settings)
            sweeper = asyncio.create_task(_sweep_forever(app))
        try:
            yield
        finally:
            if sweeper:
                sweeper.cancel()
                app.state.ingestor.close()
            db.dispose()

    app = FastAPI(title="llmbatch", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.db = db
    app.state.keys = KeyCheck(api_keys, admin_keys)
    app.state.ingestor = None

    @app.exception_handler(Unauthorized)
    async def _unauthorized(request: Request, exc: Unauthorized):
        headers = {"WWW-Authenticate": 'Basic realm="llmbatch"' if exc.browser else "Bearer"}
        return JSONResponse(error_body(str(exc), code="invalid_api_key"), status_code=401, headers=headers)

    @app.exception_handler(LLMBatchError)
    async def _llmbatch_error(request: Request, exc: LLMBatchError):
        if isinstance(exc, (JobNotFound, FileNotFound)):
            return JSONResponse(error_body(str(exc), code="not_found"), status_code=404)
        if isinstance(exc, AmbiguousJob):
            return JSONResponse(error_body(str(exc), code="ambiguous_name"), status_code=409)
        if isinstance(exc, StorageQuotaExceeded):
            return JSONResponse(error_body(str(exc), param="file", code="storage_quota_exceeded"), status_code=413)
        if isinstance(exc, FileTooLarge):
            return JSONResponse(error_body(str(exc), param="file", code="file_too_large"), status_code=413)
        if isinstance(exc, InvalidRequest):
            return JSONResponse(error_body(str(exc), param=exc.param), status_code=400)
        if isinstance(exc, (InvalidState, InputFileError)):
            return JSONResponse(error_body(str(exc)), status_code=400)
        return JSONResponse(error_body(str(exc), type_="server_error"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"invalid request: {first.get('msg', 'bad parameters')}", param=param),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"unknown URL: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        type_ = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return JSONResponse(error_body(message, type_, code=HTTP_ERROR_CODES.get(exc.status_code)),
                            status_code=exc.status_code, headers=exc.headers)

    from . import dashboard, health, metrics, v1

    app.include_router(v1.router)
    app.include_router(dashboard.router)
    app.include_router(metrics.router)
    app.include_router(health.router)
    return app


async def _sweep_forever(app: FastAPI) -> None:
    while True:
        try:
            await run_in_threadpool(app.state.ingestor.sweep, app.state.db)
            await run_in_threadpool(files.sweep_uploads, app.state.settings)
        except Exception as exc:  # the database may be down for a while: keep sweeping
            log.warning("batch sweep failed: %s: %s", type(exc).__name__, exc)
        await asyncio.sleep(SWEEP_SECONDS)

