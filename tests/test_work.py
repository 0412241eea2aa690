"""The chunk state machine: leases, takeover, and exactly-once results."""

import time
from datetime import timedelta

from sqlalchemy import select, update

from llmbatch.jobs import service, work
from llmbatch.jobs.models import Chunk, ChunkStatus, Item, ItemStatus, Job, JobStatus, utcnow
from tests.support import write_jsonl


def _job(db, settings, tmp_path, n=4):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(n)])
    with db.write() as s, open(path, "rb") as fp:
        return service.submit(s, fp, settings)


def _results(items, status=ItemStatus.succeeded, output="out"):
    return [work.ItemResult(item_id=i.id, status=status, output=output, finish_reason="stop",
                            prompt_tokens=2, completion_tokens=3) for i in items]


def test_claim_moves_items_to_running_and_job_to_running(db, settings, tmp_path):
    out = _job(db, settings, tmp_path)
    with db.write() as s:
        chunk = work.claim_chunk(s, out.chunk_ids[0], "w1", 30)
    assert chunk is not None
    with db.read() as s:
        job = s.get(Job, out.job.id)
        assert job.status is JobStatus.running and (job.pending, job.running) == (0, 4)
        assert {i.worker for i in work.running_items(s, chunk.id)} == {"w1"}


def test_a_live_lease_turns_away_a_second_delivery(db, settings, tmp_path):
    out = _job(db, settings, tmp_path)
    with db.write() as s:
        assert work.claim_chunk(s, out.chunk_ids[0], "w1", 30) is not None
    with db.write() as s:
        assert work.claim_chunk(s, out.chunk_ids[0], "w2", 30) is None


def test_a_finished_chunk_is_never_run_again(db, settings, tmp_path):
    out = _job(db, settings, tmp_path)
    with db.write() as s:
        chunk = work.claim_chunk(s, out.chunk_ids[0], "w1", 30)
        items = work.running_items(s, chunk.id)
    with db.write() as s:
        assert work.record_results(s, chunk, "w1", _results(items), 30)
        work.finish_chunk(s, chunk, "w1")
    with db.write() as s:
        assert work.claim_chunk(s, out.chunk_ids[0], "w2", 30) is None
    with db.read() as s:
        job = s.get(Job, out.job.id)
    assert job.status is JobStatus.completed and job.succeeded == 4
    assert (job.prompt_tokens, job.completion_tokens) == (8, 12)


def test_lapsed_lease_is_taken_over_and_the_old_worker_writes_nothing(db, settings, tmp_path):
    out = _job(db, settings, tmp_path)
    with db.write() as s:
        old = work.claim_chunk(s, out.chunk_ids[0], "dead", 30)
        items = work.running_items(s, old.id)
    with db.write() as s:  # the old worker stops renewing; time passes
        s.execute(update(Chunk).values(lease_until=utcnow() - timedelta(seconds=1)))
    with db.write() as s:
        assert work.release_stale_chunks(s) == {out.job.model: [(out.job.id, old.id)]}
    with db.write() as s:
        new = work.claim_chunk(s, old.id, "alive", 30)
    assert new is not None
    with db.write() as s:
        assert not work.record_results(s, old, "dead", _results(items, output="stale"), 30)
    with db.write() as s:
        assert work.record_results(s, new, "alive", _results(items, output="fresh"), 30)
    with db.read() as s:
        rows = s.scalars(select(Item).where(Item.job_id == out.job.id)).all()
        job = s.get(Job, out.job.id)
    assert {r.output for r in rows} == {"fresh"} and {r.worker for r in rows} == {"alive"}
    assert all(r.attempts == 2 for r in rows)
    assert job.succeeded == 4 and job.running == 0 and job.status is JobStatus.completed


def test_results_never_overwrite_a_final_item_and_counters_stay_true(db, settings, tmp_path):
    out = _job(db, settings, tmp_path)
    with db.write() as s:
        chunk = work.claim_chunk(s, out.chunk_ids[0], "w1", 30)
        items = work.running_items(s, chunk.id)
    with db.write() as s:
        assert work.record_results(s, chunk, "w1", _results(items[:2], output="first"), 30)
    with db.write() as s:  # the same two again (a replayed micro-batch) plus the other two
        assert work.record_results(s, chunk, "w1", _results(items, output="second"), 30)
    with db.read() as s:
        outputs = [i.output for i in s.scalars(select(Item).where(Item.job_id == out.job.id).order_by(Item.line))]
        job = s.get(Job, out.job.id)
    assert outputs == ["first", "first", "second", "second"]
    assert (job.succeeded, job.running, job.pending) == (4, 0, 0)
    assert job.completion_tokens == 12


