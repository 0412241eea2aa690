"""Export a job's results, streamed in line order: native JSONL, OpenAI batch output, or CSV."""

from __future__ import annotations

import csv
import io
import json
import typing
import uuid
from datetime import datetime
from typing import Iterable, Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Item, ItemStatus, Job

FORMATS = ("jsonl", "openai", "csv")
COLUMNS = ("custom_id", "line", "status", "output", "finish_reason", "prompt_tokens", "completion_tokens",
           "queued_at", "started_at", "finished_at", "latency_ms", "worker", "error")
# A spreadsheet runs a cell that starts with one of these as a formula.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
STREAM_BATCH = 2000


def iter_items(session: Session, job_id: str, only: str | None = None) -> Iterator[Item]:
    """The job's items in line order, fetched in batches through a server-side cursor."""
    query = select(Item).where(Item.job_id == job_id).order_by(Item.line)
    if only:
        query = query.where(Item.status == ItemStatus(only))
    result = session.execute(query.execution_options(yield_per=STREAM_BATCH))
    for item in result.scalars():
        yield item
        session.expunge(item)  # keep the identity map, and memory, flat on a million rows


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


def native_row(item: Item) -> dict:
    error = {"code": item.error_code, "message": item.error_message} if item.error_code else None
    return {
        "custom_id": item.custom_id, "line": item.line, "status": item.status.value, "output": item.output,
        "finish_reason": item.finish_reason, "prompt_tokens": item.prompt_tokens,
        "completion_tokens": item.completion_tokens, "queued_at": _iso(item.queued_at),
        "started_at": _iso(item.started_at), "finished_at": _iso(item.finished_at),
        "latency_ms": item.latency_ms, "worker": item.worker, "error": error,
    }


def openai_row(item: Item, job: Job) -> dict:
    """One line of OpenAI Batch API output."""
    request = item.request or {}
    rid = f"batch_req_{job.id}_{item.line}"
    if item.status is not ItemStatus.succeeded:
        return {"id": rid, "custom_id": item.custom_id, "response": None,
                "error": {"code": item.error_code or item.status.value,
                          "message": item.error_message or f"item {item.status.value}"}}
    usage = {"prompt_tokens": item.prompt_tokens, "completion_tokens": item.completion_tokens,
             "total_tokens": (item.prompt_tokens or 0) + (item.completion_tokens or 0)}
    created = int(item.finished_at.timestamp()) if item.finished_at else None
    model = request.get("body_model") or job.model
    if request.get("url") == "/v1/completions" or ("prompt" in request and request.get("url") is None):
        body = {"id": f"cmpl-{job.id}-{item.line}", "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": item.output, "finish_reason": item.finish_reason, "logprobs": None}],
                "usage": usage}
    else:
        body = {"id": f"chatcmpl-{job.id}-{item.line}", "object": "chat.completion", "created": created,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": item.output},
                             "finish_reason": item.finish_reason}],
                "usage": usage}
    return {"id": rid, "custom_id": item.custom_id,
            "response": {"status_code": 200, "request_id": rid, "body": body}, "error": None}


