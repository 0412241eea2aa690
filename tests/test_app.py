"""The Celery app's reliability settings, checked by what they do, and how work is routed."""

import base64
import json
import sqlite3
import time

import pytest
import redis
from click.testing import CliRunner
from kombu.exceptions import ContentDisallowed
from kombu.serialization import dumps, loads, prepare_accept_content

from llmbatch.jobs.cli import cli
from llmbatch.worker.app import TASK_RUN_CHUNK, app, enqueue_chunks, queue_name
from tests.support import start_worker, stop_worker, wait_for_status, write_jsonl


def test_a_published_message_is_json_and_carries_ids_only(quiet_broker_url):
    enqueue_chunks("org/model", [("job_abc", 7)], quiet_broker_url)
    [raw] = redis.Redis.from_url(quiet_broker_url).lrange(queue_name("org/model"), 0, -1)
    message = json.loads(raw)
    assert message["content-type"] == "application/json" and message["headers"]["task"] == TASK_RUN_CHUNK
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == (["job_abc", 7], {})


def test_the_app_refuses_to_decode_a_pickled_body():
    accept = prepare_accept_content(app.conf.accept_content)  # as Celery's consumer does
    content_type, encoding, body = dumps(("job", 1), serializer="pickle")
    with pytest.raises(ContentDisallowed):
        loads(body, content_type, encoding, accept=accept)
    content_type, encoding, body = dumps(("job", 1), serializer="json")
    assert loads(body, content_type, encoding, accept=accept) == ["job", 1]


@pytest.mark.slow
def test_a_running_task_stays_unacked_and_the_worker_reserves_no_second_message(sqlite_url, broker_url, tmp_path):
    """Late acks and prefetch 1, seen in Redis: while a chunk's task is held up (the database is
    locked), its message is the only one taken, and it is still unacknowledged."""
    runner = CliRunner()
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"a b {i}", "max_tokens": 2} for i in range(6)])
    job_id = runner.invoke(cli, ["--database-url", sqlite_url, "--broker-url", broker_url, "submit", str(path)],
                           env={"LLMBATCH_CHUNK_SIZE": "2"}).stdout.strip()
    client = redis.Redis.from_url(broker_url)
    queue = queue_name("smollm2-135m-instruct")
    assert client.llen(queue) == 3
    locker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # the worker can read, but its claim waits
    log = tmp_path / "w.log"
    w = start_worker(sqlite_url, broker_url, log, env={"LLMBATCH_ENGINE": "echo"})
    try:
        deadline = time.monotonic() + 90
        while client.hlen("unacked") < 1:
            assert time.monotonic() < deadline and w.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(3)  # time enough for a worker with a larger prefetch to take more
        assert client.hlen("unacked") == 1 and client.llen(queue) == 2, "more than one message taken"
        locker.execute("ROLLBACK")
        invoke = lambda *a: runner.invoke(cli, ["--database-url", sqlite_url, "--broker-url", broker_url, *a])  # noqa
        status = wait_for_status(invoke, job_id, timeout=60, proc=w, log_path=log)
        deadline = time.monotonic() + 30
        while client.hlen("unacked") or client.llen(queue):
            assert time.monotonic() < deadline, "messages left unacknowledged after the job completed"
            time.sleep(0.2)
    finally:
        locker.close()
        stop_worker(w)
    assert status["succeeded"] == 6
    assert "ECHO" in log.read_text()  # the banner says it is the echo engine


def test_queue_names_are_readable_and_distinct_for_every_model_name():
    names = ["smollm2-135m-instruct", "meta-llama/Llama-3.1-8B-Instruct", "meta-llama_Llama-3.1-8B-Instruct",
             "a/b", "a_b", "a b", "/models/My Model", "/models/My_Model", "x" * 300, "x" * 299 + "y"]
    queues = [queue_name(n) for n in names]
    assert len(set(queues)) == len(names), "two models share a queue"
    assert queue_name("meta-llama/Llama-3.1-8B-Instruct").startswith("llmbatch.meta-llama_Llama-3.1-8B-Instruct.")
    assert all(q == queue_name(n) for q, n in zip(queues, names))  # stable: submit and worker agree
    assert all(len(q) < 200 and " " not in q and "/" not in q for q in queues)


def test_task_is_registered_under_a_stable_name():
    import llmbatch.worker.tasks  # noqa: F401

    assert TASK_RUN_CHUNK in app.tasks
    assert app.tasks[TASK_RUN_CHUNK].acks_late is True