def test_release_leaves_live_chunks_alone(db, settings, tmp_path):
    out = _job(db, settings, tmp_path, n=8)
    with db.write() as s:
        work.claim_chunk(s, out.chunk_ids[0], "w1", 30)
    with db.write() as s:
        assert work.release_stale_chunks(s) == {}
        assert s.get(Chunk, out.chunk_ids[0]).status is ChunkStatus.running


def test_recount_matches_incremental_counters(db, settings, tmp_path):
    out = _job(db, settings, tmp_path, n=8)
    with db.write() as s:
        chunk = work.claim_chunk(s, out.chunk_ids[0], "w1", 30)
        items = work.running_items(s, chunk.id)
    with db.write() as s:
        work.record_results(s, chunk, "w1", _results(items), 30)
    with db.read() as s:
        before = s.get(Job, out.job.id).counts()
    with db.write() as s:
        work.recount_job(s, out.job.id)
    with db.read() as s:
        assert s.get(Job, out.job.id).counts() == before


def test_a_skewed_python_clock_neither_steals_a_live_chunk_nor_shortens_a_lease(db, settings, tmp_path, monkeypatch):
    """Leases are timed by the database's clock: a host an hour ahead or behind changes nothing."""
    from datetime import datetime, timezone

    out = _job(db, settings, tmp_path)
    with db.write() as s:
        assert work.claim_chunk(s, out.chunk_ids[0], "w1", 30) is not None
    ahead = lambda: datetime.now(timezone.utc) + timedelta(hours=1)  # noqa: E731
    monkeypatch.setattr(work, "utcnow", ahead)
    with db.write() as s:
        assert work.claim_chunk(s, out.chunk_ids[0], "w2", 30) is None, "a fast clock stole a live chunk"
    with db.write() as s:
        assert work.release_stale_chunks(s) == {}, "a fast clock released a live chunk"
    # The holder's clock is an hour behind: its heartbeat must still extend the lease into the future.
    monkeypatch.setattr(work, "utcnow", lambda: datetime.now(timezone.utc) - timedelta(hours=1))
    with db.write() as s:
        assert work.renew_lease(s, out.chunk_ids[0], "w1", 30)
    monkeypatch.undo()
    with db.write() as s:
        assert work.release_stale_chunks(s) == {}, "a slow clock's heartbeat left a lapsed lease"
        assert work.claim_chunk(s, out.chunk_ids[0], "w2", 30) is None
    with db.read() as s:
        lease = s.get(Chunk, out.chunk_ids[0]).lease_until
    assert timedelta(seconds=20) < lease - utcnow() <= timedelta(seconds=31)


def test_a_lapsed_lease_records_why_on_the_chunk(db, settings, tmp_path):
    out = _job(db, settings, tmp_path)
    with db.write() as s:
        work.claim_chunk(s, out.chunk_ids[0], "host:123", 30)
        s.execute(update(Chunk).values(lease_until=utcnow() - timedelta(seconds=1)))
    with db.write() as s:
        work.release_stale_chunks(s)
    with db.read() as s:
        chunk = s.get(Chunk, out.chunk_ids[0])
    assert chunk.status is ChunkStatus.pending and "host:123 stopped renewing its lease" in chunk.last_error


def test_a_chunk_claimed_more_than_max_attempts_fails_its_items_with_the_last_cause(db, settings, tmp_path):
    out = _job(db, settings, tmp_path, n=8)  # two chunks of 4
    for attempt in range(3):
        with db.write() as s:
            chunk = work.claim_chunk(s, out.chunk_ids[0], f"w{attempt}", 30, max_attempts=3)
            assert chunk is not None, f"attempt {attempt + 1} was refused"
        with db.write() as s:
            assert work.fail_attempt(s, chunk, f"w{attempt}", f"RuntimeError: boom {attempt}")
    with db.write() as s:
        assert work.claim_chunk(s, out.chunk_ids[0], "w9", 30, max_attempts=3) is None
    with db.read() as s:
        chunk = s.get(Chunk, out.chunk_ids[0])
        items = s.scalars(select(Item).where(Item.chunk_id == chunk.id)).all()
        job = s.get(Job, out.job.id)
    assert chunk.status is ChunkStatus.done
    assert {i.status for i in items} == {ItemStatus.failed} and {i.error_code for i in items} == {"engine_error"}
    assert all("RuntimeError: boom 2" in i.error_message and "3 attempt" in i.error_message for i in items)
    assert (job.failed, job.running, job.pending) == (4, 0, 4)
    # The other chunk is untouched, and once it is done the job completes.
    with db.write() as s:
        other = work.claim_chunk(s, out.chunk_ids[1], "w1", 30, max_attempts=3)
        results = _results(work.running_items(s, other.id))
    with db.write() as s:
        work.record_results(s, other, "w1", results, 30)
        work.finish_chunk(s, other, "w1")
    with db.read() as s:
        job = s.get(Job, out.job.id)
    assert job.status is JobStatus.completed and (job.succeeded, job.failed) == (4, 4)


