"""Export a job's results, streamed in line order: native JSONL, OpenAI batch output, or CSV."""

from __future__ import annotations

import csv
import io
import json
import typing
import uuid
from datetime import datetime
from typing import Iterator

from sqlalchemy import String, func, literal, or_, select
from sqlalchemy.orm import Session

from .models import Item, ItemStatus, Job

FORMATS = ("jsonl", "openai", "csv")
PARQUET = "parquet"  # issue 21: embedding jobs only (jobs/embeddings.py)
COLUMNS = ("custom_id", "line", "status", "output", "finish_reason", "prompt_tokens", "completion_tokens",
           "queued_at", "started_at", "finished_at", "latency_ms", "worker", "error", "warning")
# issue 10: native lines carry these only when the line asked for them (n > 1, logprobs); CSV always
# has the columns, as JSON text, empty when absent.
OPTIONAL_COLUMNS = ("outputs", "logprobs", "cached_tokens")
CSV_COLUMNS = COLUMNS + OPTIONAL_COLUMNS
# A spreadsheet runs a cell that starts with one of these as a formula.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
STREAM_BATCH = 2000


def escape_cell(value) -> str:
    """Text for a CSV cell; one that a spreadsheet would run as a formula gets a leading quote."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict) else str(value)
    if text.startswith(FORMULA_PREFIXES):
        return "'" + text
    return text


# A million ORM objects would cost most of an export's time, so `export` reads plain tuples through
# the driver (a server-side cursor on PostgreSQL) and renders them without building Items.
# tests/export_reference.py renders the same from ORM items; the tests hold the two byte-equal.

# Row positions: the native columns, then (openai only) what openai_row needs from `request`.
(_CID, _LINE, _STATUS, _OUTPUT, _FINISH, _PT, _CT, _QUEUED, _STARTED, _FINISHED, _LATENCY, _WORKER, _CODE,
 _MESSAGE, _WARNING, _LOGPROBS, _CHOICES, _CACHED, _URL, _HAS_PROMPT) = range(20)
_NATIVE = ("custom_id", "line", "status", "output", "finish_reason", "prompt_tokens", "completion_tokens", "queued_at",
           "started_at", "finished_at", "latency_ms", "worker", "error_code", "error_message", "warning", "logprobs",
           "choices", "cached_tokens")
_encode = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode  # json.dumps(x, ensure_ascii=False)
_encode_ascii = json.JSONEncoder().encode  # json.dumps(x)


def _request_columns(dialect: str) -> list:
    """What the openai format needs from `request` (url, has a prompt), read in SQL.

    Written per dialect with plain string binds, so the compiled parameters need no processing.
    """
    r = Item.__table__.c.request
    if dialect == "postgresql":
        def field(key):
            return r.op("->>", return_type=String)(literal(key, String))

        return [field("url"), r.op("->", return_type=String)(literal("prompt", String)).is_not(None)]
    return [func.json_extract(r, literal("$.url", String)),
            func.json_type(r, literal("$.prompt", String)).is_not(None)]


def _adapter_column(dialect: str):
    """request.adapter, the name the line ran with (issue 11); read only for jobs with adapters."""
    r = Item.__table__.c.request
    if dialect == "postgresql":
        return r.op("->>", return_type=String)(literal("adapter", String))
    return func.json_extract(r, literal("$.adapter", String))


def _query(dialect: str, job_id: str, only: str | tuple[str, ...] | None, with_request: bool,
           with_adapter: bool = False):
    t = Item.__table__
    cols = [t.c[name] for name in _NATIVE] + (_request_columns(dialect) if with_request else [])
    cols += [_adapter_column(dialect)] if with_adapter else []  # last: row[-1]
    query = select(*cols).where(t.c.job_id == literal(job_id, String)).order_by(t.c.line)
    if only:
        # OR of equalities, not IN: an IN list compiles to a parameter the raw cursor cannot take.
        states = (only,) if isinstance(only, str) else only
        query = query.where(or_(*[t.c.status == literal(ItemStatus(s).value, String) for s in states]))
    return query


def _rows(session: Session, job_id: str, only: str | tuple[str, ...] | None, with_request: bool,
          with_adapter: bool = False) -> Iterator[list[tuple]]:
    """Batches of plain tuples, in line order, from one SELECT in the session's transaction.

    SQLAlchemy compiles the statement; the driver's own cursor runs it, which skips building a
    Row per result (a server-side cursor on PostgreSQL, so memory stays flat).
    """
    conn = session.connection()
    compiled = _query(conn.dialect.name, job_id, only, with_request, with_adapter).compile(dialect=conn.dialect)
    dbapi = conn.connection.dbapi_connection
    if conn.dialect.name == "postgresql":
        cur = dbapi.cursor(name=f"llmbatch_export_{uuid.uuid4().hex[:12]}")
        cur.itersize = STREAM_BATCH
    else:
        cur = dbapi.cursor()  # SQLite steps through the result as we fetch
    params = compiled.params
    if compiled.positiontup is not None:  # qmark / format paramstyles take a tuple
        params = tuple(params[name] for name in compiled.positiontup)
    try:
        cur.execute(str(compiled), params)
        while batch := cur.fetchmany(STREAM_BATCH):
            yield batch
    finally:
        cur.close()


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


def json_value(raw):
    """A JSON column as read by the driver: text on SQLite, already parsed on PostgreSQL."""
    return json.loads(raw) if isinstance(raw, str) else raw


def optional_fields(output: str | None, logprobs, choices) -> dict:
    """issue 10: `outputs` (every choice, when n > 1) and `logprobs` (first choice), when present."""
    extra = {}
    if choices:
        extra["outputs"] = [output] + [c["output"] for c in choices]
    if logprobs is not None:
        extra["logprobs"] = logprobs
    return extra


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries: list[dict] | None) -> dict | None:
    """Native logprobs -> a chat choice's `logprobs` ({"content": [...], "refusal": None})."""
    if entries is None:
        return None
    return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": _token_bytes(e["token"]),
                         "top_logprobs": [{"token": t["token"], "logprob": t["logprob"],
                                           "bytes": _token_bytes(t["token"])} for t in e["top_logprobs"]]}
                        for e in entries],
            "refusal": None}


