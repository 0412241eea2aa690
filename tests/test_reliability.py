"""Faults against real services and real `llmbatch worker` processes running the bundled model.

Each test ends by checking the promise: one final result per line, no custom_id twice, nothing
left pending or running, and the job's counters agree with the rows.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from llmbatch.jobs.cli import cli
from llmbatch.jobs.db import Database
from llmbatch.jobs.models import Chunk, ChunkStatus, Item
from llmbatch.jobs.settings import DEFAULT_MODEL
from llmbatch.worker.app import queue_name
from tests.support import (RedisServer, assert_every_line_has_one_final_result, export_rows, start_worker,
                           stop_worker, wait_for_status, write_jsonl)

pytestmark = pytest.mark.slow


def make_invoke(db_url, broker_url, **env):
    runner = CliRunner()

    def invoke(*args, ok=True):
        result = runner.invoke(cli, ["--database-url", db_url, "--broker-url", broker_url, *map(str, args)],
                               env={k: str(v) for k, v in env.items()}, catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return invoke


def wait_until_drained(broker_url, queue, timeout=60):
    import redis

    client = redis.Redis.from_url(broker_url)
    deadline = time.monotonic() + timeout
    while client.llen(queue) or client.hlen("unacked"):
        assert time.monotonic() < deadline, "the queue did not drain"
        time.sleep(0.2)


def prompts(n, max_tokens=24):
    return [{"custom_id": f"item-{i}", "prompt": f"Write a sentence about the number {i}.", "max_tokens": max_tokens}
            for i in range(n)]


def run_with_fault(db_url, broker_url, tmp_path, fault, *, n=12, chunk_size=4, max_tokens=24, worker_db_url=None,
                   worker_env=None):
    """Submit n prompts, start a worker, call `fault()` once the first result is in, and wait for the end.

    Returns (invoke, job_id, final status, worker log path).
    """
    invoke = make_invoke(db_url, broker_url, LLMBATCH_CHUNK_SIZE=chunk_size)
    job_id = invoke("submit", write_jsonl(tmp_path / "in.jsonl", prompts(n, max_tokens=max_tokens))).stdout.strip()
    log = tmp_path / "w.log"
    w = start_worker(worker_db_url or db_url, broker_url, log,
                     env={"LLMBATCH_MAX_BATCH_SIZE": "2", **(worker_env or {})})
    try:
        wait_for_status(invoke, job_id, lambda s: s["succeeded"] >= 1, timeout=180, proc=w, log_path=log)
        fault()
        status = wait_for_status(invoke, job_id, timeout=240, proc=w, log_path=log)
    finally:
        stop_worker(w)
    return invoke, job_id, status, log


def test_killed_worker_loses_nothing_and_its_chunk_is_taken_up_within_60s(db_url, broker_url, tmp_path):
    """SIGKILL the whole worker mid-chunk; a new worker takes the chunk up when its lease lapses."""
    n = 12
    # One chunk, so the new worker's only work is the dead worker's chunk: what is timed is recovery.
    invoke = make_invoke(db_url, broker_url, LLMBATCH_CHUNK_SIZE=n)
    job_id = invoke("submit", write_jsonl(tmp_path / "in.jsonl", prompts(n, max_tokens=32))).stdout.strip()
    env = {"LLMBATCH_MAX_BATCH_SIZE": "2"}  # small micro-batches: the chunk takes several commits
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start_worker(db_url, broker_url, log_a, "-n", "a@%h", env=env)
    db = Database(db_url)
    try:
        wait_for_status(invoke, job_id, lambda s: s["succeeded"] >= 1, timeout=180, proc=a, log_path=log_a)
        with db.read() as s:
            held = s.scalars(select(Chunk).where(Chunk.status == ChunkStatus.running)).all()
        assert held, "expected a chunk in flight when the worker is killed"
        os.killpg(a.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        a.wait()
        b = start_worker(db_url, broker_url, log_b, "-n", "b@%h", env=env)
        try:
            chunk_id, dead_worker = held[0].id, held[0].worker
            recovered_after = None
            while time.monotonic() - killed_at < 90:
                with db.read() as s:
                    chunk = s.get(Chunk, chunk_id)
                if chunk.worker not in (None, dead_worker) or chunk.status is ChunkStatus.done:
                    recovered_after = time.monotonic() - killed_at
                    break
                time.sleep(0.5)
            assert recovered_after is not None and recovered_after < 60, recovered_after
            print(f"\nrecovery: chunk {chunk_id} taken up {recovered_after:.1f}s after SIGKILL")
            wait_for_status(invoke, job_id, timeout=240, proc=b, log_path=log_b)
        finally:
            stop_worker(b)
    finally:
        stop_worker(a)
        db.dispose()
    rows = assert_every_line_has_one_final_result(invoke, job_id, n)
    assert all(r["status"] == "succeeded" for r in rows)
    assert any(r["worker"] and r["worker"].startswith(os.uname().nodename) for r in rows)


def test_redis_restarted_mid_job(sqlite_url, tmp_path):
    """A Redis without persistence forgets every queued message; the job still completes."""
    redis_server = RedisServer(tmp_path).start()

    def restart():
        redis_server.stop()
        time.sleep(3)
        redis_server.start()  # empty: the queued chunks' messages are gone

    try:
        invoke, job_id, status, _ = run_with_fault(sqlite_url, redis_server.url, tmp_path, restart, chunk_size=3,
                                                   worker_env={"LLMBATCH_LEASE_SECONDS": "6"})
    finally:
        redis_server.stop()
    assert status["succeeded"] == 12
    assert_every_line_has_one_final_result(invoke, job_id, 12)


def test_every_chunk_delivered_twice_to_two_workers(db_url, broker_url, tmp_path):
    from llmbatch.worker.app import enqueue_chunks

    invoke = make_invoke(db_url, broker_url, LLMBATCH_CHUNK_SIZE=3)
    n = 12
    job_id = invoke("submit", write_jsonl(tmp_path / "in.jsonl", prompts(n, max_tokens=8))).stdout.strip()
    db = Database(db_url)
    with db.read() as s:
        chunks = [(job_id, c) for c in s.scalars(select(Chunk.id).where(Chunk.job_id == job_id))]
    db.dispose()
    enqueue_chunks("smollm2-135m-instruct", chunks, broker_url)  # every chunk published a second time
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    workers = [start_worker(db_url, broker_url, log, "-n", f"w{i}@%h") for i, log in enumerate(logs)]
    try:
        wait_for_status(invoke, job_id, timeout=240, proc=workers[0], log_path=logs[0])
        wait_until_drained(broker_url, queue_name(DEFAULT_MODEL))  # the duplicates are taken too
    finally:
        for w in workers:
            stop_worker(w)
    rows = assert_every_line_has_one_final_result(invoke, job_id, n)
    assert all(r["status"] == "succeeded" for r in rows)
    db = Database(db_url)
    with db.read() as s:
        from llmbatch.jobs.models import Item

        attempts = s.scalars(select(Item.attempts).where(Item.job_id == job_id)).all()
    db.dispose()
    assert set(attempts) == {1}, "an item was generated twice"
    logs_text = "".join(log.read_text() for log in logs)
    assert "skipping" in logs_text  # the second delivery of each chunk was turned away


def test_cancel_mid_run_stops_within_one_micro_batch_and_keeps_results(db_url, broker_url, tmp_path):
    """Judged by when rows finished, not by how fast this machine is: every row generated after the
    cancel committed belongs to the micro-batch in flight, and the cancel met a running chunk."""
    from datetime import datetime, timezone

    n, batch = 40, 2
    invoke = make_invoke(db_url, broker_url, LLMBATCH_CHUNK_SIZE=n)
    job_id = invoke("submit", write_jsonl(tmp_path / "in.jsonl", prompts(n, max_tokens=32))).stdout.strip()
    log = tmp_path / "w.log"
    w = start_worker(db_url, broker_url, log, env={"LLMBATCH_MAX_BATCH_SIZE": str(batch)})
    try:
        wait_for_status(invoke, job_id, lambda s: s["succeeded"] >= 2, timeout=180, proc=w, log_path=log)
        out = invoke("cancel", job_id).stdout
        cancelled_at = datetime.now(timezone.utc)  # the cancel has committed
        assert "cancelling" in out, f"the job was not running when cancelled: {out}"
        status = wait_for_status(invoke, job_id, ("cancelled",), timeout=120, proc=w, log_path=log)
    finally:
        stop_worker(w)
    assert status["succeeded"] + status["cancelled"] == n and status["failed"] == 0
    rows = assert_every_line_has_one_final_result(invoke, job_id, n)
    assert all(r["output"] for r in rows if r["status"] == "succeeded")
    late = [r for r in rows if r["status"] == "succeeded" and datetime.fromisoformat(r["finished_at"]) > cancelled_at]
    assert len(late) <= batch, f"{len(late)} rows were generated after the cancel: it ran on past the micro-batch"
    assert status["cancelled"] >= n - status["succeeded"] and status["cancelled"] > n // 2
    # retry resumes a cancelled job: its cancelled items go back to pending, the succeeded ones stay.
    assert invoke("retry", job_id).stdout.strip().endswith("requeued 1 chunk(s)")
    after = json.loads(invoke("status", job_id, "--json").stdout)
    assert (after["status"], after["pending"], after["succeeded"]) == ("queued", status["cancelled"],
                                                                       status["succeeded"])


class _Exploit:
    """Unpickling this would create a marker file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_message_is_refused_never_executed(sqlite_url, broker_url, tmp_path):
    from kombu import Connection, Exchange, Producer, Queue

    marker = tmp_path / "pwned"
    queue = queue_name(DEFAULT_MODEL)
    with Connection(broker_url) as conn:
        producer = Producer(conn.channel(), exchange=Exchange(queue, type="direct"), routing_key=queue,
                            serializer="pickle")
        producer.publish(((_Exploit(str(marker)),), {}, {}), declare=[Queue(queue, Exchange(queue, "direct"), queue)],
                         headers={"task": "llmbatch.run_chunk", "id": "evil", "lang": "py", "argsrepr": "",
                                  "kwargsrepr": ""})
    invoke = make_invoke(sqlite_url, broker_url)
    job_id = invoke("submit", write_jsonl(tmp_path / "in.jsonl", prompts(2, max_tokens=4))).stdout.strip()
    log = tmp_path / "w.log"
    w = start_worker(sqlite_url, broker_url, log)
    try:
        wait_for_status(invoke, job_id, timeout=180, proc=w, log_path=log)  # it keeps serving real work
    finally:
        stop_worker(w)
    assert not marker.exists(), "a pickled message was executed"
    assert "pickle" in log.read_text().lower()  # refused, and said so


