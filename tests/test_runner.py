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


def _wait_until(cond, timeout=20.0):
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _finished(db, job_id) -> int:
    with db.read() as s:
        job = s.get(Job, job_id)
        return job.succeeded + job.failed


class SlowEcho(EchoEngine):
    """The echo engine at one item per `delay` seconds, honouring `cancelled` as the real one does."""

    batch_size = 1

    def __init__(self, delay=0.3):
        self.delay, self.generated = delay, 0

    def generate(self, requests, more=None, cancelled=None):
        import time

        for batch in super().generate(requests, more, cancelled):
            time.sleep(self.delay)
            self.generated += sum(r.finish_reason != "cancelled" for r in batch)
            yield batch


class CancelAfterFirstBatch(SlowEcho):
    """Cancels the job once its first result is written."""

    def __init__(self, db, job_id):
        super().__init__()
        self.db, self.job_id = db, job_id

    def generate(self, requests, more=None, cancelled=None):
        for i, batch in enumerate(super().generate(requests, more, cancelled)):
            yield batch
            if i == 0:
                _wait_until(lambda: _finished(self.db, self.job_id) == 1)
                with self.db.write() as s:
                    service.cancel(s, self.job_id)


def test_cancel_drops_the_held_items_from_the_engine_and_keeps_what_finished(db, settings, tmp_path):
    out = _submit(db, settings, tmp_path, 4)  # one chunk of 4 (chunk_size=4), one item per 0.3 s
    eng = CancelAfterFirstBatch(db, out.job.id)
    outcome = run_chunk(db, eng, out.chunk_ids[0], "w", 30)
    with db.read() as s:
        job = s.get(Job, out.job.id)
        states = s.scalars(select(Item.status).where(Item.job_id == job.id).order_by(Item.line)).all()
    # Seen within CANCEL_POLL_S (0.5 s): at most two more items ran; the rest came back from the
    # engine as cancelled. Whatever finished before is kept.
    assert 1 <= outcome.done <= 3 and eng.generated == outcome.done
    assert states == [ItemStatus.succeeded] * outcome.done + [ItemStatus.cancelled] * (4 - outcome.done)
    assert job.status is JobStatus.cancelled and (job.succeeded, job.cancelled, job.running) == (
        outcome.done, 4 - outcome.done, 0)


class LoseLeaseAfterFirstBatch(EchoEngine):
    """Another worker takes the chunk over (our lease lapsed) once the first micro-batch is written."""

    batch_size = 2

    def __init__(self, db, chunk_id, job_id):
        self.db, self.chunk_id, self.job_id = db, chunk_id, job_id

    def generate(self, requests, more=None, cancelled=None):
        for i, batch in enumerate(super().generate(requests, more, cancelled)):
            if i == 1:
                _wait_until(lambda: _finished(self.db, self.job_id) == 2)
                with self.db.write() as s:
                    s.execute(Chunk.__table__.update().where(Chunk.id == self.chunk_id).values(worker="thief"))
            yield batch


def test_a_worker_that_lost_its_lease_writes_nothing_more(db, settings, tmp_path):
    out = _submit(db, settings, tmp_path, 4)
    outcome = run_chunk(db, LoseLeaseAfterFirstBatch(db, out.chunk_ids[0], out.job.id), out.chunk_ids[0], "w", 30)
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

    def generate(self, requests, more=None, cancelled=None):
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
    def generate(self, requests, more=None, cancelled=None):
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


class _Locker:
    """Holds the database write-locked (SQLite: an EXCLUSIVE transaction; PostgreSQL: the job's row,
    which every write of a run locks first) for `seconds`, from its own connection."""

    def __init__(self, db_url, job_id, seconds):
        import threading

        self.db_url, self.job_id, self.seconds = db_url, job_id, seconds
        self.held, self.window = threading.Event(), None
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self):
        import time

        if self.db_url.startswith("sqlite"):
            import sqlite3

            conn = sqlite3.connect(self.db_url.removeprefix("sqlite:///"), isolation_level=None)
            conn.execute("BEGIN EXCLUSIVE")
        else:
            import psycopg

            conn = psycopg.connect(self.db_url.replace("postgresql+psycopg://", "postgresql://"))
            conn.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (self.job_id,))
        start = time.monotonic()
        self.held.set()
        time.sleep(self.seconds)
        self.window = (start, time.monotonic())
        conn.rollback() if not self.db_url.startswith("sqlite") else conn.execute("ROLLBACK")
        conn.close()


