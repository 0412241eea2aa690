"""The reference export: rendered from ORM items, clearly but slowly.

jobs/export.py writes the same text from plain driver rows, fast; tests/test_scale.py holds the
two byte-equal in every format.
"""

from __future__ import annotations

import csv
import json
from datetime import datetime
from typing import Iterable, Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session

from llmbatch.jobs.export import CSV_COLUMNS, FORMATS, escape_cell, openai_choices, optional_fields
from llmbatch.jobs.models import Item, ItemStatus, Job

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
        "latency_ms": item.latency_ms, "worker": item.worker, "error": error, "warning": item.warning,
        **optional_fields(item.output, item.logprobs, item.choices),
        **({"cached_tokens": item.cached_tokens} if item.cached_tokens else {}),
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
             "total_tokens": (item.prompt_tokens or 0) + (item.completion_tokens or 0),
             "prompt_tokens_details": {"cached_tokens": item.cached_tokens or 0}}
    created = int(item.finished_at.timestamp()) if item.finished_at else None
    model = request.get("adapter") or job.model  # what ran, not the line's body.model
    completions = request.get("url") == "/v1/completions" or ("prompt" in request and request.get("url") is None)
    choices = openai_choices(completions, item.output, item.finish_reason, item.logprobs, item.choices)
    if completions:
        body = {"id": f"cmpl-{job.id}-{item.line}", "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": usage}
    else:
        body = {"id": f"chatcmpl-{job.id}-{item.line}", "object": "chat.completion", "created": created,
                "model": model, "choices": choices, "usage": usage}
    return {"id": rid, "custom_id": item.custom_id,
            "response": {"status_code": 200, "request_id": rid, "body": body}, "error": None}


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
        writer.writerow(CSV_COLUMNS)
        for item in items:
            row = native_row(item)
            writer.writerow([escape_cell(row.get(c)) if c not in ("outputs", "logprobs") else
                             escape_cell(json.dumps(row[c], ensure_ascii=False)) if c in row else ""
                             for c in CSV_COLUMNS])
            yield sink.text
            sink.text = ""
        if sink.text:
            yield sink.text
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