def test_export_during_a_running_job_is_a_consistent_snapshot(db_url, broker_url, tmp_path):
    invoke = make_invoke(db_url, broker_url, LLMBATCH_CHUNK_SIZE=4)
    n = 12
    job_id = invoke("submit", write_jsonl(tmp_path / "in.jsonl", prompts(n, max_tokens=16))).stdout.strip()
    log = tmp_path / "w.log"
    w = start_worker(db_url, broker_url, log, env={"LLMBATCH_MAX_BATCH_SIZE": "2"})
    snapshots = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            snapshots.append(export_rows(invoke, job_id))
            if json.loads(invoke("status", job_id, "--json").stdout)["status"] == "completed":
                break
            time.sleep(0.3)
    finally:
        stop_worker(w)
    partial = [s for s in snapshots if any(r["status"] != "succeeded" for r in s) and
               any(r["status"] == "succeeded" for r in s)]
    assert partial, "no export was taken mid-run"
    for rows in snapshots:
        assert [r["line"] for r in rows] == list(range(1, n + 1))
        for r in rows:
            if r["status"] == "succeeded":
                assert r["output"] is not None and r["completion_tokens"] > 0 and r["finished_at"]
            else:
                assert r["status"] in ("pending", "running") and r["output"] is None and r["finished_at"] is None
    assert_every_line_has_one_final_result(invoke, job_id, n)


