"""Correctness at scale (10,000 lines) on SQLite and PostgreSQL: the bulk submit and streamed export.

Timing belongs to benchmarks/scale.py; these tests check counts, order and content only.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, event, func, select, update

from llmbatch.jobs import cli as cli_module
from llmbatch.jobs import export, service, work
from llmbatch.jobs.cli import cli
from llmbatch.jobs.exceptions import InputFileError
from llmbatch.jobs.models import Chunk, Item, ItemStatus, Job, JobStatus
from tests import export_reference
from tests.support import write_jsonl

N = 10_000
BAD_EVERY = 997  # lines 997, 1994, ... are invalid JSON
CHUNK = 100


def _lines(n: int = N, seed: int = 5) -> list:
    """The three line forms, per-line parameters, default ids, text that needs escaping, some bad lines."""
    rng = random.Random(seed)
    out: list = []
    for i in range(1, n + 1):
        if i % BAD_EVERY == 0:
            out.append('{"custom_id": "broken-%d", "prompt": ' % i)
            continue
        cid = f"c{i:05d}" if i % 11 else None  # every 11th line: the default id, line-N
        text = f"prompt {i} " + rng.choice(["plain", "naïve café", "東京", 'with "quotes"', "=1+1", "a,b\nc"])
        kind = i % 4
        if kind == 0:
            obj = {"prompt": text}
        elif kind == 1:
            obj = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]}
        elif kind == 2:
            obj = {"method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}],
                            "max_tokens": 32}}
        else:
            obj = {"method": "POST", "url": "/v1/completions",
                   "body": {"model": "text-model", "prompt": text, "temperature": 0}}
        if i % 7 == 0 and kind != 2:
            obj["max_tokens"] = 16
        if cid:
            obj = {"custom_id": cid, **obj}
        out.append(obj)
    return out


def _expected_ids(lines: list) -> list[str]:
    ids = []
    for n, line in enumerate(lines, 1):
        ids.append(line["custom_id"] if isinstance(line, dict) and "custom_id" in line else f"line-{n}")
    return ids


def _output(line: int) -> str:
    # Outputs a CSV must quote or escape, and JSON must escape.
    return ["ok {}", "-{} starts with a minus", "two\nlines {}", 'quote " {}', "日本語 {}"][line % 5].format(line)


@pytest.fixture
def big(db, settings, tmp_path):
    """A 10,000-line job, submitted, then every good item run through the worker's own transitions."""
    settings = dataclasses.replace(settings, chunk_size=CHUNK)
    lines = _lines()
    path = write_jsonl(tmp_path / "big.jsonl", lines)
    with db.write() as s, open(path, "rb") as fp:
        out = service.submit(s, fp, settings, params={"max_tokens": 64})
    return db, settings, lines, out, path


def _finish_all(db, out) -> None:
    for chunk_id in out.chunk_ids:
        with db.write() as s:
            chunk = work.claim_chunk(s, chunk_id, "w1", 60)
            items = work.running_items(s, chunk_id)
            results = [work.ItemResult(item_id=i.id, status=ItemStatus.succeeded, output=_output(i.line),
                                       finish_reason="length" if i.line % 3 else "stop",
                                       prompt_tokens=10 + i.line % 5, completion_tokens=1 + i.line % 9,
                                       started_at=i.started_at, finished_at=i.started_at)
                       for i in items]
            assert work.record_results(s, chunk, "w1", results, 60)
            work.finish_chunk(s, chunk, "w1")


def _aggregates(s, job_id: str) -> dict:
    counts = {st.value: 0 for st in ItemStatus}
    for status, n in s.execute(select(Item.status, func.count()).where(Item.job_id == job_id).group_by(Item.status)):
        counts[ItemStatus(status).value] = n
    return counts


def _export(db, job, fmt, only=None) -> tuple[int, str]:
    buf = io.StringIO(newline="")
    with db.read() as s:
        n = export.export(s, job, buf, fmt, only)
    return n, buf.getvalue()


def _reference(db, job, fmt, only=None) -> str:
    """The export as the ORM-based renderer writes it: the fast path must write exactly this."""
    with db.read() as s:
        return "".join(export_reference.render(export_reference.iter_items(s, job.id, only), fmt, job))


