"""The Celery task and the worker process around it: model loading at start, routing by model."""

from __future__ import annotations

import base64
import json

import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import select

from llmbatch.jobs.cli import cli
from llmbatch.jobs.db import Database
from llmbatch.jobs.models import Chunk, ChunkStatus, Item, ItemStatus
from llmbatch.worker.app import queue_name
from tests.support import start_worker, stop_worker, write_jsonl


def _submit(db_url, broker_url, path, *args):
    result = CliRunner().invoke(cli, ["--database-url", db_url, "--broker-url", broker_url, "submit", str(path), *args],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


@pytest.mark.slow
def test_a_worker_that_cannot_load_its_model_exits_with_one_clear_error_before_taking_work(
        sqlite_url, broker_url, tmp_path):
    job_id = _submit(sqlite_url, broker_url, write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}]),
                     "--model", "/nonexistent")
    log = tmp_path / "w.log"
    proc = start_worker(sqlite_url, broker_url, log, "--model", "/nonexistent")
    try:
        proc.wait(120)
    except Exception:
        stop_worker(proc)
        pytest.fail(f"the worker kept running:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert proc.returncode == 1, text[-3000:]
    errors = [line for line in text.splitlines() if "cannot load model '/nonexistent'" in line]
    assert len(errors) == 1 and errors[0].startswith("Error: "), text[-3000:]
    assert "Traceback" not in text
    db = Database(sqlite_url)
    with db.read() as s:
        chunk = s.scalars(select(Chunk).where(Chunk.job_id == job_id)).one()
    db.dispose()
    assert chunk.status is ChunkStatus.pending and chunk.attempts == 0  # it never took the message
    assert redis.Redis.from_url(broker_url).llen(queue_name("/nonexistent")) == 1


def test_a_message_for_another_model_is_moved_to_that_models_queue_and_not_run(
        sqlite_url, quiet_broker_url, tmp_path, monkeypatch):
    from llmbatch.worker import app as celery_app
    from llmbatch.worker import tasks

    job_id = _submit(sqlite_url, quiet_broker_url, write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a b c"}]),
                     "--model", "org/other-model")
    client = redis.Redis.from_url(quiet_broker_url)
    client.delete(queue_name("org/other-model"))
    monkeypatch.setattr(celery_app.app.conf, "broker_url", quiet_broker_url)
    monkeypatch.setenv("LLMBATCH_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("LLMBATCH_MODEL", "org/this-model")
    monkeypatch.setenv("LLMBATCH_ENGINE", "echo")
    for cached in (tasks.settings, tasks.database, tasks.engine):
        cached.cache_clear()
    try:
        db = Database(sqlite_url)
        with db.read() as s:
            chunk_id = s.scalars(select(Chunk.id).where(Chunk.job_id == job_id)).one()
        tasks.run_chunk.run(job_id, chunk_id)  # delivered to a worker that holds another model
        with db.read() as s:
            chunk = s.get(Chunk, chunk_id)
            items = s.scalars(select(Item).where(Item.job_id == job_id)).all()
        db.dispose()
    finally:
        for cached in (tasks.settings, tasks.database, tasks.engine):
            cached.cache_clear()
    assert chunk.status is ChunkStatus.pending and chunk.attempts == 0
    assert [i.status for i in items] == [ItemStatus.pending]
    moved = [json.loads(base64.b64decode(json.loads(m)["body"])) for m in client.lrange(queue_name("org/other-model"), 0, -1)]
    assert [args for args, _kwargs, _embed in moved] == [[job_id, chunk_id]]
    assert client.llen(queue_name("org/this-model")) == 0