def test_postgres_unreachable_for_a_few_seconds(pg_url, broker_url, tmp_path):
    """The worker reaches PostgreSQL through a proxy that drops every connection for 5 s mid-job."""
    from tests.support import TcpProxy

    proxy = TcpProxy(5432)

    def outage():
        proxy.cut()
        time.sleep(5)
        proxy.restore()

    try:
        invoke, job_id, status, log = run_with_fault(
            pg_url, broker_url, tmp_path, outage, worker_db_url=pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"))
    finally:
        proxy.close()
    assert status["succeeded"] == 12
    assert "retrying" in log.read_text()  # it did meet the outage, and rode it out
    assert_every_line_has_one_final_result(invoke, job_id, 12)


def test_sqlite_locked_for_a_few_seconds(sqlite_url, broker_url, tmp_path):
    """An exclusive lock held over several micro-batches' time: the worker's writes wait it out.

    That a write really met the lock is checked after the fact: some item finished generating
    while the lock was held (its results are written right after), so its write had to wait."""
    import sqlite3
    from datetime import datetime, timezone

    path = sqlite_url.removeprefix("sqlite:///")
    window = {}

    def lock():
        db = Database(sqlite_url)
        with db.read() as s:  # how long the first micro-batch took: hold the lock for several
            first = s.execute(select(func.min(Item.started_at), func.min(Item.finished_at))).one()
        db.dispose()
        hold = max(5.0, 4 * (first[1] - first[0]).total_seconds())
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        window["from"] = datetime.now(timezone.utc)
        time.sleep(hold)
        window["to"] = datetime.now(timezone.utc)
        locker.execute("ROLLBACK")
        locker.close()

    # One chunk: a further chunk's claim is a write too (made beside the engine), and with nothing
    # else left to run the engine would wait for it under the lock, which this check would race.
    invoke, job_id, status, _ = run_with_fault(sqlite_url, broker_url, tmp_path, lock, n=8, chunk_size=8,
                                               max_tokens=16)
    assert status["succeeded"] == 8
    rows = assert_every_line_has_one_final_result(invoke, job_id, 8)
    finished = [datetime.fromisoformat(r["finished_at"]) for r in rows]
    assert any(window["from"] < f < window["to"] for f in finished), \
        f"no write met the lock: items finished at {sorted(finished)}, lock held {window}"


def test_bad_input_corpus(db_url, broker_url, tmp_path):
    """Every bad line fails alone, naming its line; the valid lines around them succeed."""
    big = json.dumps({"prompt": "x" * (10 * 1024 * 1024)})
    lines = [
        json.dumps({"custom_id": "ok-1", "prompt": "Hello", "max_tokens": 4}).encode(),
        b'{"custom_id": "json", "prompt": "unterminated}',
        b'{"custom_id": "bytes", "prompt": "caf\xe9 \xff"}',
        big.encode(),
        b'["a", "list"]',
        json.dumps({"custom_id": "types", "prompt": "hi", "max_tokens": "ten"}).encode(),
        json.dumps({"custom_id": "empty", "prompt": "   "}).encode(),
        json.dumps({"custom_id": "param", "prompt": "hi", "temprature": 0.5}).encode(),
        json.dumps({"custom_id": "ok-1", "prompt": "again"}).encode(),
        json.dumps({"custom_id": "long", "prompt": "hello " * 9000, "max_tokens": 4}).encode(),
        json.dumps({"custom_id": "ok-2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).encode(),
    ]
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    expected = {2: "invalid JSON", 3: "not valid UTF-8", 4: "longer than", 5: "expected a JSON object",
                6: "must be an integer", 7: "empty prompt", 8: "unknown parameter", 9: "duplicate custom_id"}
    invoke = make_invoke(db_url, broker_url)
    job_id = invoke("submit", path).stdout.strip()
    log = tmp_path / "w.log"
    w = start_worker(db_url, broker_url, log)
    try:
        wait_for_status(invoke, job_id, timeout=240, proc=w, log_path=log)
    finally:
        stop_worker(w)
    rows = export_rows(invoke, job_id)
    assert [r["line"] for r in rows] == list(range(1, len(lines) + 1))
    for row in rows:
        line = row["line"]
        if line in expected:
            assert row["status"] == "failed" and row["error"]["code"] == "invalid_input"
            assert row["error"]["message"].startswith(f"line {line}:") and expected[line] in row["error"]["message"]
        elif line == 10:
            assert row["status"] == "failed" and row["error"]["code"] == "context_length_exceeded"
        else:
            assert row["status"] == "succeeded" and row["output"]
    status = json.loads(invoke("status", job_id, "--json").stdout)
    assert (status["succeeded"], status["failed"]) == (2, 9)


def test_unusable_files_are_refused_and_nothing_is_stored(sqlite_url, broker_url, tmp_path):
    invoke = make_invoke(sqlite_url, broker_url)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    csv_file = tmp_path / "data.csv"
    csv_file.write_text("id,prompt\n1,hello\n2,world\n")
    for path, message in ((empty, "empty"), (csv_file, "does not look like JSONL")):
        result = invoke("submit", path, ok=False)
        assert result.exit_code == 1 and message in result.stderr, result.output
    assert json.loads(invoke("status", "--json").stdout) == []