def test_submit_stores_10k_lines_with_counters_equal_to_the_items(big):
    db, settings, lines, out, _path = big
    n_bad = N // BAD_EVERY
    good = N - n_bad
    assert out.bad_lines == n_bad
    assert len(out.chunk_ids) == -(-good // CHUNK) and out.chunk_ids == sorted(out.chunk_ids)
    with db.read() as s:
        job = s.get(Job, out.job.id)
        assert (job.total, job.pending, job.failed, job.running, job.succeeded) == (N, good, n_bad, 0, 0)
        assert _aggregates(s, job.id) == {"pending": good, "running": 0, "succeeded": 0, "failed": n_bad,
                                          "cancelled": 0}
        chunks = s.execute(select(Chunk.id, Chunk.seq, Chunk.size).where(Chunk.job_id == job.id)
                           .order_by(Chunk.seq)).all()
        assert [c.id for c in chunks] == out.chunk_ids and [c.seq for c in chunks] == list(range(len(chunks)))
        per_chunk = dict(s.execute(select(Item.chunk_id, func.count()).where(Item.job_id == job.id)
                                   .group_by(Item.chunk_id)).all())
        assert all(per_chunk[c.id] == c.size for c in chunks) and sum(c.size for c in chunks) == good
        assert per_chunk[None] == n_bad  # bad lines belong to no chunk
        rows = s.execute(select(Item.line, Item.custom_id, Item.chunk_id, Item.status, Item.request,
                                Item.queued_at, Item.error_code).where(Item.job_id == job.id)
                         .order_by(Item.line)).all()
    # One row per line, each with what the parser made of it.
    assert [r.line for r in rows] == list(range(1, N + 1))
    assert [r.custom_id for r in rows] == _expected_ids(lines)
    assert all(r.queued_at == rows[0].queued_at and r.queued_at.tzinfo is not None for r in rows)
    chunk_of_line = [r.chunk_id for r in rows if r.status is ItemStatus.pending]
    assert chunk_of_line == sorted(chunk_of_line)  # chunks take consecutive good lines
    for r in rows:
        line = lines[r.line - 1]
        if isinstance(line, str):
            assert r.status is ItemStatus.failed and r.error_code == "invalid_input" and r.request is None
            continue
        assert r.status is ItemStatus.pending and r.error_code is None
        if "body" in line:
            assert r.request["url"] == line["url"] and r.request["body_model"] == line["body"]["model"]
        else:
            key = "prompt" if "prompt" in line else "messages"
            assert r.request[key] == line[key]
        if "max_tokens" in line:
            assert r.request["params"]["max_tokens"] == 16


def test_export_of_10k_results_is_complete_in_order_and_matches_the_reference(big):
    db, settings, lines, out, _path = big
    _finish_all(db, out)
    ids = _expected_ids(lines)
    with db.read() as s:
        job = s.get(Job, out.job.id)
        assert job.status is JobStatus.completed
        assert job.counts() == _aggregates(s, job.id)  # counters kept in step through every transition
        assert job.prompt_tokens == s.scalar(select(func.sum(Item.prompt_tokens)).where(Item.job_id == job.id))

    n, text = _export(db, job, "jsonl")
    rows = [json.loads(x) for x in text.splitlines()]
    assert n == len(rows) == N
    assert [r["line"] for r in rows] == list(range(1, N + 1))
    assert [r["custom_id"] for r in rows] == ids
    for r in rows:
        if isinstance(lines[r["line"] - 1], str):
            assert r["status"] == "failed" and r["output"] is None and r["error"]["code"] == "invalid_input"
        else:
            assert r["status"] == "succeeded" and r["output"] == _output(r["line"]) and r["error"] is None
            assert r["finished_at"].endswith("+00:00") and r["worker"] == "w1"
    assert text == _reference(db, job, "jsonl")

    n, text = _export(db, job, "openai")
    rows = [json.loads(x) for x in text.splitlines()]
    assert n == len(rows) == N and [r["custom_id"] for r in rows] == ids
    for line, r in zip(lines, rows):
        if isinstance(line, str):
            assert r["response"] is None and r["error"]["code"] == "invalid_input"
            continue
        body = r["response"]["body"]
        if line.get("url") == "/v1/completions" or "prompt" in line:
            assert body["object"] == "text_completion" and body["choices"][0]["text"].startswith(
                _output(int(r["id"].rsplit("_", 1)[1]))[:2])
        else:
            assert body["object"] == "chat.completion"
        assert body["model"] == job.model  # the model that ran, never the line's own (issue 20)
    assert text == _reference(db, job, "openai")

    n, text = _export(db, job, "csv")
    table = list(csv.reader(io.StringIO(text, newline="")))
    assert n == N and table[0] == list(export.CSV_COLUMNS) and len(table) == N + 1
    assert [int(r[1]) for r in table[1:]] == list(range(1, N + 1))
    assert [r[0] for r in table[1:]] == ids
    for r in table[1:]:
        if r[2] == "succeeded":
            expected = _output(int(r[1]))
            assert r[3] == ("'" + expected if expected.startswith("-") else expected)
    assert text == _reference(db, job, "csv")

    # --only, and the CLI writing a file through the same path.
    n, text = _export(db, job, "jsonl", only="failed")
    assert n == N // BAD_EVERY and text == _reference(db, job, "jsonl", only="failed")
    target = _path.with_name("out.jsonl")
    result = CliRunner().invoke(cli, ["--database-url", db.url, "export", job.id, "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_text(encoding="utf-8") == _reference(db, job, "jsonl")


def test_export_renders_every_state_like_the_reference(db, settings, tmp_path):
    """Failed, cancelled, pending and succeeded items, with errors, token counts and odd text."""
    settings = dataclasses.replace(settings, chunk_size=50)
    path = write_jsonl(tmp_path / "in.jsonl", _lines(400))
    with db.write() as s, open(path, "rb") as fp:
        out = service.submit(s, fp, settings)
    with db.write() as s:  # first chunk: half succeeded, half failed by the worker
        chunk = work.claim_chunk(s, out.chunk_ids[0], "w", 60)
        items = work.running_items(s, chunk.id)
        results = [work.ItemResult(item_id=i.id, status=ItemStatus.succeeded if i.line % 2 else ItemStatus.failed,
                                   output=_output(i.line) if i.line % 2 else None,
                                   finish_reason="stop" if i.line % 2 else None,
                                   prompt_tokens=3, completion_tokens=4 if i.line % 2 else 0,
                                   started_at=i.started_at, finished_at=i.started_at,
                                   error_code=None if i.line % 2 else "engine_error",
                                   error_message=None if i.line % 2 else "@boom, \"quoted\" ünïcode",
                                   warning="=max_tokens cut, \"ü\"" if i.line % 4 == 1 else None)
                   for i in items]
        work.record_results(s, chunk, "w", results, 60)
    with db.write() as s:  # second chunk claimed and left running; the rest cancelled
        work.claim_chunk(s, out.chunk_ids[1], "w", 60)
        service.cancel(s, out.job.id)
    with db.read() as s:
        job = s.get(Job, out.job.id)
        assert job.counts() == _aggregates(s, job.id)
    for fmt in export.FORMATS:
        for only in (None, "succeeded", "failed", "cancelled", "pending", "running"):
            n, text = _export(db, job, fmt, only)
            assert text == _reference(db, job, fmt, only), (fmt, only)


def test_strict_failure_at_line_9000_leaves_nothing_behind(db, settings, tmp_path):
    lines = [{"custom_id": f"s{i}", "prompt": f"p{i}"} for i in range(1, N + 1)]
    lines[8999] = {"custom_id": "s9000", "prompt": "x", "temperature": "hot"}
    path = write_jsonl(tmp_path / "strict.jsonl", lines)
    small = dataclasses.replace(settings, chunk_size=CHUNK)
    with pytest.raises(InputFileError, match="1 bad line") as err:
        with db.write() as s, open(path, "rb") as fp:
            service.submit(s, fp, small, strict=True)
    assert "line 9000:" in str(err.value)
    # Through the CLI too; the broker is never reached (a dead address would fail the enqueue).
    result = CliRunner().invoke(cli, ["--database-url", db.url, "--broker-url", "redis://127.0.0.1:1/0",
                                      "submit", str(path), "--strict"], env={"LLMBATCH_CHUNK_SIZE": "100"})
    assert result.exit_code == 1 and "line 9000:" in result.stderr and "nothing was stored" in result.stderr
    assert result.stdout == ""
    with db.read() as s:
        for table in (Job, Chunk, Item):
            assert s.scalar(select(func.count()).select_from(table)) == 0, table


def test_status_reads_the_job_row_and_never_the_items(big):
    db, settings, lines, out, _path = big
    job_id = out.job.id
    # Counters are what status reports: skew one on purpose, and status shows the skewed value.
    with db.write() as s:
        s.execute(update(Job).where(Job.id == job_id).values(pending=Job.pending + 1000))
    statements: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement.lower())

    # status reads through the DB-API driver first (quickread.py), SQLAlchemy when that cannot tell.
    from llmbatch.jobs import quickread

    real_rows = quickread._Reader.rows

    def rows(self, query, args):
        statements.append(quickread._QUERIES[self.ph][query].lower())
        return real_rows(self, query, args)

    event.listen(Engine, "before_cursor_execute", seen)
    quickread._Reader.rows = rows
    try:
        result = CliRunner().invoke(cli, ["--database-url", db.url, "status", job_id, "--json"])
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
        quickread._Reader.rows = real_rows
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["pending"] == N - N // BAD_EVERY + 1000 and summary["total"] == N
    assert not [q for q in statements if "items" in q], statements
    assert any("from jobs" in q for q in statements)


def test_submit_shows_progress_on_stderr_and_prints_only_the_id(db_url, broker_url, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "in.jsonl", _lines(3000))
    monkeypatch.setattr(cli_module, "PROGRESS_MIN_BYTES", 1024)  # this file counts as large
    result = CliRunner().invoke(cli, ["--database-url", db_url, "--broker-url", broker_url, "submit", str(path)],
                                env={"LLMBATCH_CHUNK_SIZE": "500"})
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().startswith("job_") and result.stdout.count("\n") == 1
    size = path.stat().st_size
    assert f"{size}/{size} bytes" in result.stderr and "[########################]" in result.stderr
    assert "3 bad line(s)" in result.stderr
