"""The chunk state machine: leases, takeover, and exactly-once results."""

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