def completion_logprobs(entries: list[dict] | None) -> dict | None:
    """Native logprobs -> the legacy /v1/completions shape (tokens, token_logprobs, top_logprobs, text_offset)."""
    if entries is None:
        return None
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def openai_choices(completions: bool, output, finish, logprobs, choices) -> list[dict]:
    """choices[i] of an OpenAI body: the first from the item's own columns, then its extra choices."""
    everyone = [(output, finish, logprobs)] + [(c["output"], c["finish_reason"], c["logprobs"]) for c in choices or ()]
    out = []
    for i, (text, fin, lps) in enumerate(everyone):
        if completions:
            out.append({"index": i, "text": text, "finish_reason": fin, "logprobs": completion_logprobs(lps)})
        else:
            choice = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": fin}
            if lps is not None:
                choice["logprobs"] = chat_logprobs(lps)
            out.append(choice)
    return out


def _native_dicts(rows: list[tuple], iso: _Iso) -> Iterator[dict]:
    for r in rows:
        code = r[_CODE]
        d = {
            "custom_id": r[_CID], "line": r[_LINE], "status": r[_STATUS], "output": r[_OUTPUT],
            "finish_reason": r[_FINISH], "prompt_tokens": r[_PT], "completion_tokens": r[_CT],
            "queued_at": iso(r[_QUEUED]), "started_at": iso(r[_STARTED]), "finished_at": iso(r[_FINISHED]),
            "latency_ms": r[_LATENCY], "worker": r[_WORKER],
            "error": {"code": code, "message": r[_MESSAGE]} if code else None, "warning": r[_WARNING],
        }
        if r[_LOGPROBS] is not None or r[_CHOICES] is not None:  # issue 10
            d.update(optional_fields(r[_OUTPUT], json_value(r[_LOGPROBS]), json_value(r[_CHOICES])))
        if r[_CACHED]:  # prompt tokens from a shared prefix
            d["cached_tokens"] = r[_CACHED]
        yield d


def _jsonl(rows: list[tuple], iso: _Iso, job: Job) -> str:
    encode = _encode
    if job.adapters:  # issue 11: which adapter each line ran with
        return "".join([encode({**d, "adapter": r[-1]}) + "\n" for d, r in zip(_native_dicts(rows, iso), rows)])
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
            usage = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": (pt or 0) + (ct or 0),
                     "prompt_tokens_details": {"cached_tokens": r[_CACHED] or 0}}
            created = _created(r[_FINISHED], iso)
            # What ran, not what the line asked for (OpenAI names the model that answered): the
            # adapter's name (issue 11), else the job's model.
            model = (r[-1] if job.adapters else None) or job_model
            url = r[_URL]
            completions = url == "/v1/completions" or bool(r[_HAS_PROMPT] and url is None)
            choices = openai_choices(completions, r[_OUTPUT], r[_FINISH], json_value(r[_LOGPROBS]),
                                     json_value(r[_CHOICES]))
            if completions:
                body = {"id": f"cmpl-{job_id}-{line}", "object": "text_completion", "created": created,
                        "model": model, "choices": choices, "usage": usage}
            else:
                body = {"id": f"chatcmpl-{job_id}-{line}", "object": "chat.completion", "created": created,
                        "model": model, "choices": choices, "usage": usage}
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
               escape_cell(_encode_ascii({"code": code, "message": r[_MESSAGE]})) if code else "", cell(r[_WARNING]),
               # issue 10: JSON text, empty when the line did not ask
               _json_cell(optional_fields(r[_OUTPUT], None, json_value(r[_CHOICES])).get("outputs")),
               _json_cell(json_value(r[_LOGPROBS])), r[_CACHED] or ""]


def _json_cell(value) -> str:
    return "" if value is None else escape_cell(_encode(value))


def export(session: Session, job: Job, out: typing.TextIO, fmt: str = "jsonl",
           only: str | tuple[str, ...] | None = None) -> int:
    """Write the export to `out`; returns the rows written. `only`: one item status, or several.

    One SELECT inside one read transaction, so the export is a consistent snapshot even while
    workers keep writing. Rows are read and written a batch at a time: memory stays flat.
    """
    if fmt not in FORMATS and fmt != PARQUET:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if job.task == "embed" or fmt == PARQUET:  # issue 21: vectors, not text
        from . import embeddings

        return embeddings.export(session, job, out, fmt, only)
    iso = _Iso(session)
    rows = 0
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS + (("adapter",) if job.adapters else ()))
        for batch in _rows(session, job.id, only, with_request=False, with_adapter=bool(job.adapters)):
            if job.adapters:  # issue 11: the adapter column last
                writer.writerows(row + [_cell(r[-1])] for row, r in zip(_csv_rows(batch, iso), batch))
            else:
                writer.writerows(_csv_rows(batch, iso))
            rows += len(batch)
            out.write(buf.getvalue())
            buf.seek(0)
            buf.truncate()
        out.write(buf.getvalue())
        return rows
    render_batch = _jsonl if fmt == "jsonl" else _openai
    for batch in _rows(session, job.id, only, with_request=fmt == "openai", with_adapter=bool(job.adapters)):
        out.write(render_batch(batch, iso, job))
        rows += len(batch)
    return rows
