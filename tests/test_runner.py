"""run_chunk, the code shared by the Celery task and `llmbatch run`, with the echo engine."""

from sqlalchemy import select

from llmbatch.jobs import service, work
from llmbatch.jobs.models import Chunk, ChunkStatus, Item, ItemStatus, Job, JobStatus
from tests.support import write_jsonl
from llmbatch.worker.echo import EchoEngine
from llmbatch.worker.engine import EngineConfig
from llmbatch.worker.runner import run_chunk


def _submit(db, settings, tmp_path, n):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"word {i} more words", "max_tokens": 2} for i in range(n)])
    with db.write() as s, open(path, "rb") as fp:
        return service.submit(s, fp, settings)


def test_a_chunk_runs_to_done_and_completes_its_job(db, settings, tmp_path):
    out = _submit(db, settings, tmp_path, 4)
    outcome = run_chunk(db, EchoEngine(), out.chunk_ids[0], "w", 30)
    assert outcome.claimed and outcome.done == 4 and not outcome.lost
    with db.read() as s:
        assert s.get(Chunk, out.chunk_ids[0]).status is ChunkStatus.done
        job = s.get(Job, out.job.id)
        outputs = s.scalars(select(Item.output).where(Item.job_id == job.id).order_by(Item.line)).all()
    assert job.status is JobStatus.completed and job.succeeded == 4
    assert outputs == ["word 0", "word 1", "word 2", "word 3"]  # max_tokens=2 words


def test_a_chunk_held_by_a_live_worker_is_skipped(db, settings, tmp_path):
    out = _submit(db, settings, tmp_path, 4)
    with db.write() as s:
        work.claim_chunk(s, out.chunk_ids[0], "other", 30)
    assert not run_chunk(db, EchoEngine(), out.chunk_ids[0], "w", 30).claimed


class CancelAfterFirstBatch(EchoEngine):
    """Cancels the job while its first micro-batch is being written."""

    batch_size = 2

    def __init__(self, db, job_id):
        self.db, self.job_id = db, job_id

    def generate(self, requests, more=None):
        for i, batch in enumerate(super().generate(requests, more)):
            if i == 0:
                with self.db.write() as s:
                    service.cancel(s, self.job_id)
            yield batch


def test_cancel_stops_the_chunk_after_the_micro_batch_in_flight(db, settings, tmp_path):
    out = _submit(db, settings, tmp_path, 4)  # one chunk of 4 (chunk_size=4), micro-batches of 2
    outcome = run_chunk(db, CancelAfterFirstBatch(db, out.job.id), out.chunk_ids[0], "w", 30)
    assert outcome.done == 2
    with db.read() as s:
        job = s.get(Job, out.job.id)
        states = s.scalars(select(Item.status).where(Item.job_id == job.id).order_by(Item.line)).all()
    assert states == [ItemStatus.succeeded] * 2 + [ItemStatus.cancelled] * 2
    assert job.status is JobStatus.cancelled and (job.succeeded, job.cancelled, job.running) == (2, 2, 0)


class LoseLeaseAfterFirstBatch(EchoEngine):
    """Another worker takes the chunk over (our lease lapsed) while the first micro-batch runs."""

    batch_size = 2

    def __init__(self, db, chunk_id):
        self.db, self.chunk_id = db, chunk_id

    def generate(self, requests, more=None):
        for i, batch in enumerate(super().generate(requests, more)):
            if i == 1:
                with self.db.write() as s:
                    s.execute(Chunk.__table__.update().where(Chunk.id == self.chunk_id).values(worker="thief"))
            yield batch


def test_a_worker_that_lost_its_lease_writes_nothing_more(db, settings, tmp_path):
    out = _submit(db, settings, tmp_path, 4)
    outcome = run_chunk(db, LoseLeaseAfterFirstBatch(db, out.chunk_ids[0]), out.chunk_ids[0], "w", 30)
    assert outcome.lost and outcome.done == 2
    with db.read() as s:
        states = s.scalars(select(Item.status).where(Item.job_id == out.job.id).order_by(Item.line)).all()
    assert states == [ItemStatus.succeeded] * 2 + [ItemStatus.running] * 2  # left for the new holder