def escape_cell(value) -> str:
    """Text for a CSV cell; one that a spreadsheet would run as a formula gets a leading quote."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict) else str(value)
    if text.startswith(FORMULA_PREFIXES):
        return "'" + text
    return text


class _Line:
    """A file-like sink for csv.writer that hands back what was written."""

    def __init__(self):
        self.text = ""

    def write(self, s: str) -> None:
        self.text += s


def render(items: Iterable[Item], fmt: str, job: Job) -> Iterator[str]:
    """Yield the export of ORM items as text chunks (each one or more whole lines).

    The reference rendering: `export` below writes the same text from plain rows, faster.
    """
    if fmt == "jsonl":
        for item in items:
            yield json.dumps(native_row(item), ensure_ascii=False) + "\n"
    elif fmt == "openai":
        for item in items:
            yield json.dumps(openai_row(item, job), ensure_ascii=False) + "\n"
    elif fmt == "csv":
        sink = _Line()
        writer = csv.writer(sink, lineterminator="\n")
        writer.writerow(COLUMNS)
        for item in items:
            row = native_row(item)
            writer.writerow([escape_cell(row[c]) for c in COLUMNS])
            yield sink.text
            sink.text = ""
        if sink.text:
            yield sink.text
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


# -- the fast path: plain rows straight from the driver ------------------------------------------------
#
# A million ORM objects cost most of an export's time, so `export` reads plain tuples through the
# driver (a server-side cursor on PostgreSQL) and renders them without building Items. Each
# function below gives, for a row, exactly what native_row / openai_row / escape_cell give.

# Row positions: the native columns, then (openai only) what openai_row needs from `request`.
(_CID, _LINE, _STATUS, _OUTPUT, _FINISH, _PT, _CT, _QUEUED, _STARTED, _FINISHED, _LATENCY, _WORKER, _CODE,
 _MESSAGE, _URL, _BODY_MODEL, _HAS_PROMPT) = range(17)
_SELECT = ("custom_id, line, status, output, finish_reason, prompt_tokens, completion_tokens, queued_at, "
           "started_at, finished_at, latency_ms, worker, error_code, error_message")
_REQUEST_FIELDS = {
    "sqlite": "json_extract(request, '$.url'), json_extract(request, '$.body_model'), "
              "json_type(request, '$.prompt') IS NOT NULL",
    "postgresql": "request->>'url', request->>'body_model', (request->'prompt') IS NOT NULL",
}
_encode = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode  # json.dumps(x, ensure_ascii=False)
_encode_ascii = json.JSONEncoder().encode  # json.dumps(x)


def _rows(session: Session, job_id: str, only: str | None, with_request: bool) -> Iterator[list[tuple]]:
    """Batches of plain tuples, in line order, from one SELECT in the session's transaction."""
    conn = session.connection()
    dialect = conn.dialect.name
    if dialect not in _REQUEST_FIELDS:  # another backend: through SQLAlchemy Core
        yield from _rows_core(conn, job_id, only, with_request)
        return
    mark = "?" if dialect == "sqlite" else "%s"
    sql = f"SELECT {_SELECT}"
    if with_request:
        sql += ", " + _REQUEST_FIELDS[dialect]
    sql += f" FROM items WHERE job_id = {mark}"
    args: tuple = (job_id,)
    if only:
        sql += f" AND status = {mark}"
        args += (ItemStatus(only).value,)
    sql += " ORDER BY line"
    dbapi = conn.connection.dbapi_connection
    if dialect == "postgresql":
        cur = dbapi.cursor(name=f"llmbatch_export_{uuid.uuid4().hex[:12]}")  # server-side: memory stays flat
        cur.itersize = STREAM_BATCH
    else:
        cur = dbapi.cursor()  # SQLite steps through the result as we fetch
    try:
        cur.execute(sql, args)
        while batch := cur.fetchmany(STREAM_BATCH):
            yield batch
    finally:
        cur.close()


def _rows_core(conn, job_id: str, only: str | None, with_request: bool) -> Iterator[list[tuple]]:
    t = Item.__table__
    cols = [t.c[name] for name in _SELECT.split(", ")]
    query = select(*cols, t.c.request if with_request else t.c.id).where(t.c.job_id == job_id).order_by(t.c.line)
    if only:
        query = query.where(t.c.status == ItemStatus(only))
    result = conn.execution_options(yield_per=STREAM_BATCH).execute(query)
    for part in result.partitions():
        out = []
        for r in part:
            request = r[-1] if with_request else None
            row = list(r[:-1])
            row[_STATUS] = ItemStatus(row[_STATUS]).value
            request = request or {}
            out.append((*row, request.get("url"), request.get("body_model"), "prompt" in request))
        yield out


class _Iso:
    """Timestamps as native_row writes them (aware UTC isoformat), from whatever the driver returns."""

    def __init__(self, session: Session):
        dialect = session.connection().dialect
        self.process = Item.__table__.c.queued_at.type.dialect_impl(dialect).result_processor(dialect, None)
        self.sqlite = dialect.name == "sqlite"
        self.last_raw: object = None
        self.last: str | None = None

    def __call__(self, raw) -> str | None:
        if raw is None:
            return None
        if raw == self.last_raw:  # queued_at is one value for a whole job, started_at one per batch
            return self.last
        if self.sqlite and type(raw) is str and len(raw) == 26 and raw[10] == " " and raw[19] == ".":
            # SQLAlchemy's own SQLite format, "YYYY-MM-DD HH:MM:SS.ffffff", naive UTC.
            frac = raw[19:] if raw[20:] != "000000" else ""
            text = f"{raw[:10]}T{raw[11:19]}{frac}+00:00"
        else:
            dt = self.process(raw) if self.process else raw
            text = dt.isoformat()
        self.last_raw, self.last = raw, text
        return text


