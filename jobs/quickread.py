"""Job summaries read through the DB-API driver alone, so `status` starts fast.

Importing SQLAlchemy and the ORM models costs a short command most of its time
(benchmarks/RESULTS.md, "status"), and `status` only reads one row of `jobs` (the counters are kept
in step with the items), or a few. So it reads here first, with the same id-then-name lookup as
service.get_job and the same summary as service.job_summary. Whatever this path cannot read
surely returns None, and the caller takes the full path, which also creates or upgrades the
schema and words connection errors: another driver, a URL with options only SQLAlchemy knows, a
database file or table that does not exist yet, any database error.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

from .exceptions import AmbiguousJob, JobNotFound

# The one definition of a job summary's keys, in order: service.job_summary builds its dict from
# them, and the literal statements below select them in this order (tests/test_quickread.py checks
# every statement against it), so a new column is added here, in the statements, and nowhere else.
# The statements are literal text, one set per driver placeholder: no SQL is built by formatting.
COLUMNS = ("id", "name", "status", "model", "total", "pending", "running", "succeeded", "failed", "cancelled",
           "prompt_tokens", "completion_tokens", "cached_tokens", "created_at", "started_at", "finished_at")
TIMES = ("created_at", "started_at", "finished_at")
MAX_LISTED_MATCHES = 10  # jobs named in an ambiguous-name error (service.get_job uses it too)

_QUERIES = {
    "?": {
        "by_id": "SELECT id, name, status, model, total, pending, running, succeeded, failed, cancelled, "
                 "prompt_tokens, completion_tokens, cached_tokens, created_at, started_at, finished_at FROM jobs "
                 "WHERE id = ?",
        "by_name": "SELECT id, name, status, model, total, pending, running, succeeded, failed, cancelled, "
                   "prompt_tokens, completion_tokens, cached_tokens, created_at, started_at, finished_at FROM jobs "
                   "WHERE name = ? ORDER BY created_at DESC LIMIT ?",
        "recent": "SELECT id, name, status, model, total, pending, running, succeeded, failed, cancelled, "
                  "prompt_tokens, completion_tokens, cached_tokens, created_at, started_at, finished_at FROM jobs "
                  "ORDER BY created_at DESC LIMIT ?",
    },
    "%s": {
        "by_id": "SELECT id, name, status, model, total, pending, running, succeeded, failed, cancelled, "
                 "prompt_tokens, completion_tokens, cached_tokens, created_at, started_at, finished_at FROM jobs "
                 "WHERE id = %s",
        "by_name": "SELECT id, name, status, model, total, pending, running, succeeded, failed, cancelled, "
                   "prompt_tokens, completion_tokens, cached_tokens, created_at, started_at, finished_at FROM jobs "
                   "WHERE name = %s ORDER BY created_at DESC LIMIT %s",
        "recent": "SELECT id, name, status, model, total, pending, running, succeeded, failed, cancelled, "
                  "prompt_tokens, completion_tokens, cached_tokens, created_at, started_at, finished_at FROM jobs "
                  "ORDER BY created_at DESC LIMIT %s",
    },
}
# The models of live workers (workers.list_workers), by the database's clock.
_QUERIES["?"]["served"] = ("SELECT model, count(*) FROM workers WHERE last_seen >= "
                           "strftime('%Y-%m-%d %H:%M:%f', 'now', ?) || '000' GROUP BY model ORDER BY model")
_QUERIES["%s"]["served"] = ("SELECT model, count(*) FROM workers WHERE last_seen >= now() - make_interval(secs => %s) "
                            "GROUP BY model ORDER BY model")


class _Reader:
    def __init__(self, conn, placeholder: str, sqlite: bool):
        self.conn, self.ph, self.sqlite = conn, placeholder, sqlite

    def rows(self, query: str, args: tuple) -> list[dict]:
        cur = self.conn.cursor()
        try:
            cur.execute(_QUERIES[self.ph][query], args)
            return [self._summary(row) for row in cur.fetchall()]
        finally:
            cur.close()

    def plain(self, query: str, args: tuple) -> list[tuple]:
        cur = self.conn.cursor()
        try:
            cur.execute(_QUERIES[self.ph][query], args)
            return [tuple(r) for r in cur.fetchall()]
        finally:
            cur.close()

    def _summary(self, row) -> dict:
        out = dict(zip(COLUMNS, row))
        for key in TIMES:
            value = out[key]
            if value is None:
                continue
            if self.sqlite:  # stored as naive UTC text: tag it, as models.UTCDateTime does
                value = datetime.fromisoformat(value).replace(tzinfo=timezone.utc)
            elif value.tzinfo is None:
                value = value.replace(tzinfo=timezone.utc)
            out[key] = value.isoformat()
        return out


def _connect(url: str) -> _Reader | None:
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        # A new file, in-memory or URI-option database is the full path's to create or interpret.
        if not path or "?" in path or path == ":memory:" or not os.path.isfile(os.path.expanduser(path)):
            return None
        import sqlite3

        conn = sqlite3.connect(os.path.expanduser(path), timeout=30)  # busy timeout, as db.py sets
        return _Reader(conn, "?", sqlite=True)
    if url.startswith("postgresql+psycopg://"):
        import psycopg

        # A libpq URI takes the same user, password, host, port, database and query options.
        conn = psycopg.connect("postgresql://" + url[len("postgresql+psycopg://"):], autocommit=True)
        return _Reader(conn, "%s", sqlite=False)
    return None


def _read(url: str, fn):
    try:
        reader = _connect(url)
        if reader is None:
            return None
        try:
            return fn(reader)
        finally:
            reader.conn.close()
    except (JobNotFound, AmbiguousJob):
        raise
    except Exception:  # no such table yet, an unreachable server, an option libpq refuses: the full path
        return None


def job_summary(url: str, ref: str) -> dict | None:
    """service.job_summary(service.get_job(ref)); None when only the full path can tell."""

    def find(r: _Reader) -> dict:
        by_id = r.rows("by_id", (ref,))
        if by_id:
            return by_id[0]
        named = r.rows("by_name", (ref, MAX_LISTED_MATCHES + 1))
        if not named:
            raise JobNotFound(ref)
        if len(named) > 1:
            raise AmbiguousJob(ref, [(j["id"], j["status"], j["created_at"]) for j in named])
        return named[0]

    return _read(url, find)


def recent_jobs(url: str, limit: int) -> list[dict] | None:
    """[service.job_summary(j) for j in service.list_jobs(limit)]; None when only the full path can tell."""
    return _read(url, lambda r: r.rows("recent", (int(limit),)))


def served_models(url: str, live_seconds: int) -> dict[str, int] | None:
    """{model: live workers holding it}, as workers.list_workers counts them; None when only the full path can tell."""

    def read(r: _Reader) -> dict[str, int]:
        arg = f"-{int(live_seconds)} seconds" if r.sqlite else int(live_seconds)
        return dict(r.plain("served", (arg,)))

    return _read(url, read)
