"""The recovery sweep against real Redis, SQLite and PostgreSQL."""

from datetime import timedelta

from sqlalchemy import update

from llmbatch.jobs import service, work
from llmbatch.jobs.models import Chunk, Job, JobStatus, utcnow
from llmbatch.worker import app as celery_app
from llmbatch.worker.recovery import sweep
from tests.support import write_jsonl


def test_a_cancelling_job_whose_released_chunk_never_reached_the_broker_still_finishes(db, settings, tmp_path,
                                                                                       quiet_broker_url, monkeypatch):
    monkeypatch.setattr(celery_app.app.conf, "broker_url", quiet_broker_url)
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(8)])
    with db.write() as s, open(path, "rb") as fp:
        out = service.submit(s, fp, settings)
    with db.write() as s:
        work.claim_chunk(s, out.chunk_ids[0], "dead", 30)
    with db.write() as s:
        service.cancel(s, out.job.id)
    with db.write() as s:  # the holder died; a sweep released its chunk, and publishing it failed
        s.execute(update(Chunk).where(Chunk.id == out.chunk_ids[0]).values(lease_until=utcnow() - timedelta(seconds=1)))
        work.release_stale_chunks(s)
    with db.read() as s:
        assert s.get(Job, out.job.id).status is JobStatus.cancelling
    sweep(db, lease_seconds=30)
    with db.read() as s:
        job = s.get(Job, out.job.id)
    assert job.status is JobStatus.cancelled and (job.cancelled, job.running, job.pending) == (8, 0, 0)