def test_the_next_chunk_starts_before_the_last_item_of_the_previous_one_finishes(db, settings, tmp_path, engine):
    """Chunk pipelining, with the real model: chunk 2 is claimed and fed in while chunk 1's long
    item still decodes; its own message later finds it done."""
    from llmbatch.worker.engine.engine import Engine

    lines = [{"prompt": "1, 2, 3, 4, 5,", "max_tokens": 40}] + [{"prompt": f"Item {i}:", "max_tokens": 3}
                                                                 for i in range(1, 8)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    with db.write() as s, open(path, "rb") as fp:
        out = service.submit(s, fp, settings)  # chunk_size=4: two chunks
    assert len(out.chunk_ids) == 2
    eng = Engine(EngineConfig(model=engine.config.model, flush_seconds=0.0),
                 loaded=(engine.model, engine.tokenizer, engine.device, engine.dtype))
    outcome = run_chunk(db, eng, out.chunk_ids[0], "w", 30)
    assert outcome.claimed and outcome.done == 8
    with db.read() as s:
        items = s.scalars(select(Item).where(Item.job_id == out.job.id).order_by(Item.line)).all()
        chunks = [s.get(Chunk, c).status for c in out.chunk_ids]
    assert chunks == [ChunkStatus.done, ChunkStatus.done]
    assert all(i.status is ItemStatus.succeeded for i in items)
    first, second = items[:4], items[4:]
    assert first[0].completion_tokens > max(i.completion_tokens for i in second)  # the long item
    assert min(i.started_at for i in second) < max(i.finished_at for i in first)
    assert not run_chunk(db, eng, out.chunk_ids[1], "w2", 30).claimed  # its message is a no-op now


class Crashes(EchoEngine):
    """An engine that fails the whole chunk every time (a poison chunk)."""

    def generate(self, requests, more=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
        yield  # pragma: no cover - makes this a generator


def test_a_chunk_that_keeps_failing_is_given_up_after_max_attempts(db, settings, tmp_path):
    import pytest

    out = _submit(db, settings, tmp_path, 4)
    for attempt in range(3):
        with pytest.raises(RuntimeError):
            run_chunk(db, Crashes(), out.chunk_ids[0], f"w{attempt}", 30)  # default: 3 attempts
        with db.read() as s:  # handed back at once, with the cause kept on the chunk
            chunk = s.get(Chunk, out.chunk_ids[0])
            assert chunk.status is ChunkStatus.pending and "illegal memory access" in chunk.last_error
    outcome = run_chunk(db, Crashes(), out.chunk_ids[0], "w3", 30)
    assert not outcome.claimed  # the engine is not called a fourth time
    with db.read() as s:
        job = s.get(Job, out.job.id)
        items = s.scalars(select(Item).where(Item.job_id == job.id)).all()
    assert job.status is JobStatus.completed and (job.failed, job.running, job.pending) == (4, 0, 0)
    for item in items:
        assert item.status is ItemStatus.failed and item.error_code == "engine_error"
        assert "RuntimeError: CUDA error: an illegal memory access" in item.error_message


class DropsTheLastResult(EchoEngine):
    def generate(self, requests, more=None):
        for batch in super().generate(requests[:-1]):
            yield batch


def test_items_the_engine_returned_no_result_for_fail_instead_of_running_forever(db, settings, tmp_path):
    out = _submit(db, settings, tmp_path, 4)
    outcome = run_chunk(db, DropsTheLastResult(), out.chunk_ids[0], "w", 30)
    assert outcome.claimed and outcome.done == 3
    with db.read() as s:
        job = s.get(Job, out.job.id)
        items = s.scalars(select(Item).where(Item.job_id == job.id).order_by(Item.line)).all()
    assert [i.status for i in items] == [ItemStatus.succeeded] * 3 + [ItemStatus.failed]
    assert items[-1].error_code == "engine_error" and "no result" in items[-1].error_message
    assert job.status is JobStatus.completed and (job.succeeded, job.failed, job.running) == (3, 1, 0)