class LocksTheDatabase(SlowEcho):
    """Write-locks the database right after its first result, and notes when each result was made."""

    def __init__(self, locker):
        super().__init__(delay=0.1)
        self.locker, self.times = locker, []

    def generate(self, requests, more=None, cancelled=None):
        import time

        for i, batch in enumerate(super().generate(requests, more, cancelled)):
            self.times.append(time.monotonic())
            yield batch
            if not self.locker.held.is_set():
                self.locker.thread.start()
                self.locker.held.wait(10)


def test_generation_goes_on_while_the_database_is_write_locked(db, db_url, settings, tmp_path):
    import dataclasses

    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"w {i} x", "max_tokens": 2} for i in range(24)])
    with db.write() as s, open(path, "rb") as fp:
        out = service.submit(s, fp, dataclasses.replace(settings, chunk_size=12))  # two chunks of 12
    locker = _Locker(db_url, out.job.id, seconds=1.5)
    eng = LocksTheDatabase(locker)
    outcome = run_chunk(db, eng, out.chunk_ids[0], "w", 30)
    start, end = locker.window
    during = [t for t in eng.times if start < t < end]
    # The rest of the first chunk (11 items, 0.1 s each) is generated under the lock; its results
    # wait in the bookkeeper's queue, and the second chunk's claim waits the lock out.
    assert len(during) >= 6, f"{len(during)} result(s) made while the database was locked"
    assert outcome.done == 24
    with db.read() as s:
        job = s.get(Job, out.job.id)
        items = s.scalars(select(Item).where(Item.job_id == job.id).order_by(Item.line)).all()
    assert job.status is JobStatus.completed and (job.succeeded, job.running, job.pending) == (24, 0, 0)
    assert [i.output for i in items] == [f"w {i}" for i in range(24)]


def test_cancel_reaches_the_engine_within_a_second_of_a_job_whose_lines_take_minutes(db, settings, tmp_path, engine):
    """The real model on the CPU, four lines of 4,000 tokens each (minutes of decoding): a cancel
    ends the run within one decode step or one second, whichever is later (plus the bookkeeper's
    CANCEL_POLL_S), every item cancelled."""
    import threading
    import time

    from llmbatch.worker.engine.engine import Engine
    from llmbatch.worker.runner import CANCEL_POLL_S

    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"{i}, {i + 1}, {i + 2},", "max_tokens": 4000,
                                                "temperature": 0} for i in range(4)])
    with db.write() as s, open(path, "rb") as fp:
        out = service.submit(s, fp, settings)  # one chunk of 4
    eng = Engine(engine.config, loaded=(engine.model, engine.tokenizer, engine.device, engine.dtype))
    seen = {}

    def cancel_once_decoding():
        _wait_until(lambda: eng.stats.steps >= 1, timeout=300)
        first = time.monotonic()
        _wait_until(lambda: eng.stats.steps >= 4, timeout=300)
        seen["step_s"] = (time.monotonic() - first) / 3  # this machine's decode step, as loaded now
        with db.write() as s:
            service.cancel(s, out.job.id)
        seen["at"], seen["steps"] = time.monotonic(), eng.stats.steps

    canceller = threading.Thread(target=cancel_once_decoding, daemon=True)
    canceller.start()
    outcome = run_chunk(db, eng, out.chunk_ids[0], "w", 30)
    took = time.monotonic() - seen["at"]
    canceller.join()
    allowed = max(1.0, seen["step_s"]) + seen["step_s"] + CANCEL_POLL_S + 1.0  # + the step in flight, + writes
    assert took < allowed, f"run_chunk returned {took:.1f} s after the cancel (a step takes {seen['step_s']:.2f} s)"
    assert outcome.done == 0
    with db.read() as s:
        job = s.get(Job, out.job.id)
        items = s.scalars(select(Item).where(Item.job_id == job.id)).all()
    assert job.status is JobStatus.cancelled and (job.cancelled, job.running, job.succeeded) == (4, 0, 0)
    assert all(i.status is ItemStatus.cancelled for i in items)
    assert 4 * 4 <= job.completion_tokens < 4 * 4000  # the tokens spent before the drop are counted
