"""The driver-only read path of `status`: the same summaries as the service, without SQLAlchemy."""

import json
import os
import subprocess
import sys

import pytest

from llmbatch.jobs import quickread, service, work
from llmbatch.jobs.exceptions import AmbiguousJob, JobNotFound
from tests.support import write_jsonl


def _submit(db, settings, tmp_path, name=None, n=3):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": str(i)} for i in range(n)])
    with db.write() as s, open(path, "rb") as fp:
        return service.submit(s, fp, settings, name=name)


def _summaries(db, ref=None, limit=20):
    with db.read() as s:
        if ref is None:
            return [service.job_summary(j) for j in service.list_jobs(s, limit)]
        return service.job_summary(service.get_job(s, ref))


def test_same_summaries_as_the_service(db, db_url, settings, tmp_path):
    first = _submit(db, settings, tmp_path, name="nightly")
    second = _submit(db, settings, tmp_path)
    with db.write() as s:  # started_at set, counters moved
        work.claim_chunk(s, first.chunk_ids[0], "w", 30)
    with db.write() as s:
        service.cancel(s, second.job.id)  # finished_at set
    for ref in (first.job.id, "nightly", second.job.id):
        assert quickread.job_summary(db_url, ref) == _summaries(db, ref)
    assert quickread.job_summary(db_url, first.job.id)["started_at"] is not None
    assert quickread.recent_jobs(db_url, 20) == _summaries(db)
    assert quickread.recent_jobs(db_url, 1) == _summaries(db, limit=1)


def test_unknown_and_ambiguous_references(db, db_url, settings, tmp_path):
    a = _submit(db, settings, tmp_path, name="twice")
    b = _submit(db, settings, tmp_path, name="twice")
    with pytest.raises(JobNotFound):
        quickread.job_summary(db_url, "job_nope")
    with pytest.raises(AmbiguousJob) as exc:
        quickread.job_summary(db_url, "twice")
    assert a.job.id in str(exc.value) and b.job.id in str(exc.value)


def test_what_it_cannot_read_is_left_to_the_full_path(tmp_path, pg_url):
    assert quickread.job_summary(f"sqlite:///{tmp_path / 'missing.db'}", "x") is None
    assert not (tmp_path / "missing.db").exists()  # never creates a database
    assert quickread.recent_jobs("sqlite://", 5) is None
    assert quickread.recent_jobs(pg_url, 5) is None  # a blank schema: no jobs table yet
    assert quickread.recent_jobs("mysql://u@localhost/db", 5) is None


def test_status_command_reads_without_sqlalchemy(db, db_url, settings, tmp_path):
    job = _submit(db, settings, tmp_path, name="quick").job
    for args, expected in ((["status", "quick", "--json"], _summaries(db, job.id)),
                           (["status", "--json"], _summaries(db))):
        run = subprocess.run([sys.executable, "-X", "importtime", "-m", "llmbatch.jobs.cli", "--database-url", db_url,
                              *args], capture_output=True, text=True, env={**os.environ}, timeout=60)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout) == expected
        imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if "|" in line}
        assert not {m for m in imported if m.split(".")[0] in ("sqlalchemy", "alembic", "celery")}, run.stderr[-2000:]


def test_one_definition_of_a_summary_feeds_both_paths(db, settings, tmp_path, monkeypatch):
    """quickread.COLUMNS is the summary's one definition: the service's summary is built from it, and
    every driver's literal statement selects exactly those columns, in that order."""
    out = _submit(db, settings, tmp_path)
    with db.read() as s:
        assert tuple(service.job_summary(service.get_job(s, out.job.id))) == quickread.COLUMNS
    select_ = "SELECT " + ", ".join(quickread.COLUMNS) + " FROM jobs"
    for ph in ("?", "%s"):
        sql = quickread._QUERIES[ph]
        assert all(sql[q].startswith(select_ + " ") for q in ("by_id", "by_name", "recent"))
        assert sql["by_id"].endswith(f"WHERE id = {ph}") and sql["recent"].endswith(f"LIMIT {ph}")
    monkeypatch.setattr(quickread, "COLUMNS", quickread.COLUMNS + ("owner",))
    with db.read() as s:
        assert service.job_summary(service.get_job(s, out.job.id))["owner"] is None
    select_ = "SELECT " + ", ".join(quickread.COLUMNS) + " FROM jobs"
    assert not quickread._QUERIES["?"]["by_id"].startswith(select_)  # a column added only there is caught