def test_finish_chunk_fails_items_the_engine_returned_no_result_for(db, settings, tmp_path):
    out = _job(db, settings, tmp_path)
    with db.write() as s:
        chunk = work.claim_chunk(s, out.chunk_ids[0], "w1", 30)
        items = work.running_items(s, chunk.id)
    with db.write() as s:
        work.record_results(s, chunk, "w1", _results(items[:3]), 30)  # one result short
        assert work.finish_chunk(s, chunk, "w1") == 1
    with db.read() as s:
        last = s.get(Item, items[3].id)
        job = s.get(Job, out.job.id)
    assert last.status is ItemStatus.failed and last.error_code == "engine_error"
    assert job.status is JobStatus.completed and (job.succeeded, job.failed, job.running) == (3, 1, 0)


def test_settle_finishes_a_cancelling_job_whose_released_chunk_was_never_requeued(db, settings, tmp_path):
    out = _job(db, settings, tmp_path, n=8)
    with db.write() as s:
        work.claim_chunk(s, out.chunk_ids[0], "dead", 30)
    with db.write() as s:
        service.cancel(s, out.job.id)  # the second chunk's pending items are cancelled now
    with db.write() as s:
        s.execute(update(Chunk).where(Chunk.id == out.chunk_ids[0]).values(lease_until=utcnow() - timedelta(seconds=1)))
    with db.write() as s:
        work.release_stale_chunks(s)  # ... and its message is never published
    with db.read() as s:
        assert s.get(Job, out.job.id).status is JobStatus.cancelling
    with db.write() as s:
        assert work.settle_cancelled_chunks(s) >= 1
    with db.read() as s:
        job = s.get(Job, out.job.id)
        states = set(s.scalars(select(Item.status).where(Item.job_id == job.id)))
    assert job.status is JobStatus.cancelled and (job.cancelled, job.running, job.pending) == (8, 0, 0)
    assert states == {ItemStatus.cancelled}


def test_a_claim_and_a_cancel_at_once_never_deadlock_on_postgresql(pg_url, tmp_path):
    """The claim pauses just before it moves the job's counters; the cancel starts meanwhile.

    With claim taking chunk and item locks before the job's, and cancel the job's before the
    items', the two wait on each other and PostgreSQL kills one as a deadlock. With the job's row
    locked first everywhere, the cancel simply waits for the claim.
    """
    import threading

    from sqlalchemy import event

    from llmbatch.jobs.db import Database
    from llmbatch.jobs.settings import Settings

    db = Database(pg_url)
    db.ensure_schema()
    settings = Settings.from_env(database_url=pg_url, chunk_size=4)
    out = _job(db, settings, tmp_path, n=8)
    claim_paused, errors = threading.Event(), []
    claimer = threading.get_ident

    def pause_before_counters(conn, cursor, statement, *_):
        if threading.get_ident() == claim_thread_id[0] and statement.lstrip().upper().startswith("UPDATE JOBS"):
            if not claim_paused.is_set():
                claim_paused.set()
                time.sleep(2)  # the cancel runs now, and PostgreSQL's deadlock check (1 s) fires if it can

    claim_thread_id = [None]
    event.listen(db.engine, "before_cursor_execute", pause_before_counters)

    def claim():
        claim_thread_id[0] = claimer()
        try:
            with db.write() as s:
                work.claim_chunk(s, out.chunk_ids[0], "w1", 30)
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    t = threading.Thread(target=claim)
    t.start()
    assert claim_paused.wait(30), "the claim never reached the job's counters"
    try:
        with db.write() as s:
            service.cancel(s, out.job.id)
    except Exception as exc:  # noqa: BLE001
        errors.append(exc)
    t.join(30)
    event.remove(db.engine, "before_cursor_execute", pause_before_counters)
    assert not errors, f"deadlock: {errors}"
    with db.read() as s:
        job = s.get(Job, out.job.id)
    assert job.status is JobStatus.cancelling and (job.running, job.cancelled, job.pending) == (4, 4, 0)
    db.dispose()
