"""Submitting, cancelling and retrying jobs against real SQLite and PostgreSQL."""


import pytest
from sqlalchemy import func, select

from llmbatch.jobs import service, work
from llmbatch.jobs.exceptions import InputFileError, InvalidState
from llmbatch.jobs.models import Chunk, Item, ItemStatus, Job, JobStatus
from tests.support import MIXED_BAD_LINES, MIXED_LINES, write_jsonl


def submit(db, settings, path, **kw):
    with db.write() as s, open(path, "rb") as fp:
        return service.submit(s, fp, settings, **kw)


def test_submit_stores_every_line_once(db, settings, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", MIXED_LINES)
    out = submit(db, settings, path, params={"max_tokens": 7})
    assert out.bad_lines == len(MIXED_BAD_LINES)
    with db.read() as s:
        job = s.get(Job, out.job.id)
        items = s.scalars(select(Item).where(Item.job_id == job.id).order_by(Item.line)).all()
    assert [i.line for i in items] == list(range(1, len(MIXED_LINES) + 1))
    assert job.total == len(MIXED_LINES) and job.failed == len(MIXED_BAD_LINES)
    assert job.pending == len(MIXED_LINES) - len(MIXED_BAD_LINES)
    assert job.params == {"max_tokens": 7} and job.status is JobStatus.queued
    for item in items:
        if item.line in MIXED_BAD_LINES:
            assert item.status is ItemStatus.failed and item.chunk_id is None
            assert item.error_code == "invalid_input"
            assert item.error_message.startswith(f"line {item.line}:")
            assert MIXED_BAD_LINES[item.line] in item.error_message
        else:
            assert item.status is ItemStatus.pending and item.chunk_id in out.chunk_ids
    assert items[8].custom_id == "line-9"
    # chunk_size=4 in the test settings: 5 good lines -> 2 chunks.
    assert len(out.chunk_ids) == 2


def test_strict_refuses_the_file_and_stores_nothing(db, settings, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", MIXED_LINES)
    with pytest.raises(InputFileError) as err:
        submit(db, settings, path, strict=True)
    assert all(f"line {n}:" in str(err.value) for n in MIXED_BAD_LINES)
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
        assert s.scalar(select(func.count()).select_from(Item)) == 0


def test_strict_failure_after_many_good_lines_leaves_nothing(db, settings, tmp_path):
    lines = [{"prompt": f"p{i}"} for i in range(50)] + ["not json"] + [{"prompt": "after"}]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    with pytest.raises(InputFileError, match="1 bad line"):
        submit(db, settings, path, strict=True)
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Item)) == 0
        assert s.scalar(select(func.count()).select_from(Chunk)) == 0


def test_a_file_of_only_bad_lines_is_completed_with_every_item_failed(db, settings, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", ['{"prompt": 1}', '{"prompt": "ok", "top_k": "x"}'])
    out = submit(db, settings, path)
    assert out.job.status is JobStatus.completed
    assert out.job.failed == out.job.total == 2 and out.chunk_ids == []


def test_empty_file_is_refused(db, settings, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"\n\n")
    with pytest.raises(InputFileError, match="empty"):
        submit(db, settings, path)
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0


def test_bad_job_parameters_are_refused(db, settings, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    with pytest.raises(ValueError, match="temperature"):
        submit(db, settings, path, params={"temperature": -1})


def _finish_all(db, chunk_ids, worker="w1", fail_lines=()):
    """Drive chunks through the worker-side transitions without a model."""
    for chunk_id in chunk_ids:
        with db.write() as s:
            chunk = work.claim_chunk(s, chunk_id, worker, 30)
            items = work.running_items(s, chunk_id)
        results = [work.ItemResult(item_id=i.id, status=ItemStatus.failed if i.line in fail_lines else ItemStatus.succeeded,
                                   output="x", finish_reason="stop", prompt_tokens=3, completion_tokens=2,
                                   error_code="engine_error" if i.line in fail_lines else None)
                   for i in items]
        with db.write() as s:
            assert work.record_results(s, chunk, worker, results, 30)
            work.finish_chunk(s, chunk, worker)


def test_cancel_keeps_finished_results_and_cancels_the_rest(db, settings, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(10)])
    out = submit(db, settings, path)
    _finish_all(db, out.chunk_ids[:1])
    with db.write() as s:
        job = service.cancel(s, out.job.id)
    assert job.status is JobStatus.cancelled
    assert (job.succeeded, job.cancelled, job.pending) == (4, 6, 0)
    with db.write() as s, pytest.raises(InvalidState):
        service.cancel(s, out.job.id)


def test_cancel_while_a_chunk_runs_waits_for_it(db, settings, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(8)])
    out = submit(db, settings, path)
    with db.write() as s:
        chunk = work.claim_chunk(s, out.chunk_ids[0], "w1", 30)
    with db.write() as s:
        job = service.cancel(s, out.job.id)
    assert job.status is JobStatus.cancelling and job.running == 4 and job.cancelled == 4
    with db.write() as s:
        work.cancel_running(s, chunk)
    with db.read() as s:
        job = s.get(Job, out.job.id)
    assert job.status is JobStatus.cancelled and job.cancelled == 8


