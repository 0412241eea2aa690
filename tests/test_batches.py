"""jobs/batches.py: creating a batch, parsing it off the request path exactly once, and its OpenAI view."""

from __future__ import annotations

import pytest
from openai.types import Batch as OpenAIBatch
from sqlalchemy import func, select, text

from llmbatch.jobs import batches, files
from llmbatch.jobs.exceptions import InvalidRequest, JobNotFound
from llmbatch.jobs.models import Item, Job, JobStatus
from llmbatch.jobs.settings import Settings


@pytest.fixture
def api_settings(db_url, quiet_broker_url, tmp_path):
    return Settings.from_env(database_url=db_url, broker_url=quiet_broker_url, files_dir=tmp_path / "files",
                             chunk_size=2)


def new_batch(db, settings, content: bytes, owner=None) -> str:
    up = files.Upload(settings)
    up.write(content)
    with db.write() as s:
        f = up.commit(s, filename="in.jsonl", purpose="batch", owner=owner)
        return batches.create_batch(s, settings, input_file_id=f.id, endpoint="/v1/completions",
                                    completion_window="24h", metadata={"k": "v"}, model="m", owner=owner).id


LINES = b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n'


def items(db, job_id) -> int:
    with db.read() as s:
        return s.scalar(select(func.count()).select_from(Item).where(Item.job_id == job_id))


def view(db, job_id) -> dict:
    with db.read() as s:
        obj = batches.batch_object(batches.get_batch(s, job_id, None))
    OpenAIBatch.model_validate(obj)  # the SDK's own type accepts it
    return obj


def test_parsed_once(db, api_settings):
    job_id = new_batch(db, api_settings, LINES)
    assert view(db, job_id)["status"] == "validating"
    assert batches.ingest(db, api_settings, job_id) == "parsed"
    assert batches.ingest(db, api_settings, job_id) == "done"
    obj = view(db, job_id)
    assert obj["status"] == "in_progress" and obj["request_counts"] == {"total": 3, "completed": 0, "failed": 1}
    assert items(db, job_id) == 3


def test_a_parse_cut_short_stores_nothing_and_runs_again(db, api_settings, monkeypatch):
    """What a server dying mid-parse leaves: the transaction rolls back, the batch is still validating."""
    job_id = new_batch(db, api_settings, LINES)

    def die(*_a, **_k):
        raise RuntimeError("killed mid-parse")

    with monkeypatch.context() as m:
        m.setattr(batches.work, "finish_job_if_done", die)  # after every item was written
        with pytest.raises(RuntimeError):
            batches.ingest(db, api_settings, job_id)
    assert items(db, job_id) == 0 and view(db, job_id)["status"] == "validating"
    with db.read() as s:
        assert batches.validating_batches(s) == [job_id]  # what the sweep takes up again
    assert batches.ingest(db, api_settings, job_id) == "parsed" and items(db, job_id) == 3


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_batch_being_parsed_elsewhere_is_left_alone(db, api_settings):
    job_id = new_batch(db, api_settings, LINES)
    with db.engine.connect() as other:  # another server's parse holds the batch row
        other.execute(text("SELECT job_id FROM batches WHERE job_id = :j FOR UPDATE"), {"j": job_id})
        assert batches.ingest(db, api_settings, job_id) == "busy"
        other.rollback()  # it died: its lock went with it
    assert batches.ingest(db, api_settings, job_id) == "parsed"


def test_cancelled_while_validating(db, api_settings):
    job_id = new_batch(db, api_settings, LINES)
    with db.write() as s:
        batches.cancel_batch(s, job_id, None)
    assert batches.ingest(db, api_settings, job_id) == "done"
    assert view(db, job_id)["status"] == "cancelled" and items(db, job_id) == 0


def test_unusable_file_fails_the_batch(db, api_settings):
    job_id = new_batch(db, api_settings, b"\n\n")  # blank lines only
    job_id_2 = new_batch(db, api_settings, b"a,b\n1,2\n3,4\n5,6\n7,8\n9,10\n")
    for j, reason in ((job_id, "empty"), (job_id_2, "does not look like JSONL")):
        assert batches.ingest(db, api_settings, j) == "failed"
        obj = view(db, j)
        assert obj["status"] == "failed" and reason in obj["errors"]["data"][0]["message"]
    with db.read() as s:
        assert s.get(Job, job_id).status is JobStatus.failed


def test_owners_and_request_checks(db, api_settings):
    job_id = new_batch(db, api_settings, LINES, owner="a" * 64)
    with db.read() as s:
        assert batches.get_batch(s, job_id, "a" * 64).job.id == job_id
        with pytest.raises(JobNotFound):
            batches.get_batch(s, job_id, "b" * 64)
        assert batches.list_batches(s, "b" * 64) == ([], False)
    with db.write() as s, pytest.raises(InvalidRequest, match="metadata"):
        batches.create_batch(s, api_settings, input_file_id="x", endpoint="/v1/completions",
                             completion_window="24h", metadata={"k": 1}, model=None, owner=None)