def _native_dicts(rows: list[tuple], iso: _Iso) -> Iterator[dict]:
    for r in rows:
        code = r[_CODE]
        yield {
            "custom_id": r[_CID], "line": r[_LINE], "status": r[_STATUS], "output": r[_OUTPUT],
            "finish_reason": r[_FINISH], "prompt_tokens": r[_PT], "completion_tokens": r[_CT],
            "queued_at": iso(r[_QUEUED]), "started_at": iso(r[_STARTED]), "finished_at": iso(r[_FINISHED]),
            "latency_ms": r[_LATENCY], "worker": r[_WORKER],
            "error": {"code": code, "message": r[_MESSAGE]} if code else None,
        }


def _jsonl(rows: list[tuple], iso: _Iso, job: Job) -> str:
    encode = _encode
    return "".join([encode(d) + "\n" for d in _native_dicts(rows, iso)])


def _created(raw, iso: _Iso) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, datetime):
        dt = iso.process(raw) if iso.process else raw
    else:
        dt = datetime.fromisoformat(iso(raw))
    return int(dt.timestamp())


def _openai(rows: list[tuple], iso: _Iso, job: Job) -> str:
    encode = _encode
    job_id, job_model = job.id, job.model
    succeeded = ItemStatus.succeeded.value
    lines = []
    for r in rows:
        line, cid, status = r[_LINE], r[_CID], r[_STATUS]
        rid = f"batch_req_{job_id}_{line}"
        if status != succeeded:
            obj = {"id": rid, "custom_id": cid, "response": None,
                   "error": {"code": r[_CODE] or status, "message": r[_MESSAGE] or f"item {status}"}}
        else:
            pt, ct = r[_PT], r[_CT]
            usage = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": (pt or 0) + (ct or 0)}
            created = _created(r[_FINISHED], iso)
            model = r[_BODY_MODEL] or job_model
            url = r[_URL]
            if url == "/v1/completions" or (r[_HAS_PROMPT] and url is None):
                body = {"id": f"cmpl-{job_id}-{line}", "object": "text_completion", "created": created,
                        "model": model,
                        "choices": [{"index": 0, "text": r[_OUTPUT], "finish_reason": r[_FINISH], "logprobs": None}],
                        "usage": usage}
            else:
                body = {"id": f"chatcmpl-{job_id}-{line}", "object": "chat.completion", "created": created,
                        "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": r[_OUTPUT]},
                                     "finish_reason": r[_FINISH]}],
                        "usage": usage}
            obj = {"id": rid, "custom_id": cid, "response": {"status_code": 200, "request_id": rid, "body": body},
                   "error": None}
        lines.append(encode(obj))
    lines.append("")
    return "\n".join(lines)


def _cell(value) -> str:
    """escape_cell for a str or None."""
    if value is None:
        return ""
    if value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def _csv_rows(rows: list[tuple], iso: _Iso) -> Iterator[list]:
    cell = _cell
    for r in rows:
        code = r[_CODE]
        # Numbers never start with a formula prefix unless negative, which no count or latency is;
        # escape_cell would give str(n) for them.
        yield [cell(r[_CID]), r[_LINE], r[_STATUS], cell(r[_OUTPUT]), cell(r[_FINISH]),
               escape_cell(r[_PT]), escape_cell(r[_CT]),
               cell(iso(r[_QUEUED])), cell(iso(r[_STARTED])), cell(iso(r[_FINISHED])),
               escape_cell(r[_LATENCY]), cell(r[_WORKER]),
               escape_cell(_encode_ascii({"code": code, "message": r[_MESSAGE]})) if code else ""]


def export(session: Session, job: Job, out: typing.TextIO, fmt: str = "jsonl", only: str | None = None) -> int:
    """Write the export to `out`; returns the rows written.

    One SELECT inside one read transaction, so the export is a consistent snapshot even while
    workers keep writing. Rows are read and written a batch at a time: memory stays flat.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    iso = _Iso(session)
    rows = 0
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(COLUMNS)
        for batch in _rows(session, job.id, only, with_request=False):
            writer.writerows(_csv_rows(batch, iso))
            rows += len(batch)
            out.write(buf.getvalue())
            buf.seek(0)
            buf.truncate()
        out.write(buf.getvalue())
        return rows
    render_batch = _jsonl if fmt == "jsonl" else _openai
    for batch in _rows(session, job.id, only, with_request=fmt == "openai"):
        out.write(render_batch(batch, iso, job))
        rows += len(batch)
    return rows