def test_retry_requeues_only_failed_items(db, settings, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(8)] + ["bad"])
    out = submit(db, settings, path)
    with db.write() as s, pytest.raises(InvalidState):
        service.retry(s, out.job.id)  # still queued
    _finish_all(db, out.chunk_ids, fail_lines={2, 7})
    with db.read() as s:
        job = s.get(Job, out.job.id)
    assert job.status is JobStatus.completed and (job.succeeded, job.failed) == (6, 3)
    with db.write() as s:
        chunk_ids = service.retry(s, out.job.id)
    assert sorted(chunk_ids) == sorted(out.chunk_ids)  # lines 2 and 7 sit in different chunks
    with db.read() as s:
        job = s.get(Job, out.job.id)
        pending = s.scalars(select(Item.line).where(Item.job_id == job.id, Item.status == ItemStatus.pending)).all()
    assert sorted(pending) == [2, 7]  # the bad input line (9) cannot succeed on a retry
    assert job.status is JobStatus.queued and (job.succeeded, job.failed, job.pending) == (6, 1, 2)
    _finish_all(db, chunk_ids)
    with db.read() as s:
        job = s.get(Job, out.job.id)
        retried = s.scalars(select(Item).where(Item.job_id == job.id, Item.line.in_([2, 7]))).all()
    assert job.status is JobStatus.completed and (job.succeeded, job.failed) == (8, 1)
    assert all(i.status is ItemStatus.succeeded and i.error_code is None for i in retried)


def test_submit_holds_a_bounded_number_of_bytes_and_still_fills_every_chunk(db, settings, tmp_path, monkeypatch):
    """Big lines are flushed by bytes, long before the line-count bound; chunks stay full."""
    monkeypatch.setattr(service, "FLUSH_BYTES", 40_000, raising=False)
    path = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": f"c{i}", "prompt": f"{i} " + "x" * 9_000}
                                               for i in range(23)])
    written = []
    insert = service._ItemWriter.insert

    def spy(self, columns, rows):
        written.append(sum(len(r[5]) for r in rows))  # the request JSON of each row
        return insert(self, columns, rows)

    monkeypatch.setattr(service._ItemWriter, "insert", spy)
    out = submit(db, settings, path)  # chunk_size=4: 23 lines would be one flush by line count
    assert len(written) > 3 and max(written) <= 40_000 + 9_100, written
    with db.read() as s:
        chunks = s.execute(select(Chunk.id, Chunk.size).where(Chunk.job_id == out.job.id).order_by(Chunk.seq)).all()
        lines = {cid: s.scalars(select(Item.line).where(Item.chunk_id == cid).order_by(Item.line)).all()
                 for cid, _ in chunks}
    assert [size for _, size in chunks] == [4, 4, 4, 4, 4, 3]
    assert [lines[cid] for cid, _ in chunks] == [list(range(1 + 4 * k, min(24, 5 + 4 * k))) for k in range(6)]
    assert [cid for cid, _ in chunks] == out.chunk_ids


def _finish_with_codes(db, chunk_ids, codes):
    """Claim each chunk and fail the lines in `codes` with that error code; the rest succeed."""
    for chunk_id in chunk_ids:
        with db.write() as s:
            chunk = work.claim_chunk(s, chunk_id, "w1", 30)
            items = work.running_items(s, chunk_id)
        results = [work.ItemResult(item_id=i.id, status=ItemStatus.failed if i.line in codes else ItemStatus.succeeded,
                                   output="x", finish_reason="stop", error_code=codes.get(i.line))
                   for i in items]
        with db.write() as s:
            work.record_results(s, chunk, "w1", results, 30)
            work.finish_chunk(s, chunk, "w1")


def test_retry_requeues_only_errors_a_second_try_can_fix(db, settings, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(8)])
    out = submit(db, settings, path)
    _finish_with_codes(db, out.chunk_ids, {1: "context_length_exceeded", 2: "invalid_request", 5: "engine_error",
                                           6: "out_of_memory"})
    with db.write() as s:
        chunk_ids = service.retry(s, out.job.id)
    with db.read() as s:
        pending = s.scalars(select(Item.line).where(Item.job_id == out.job.id, Item.status == ItemStatus.pending)).all()
        job = s.get(Job, out.job.id)
    assert sorted(pending) == [5, 6]
    assert chunk_ids == [out.chunk_ids[1]]  # lines 1 and 2 sit in the first chunk: it is not queued again
    assert (job.failed, job.pending, job.succeeded) == (2, 2, 4)
