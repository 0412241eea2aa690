"""The HTTP API through the real `openai` SDK, against live `llmbatch serve` and `llmbatch worker` processes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import openai
import pytest
from openai.types import Batch, BatchError, Completion, FileObject
from openai.types.chat import ChatCompletion
from sqlalchemy import func, select

from llmbatch.jobs.db import Database
from llmbatch.jobs.models import File, Job
from tests.support import MIXED_BAD_LINES, MIXED_LINES, Server, start_worker, stop_worker, write_jsonl

pytestmark = pytest.mark.slow
FINAL = ("completed", "failed", "cancelled")
# Behaviour that does not depend on the backend runs on SQLite only (2 CPU cores in CI).
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def files_dir(tmp_path):
    d = tmp_path / "files"
    d.mkdir()
    return d


@pytest.fixture
def serve(db_url, broker_url, tmp_path, files_dir):
    """Start servers with extra environment; all are stopped at the end."""
    started = []

    def start(**env):
        server = Server(db_url, broker_url, tmp_path / f"serve{len(started)}.log",
                        env={"LLMBATCH_FILES_DIR": str(files_dir), **env})
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def echo_worker(db_url, broker_url, tmp_path):
    proc = start_worker(db_url, broker_url, tmp_path / "worker.log", "--engine", "echo")
    yield proc
    stop_worker(proc)


class Reply:
    def __init__(self, status: int, body: bytes):
        self.status_code, self.content = status, body
        self.text = body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


def http(method: str, url: str, content=None, headers: dict | None = None, auth: tuple | None = None) -> Reply:
    """A raw request, for what the SDK would never send (no key, a malformed body, a chunked upload)."""
    import base64
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    headers = dict(headers or {})
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        chunked = content is not None and not isinstance(content, bytes)
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=content, headers=headers,
                     encode_chunked=chunked)
        r = conn.getresponse()
        return Reply(r.status, r.read())
    finally:
        conn.close()


def wait_batch(client, batch_id, states=FINAL, timeout=120) -> Batch:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in states:
            return batch
        time.sleep(0.2)
    pytest.fail(f"batch {batch_id} still {batch.status} after {timeout}s")


def upload(client, path) -> FileObject:
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="batch")


def parse_output_line(line: str):
    """One output line, its body parsed by the SDK's own response types."""
    obj = json.loads(line)
    assert obj["error"] is None and obj["response"]["status_code"] == 200
    body = obj["response"]["body"]
    kind = ChatCompletion if body["object"] == "chat.completion" else Completion
    return obj["custom_id"], kind.model_validate(body)


def test_files_and_batch_round_trip(serve, echo_worker, tmp_path, db_url):
    server = serve()
    client = server.client()
    path = write_jsonl(tmp_path / "in.jsonl", MIXED_LINES)
    f = upload(client, path)
    assert f.purpose == "batch" and f.bytes == path.stat().st_size and f.filename == "in.jsonl"
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).content == path.read_bytes()

    created = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                    metadata={"run": "nightly"}, extra_body={"model": "smollm2-135m-instruct"})
    assert created.status == "validating" and created.metadata == {"run": "nightly"}
    batch = wait_batch(client, created.id)
    assert batch.status == "completed"
    assert batch.request_counts.total == len(MIXED_LINES)
    assert batch.request_counts.failed == len(MIXED_BAD_LINES)
    assert batch.request_counts.completed == len(MIXED_LINES) - len(MIXED_BAD_LINES)
    assert batch.model == "smollm2-135m-instruct" and batch.completed_at and batch.in_progress_at

    out = client.files.content(batch.output_file_id).text.splitlines()
    parsed = dict(parse_output_line(line) for line in out)
    assert set(parsed) == {"raw", "chat", "oa-chat", "oa-text", "line-9"}
    assert isinstance(parsed["oa-chat"], ChatCompletion) and parsed["oa-chat"].model == "gpt-4o"
    assert isinstance(parsed["oa-text"], Completion)
    assert parsed["oa-chat"].choices[0].message.content  # the echo engine echoes the prompt
    errors = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    assert len(errors) == len(MIXED_BAD_LINES)
    for e in errors:
        assert e["response"] is None
        err = BatchError.model_validate(e["error"])
        assert err.code == "invalid_input"
    assert any("invalid JSON" in e["error"]["message"] and "line 3" in e["error"]["message"] for e in errors)
    # A generated file's size is the size of its content.
    assert client.files.retrieve(batch.output_file_id).bytes == len("\n".join(out).encode()) + 1

    # The same job through the CLI's view: a batch is a job.
    with Database(db_url).read() as s:
        assert s.get(Job, batch.id).succeeded == batch.request_counts.completed

    # Deleting the input file keeps the batch and its results.
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    assert client.batches.retrieve(batch.id).output_file_id == batch.output_file_id


@SQLITE_ONLY
def test_list_pages_with_after_and_limit(serve, tmp_path):
    server = serve()
    client = server.client()
    f = upload(client, write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}]))
    ids = [client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h").id
           for _ in range(5)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    page2 = client.batches.list(limit=2, after=page.data[-1].id)
    assert [b.id for b in page2.data] == ids[::-1][2:4]
    assert [b.id for b in client.batches.list(limit=100)] == ids[::-1]
    # The SDK's auto-pagination follows `after` to the end.
    assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]
    with pytest.raises(openai.BadRequestError):
        client.batches.list(limit=0)


@SQLITE_ONLY
def test_cancel_like_the_cli(serve, tmp_path):
    server = serve()  # no worker: the items stay pending until cancelled
    client = server.client()
    f = upload(client, write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(6)] + ["{bad"]))
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    batch = wait_batch(client, batch.id, ("in_progress",))
    assert batch.request_counts.total == 7 and batch.request_counts.failed == 1
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    batch = wait_batch(client, batch.id, ("cancelled",))
    assert batch.cancelled_at and batch.output_file_id is None
    errors = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    assert [e["error"]["code"] for e in errors] == ["cancelled"] * 6 + ["invalid_input"]
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        client.batches.cancel(batch.id)


@SQLITE_ONLY
def test_bad_requests_are_400_and_unknown_ids_404(serve, tmp_path):
    server = serve()
    client = server.client()
    f = upload(client, write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}]))
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=f.id, endpoint="/v1/moderations", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="48h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("job_0000000000000000")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-job_0000000000000000-output")
    r = http("POST", server.url + "/v1/batches", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


@SQLITE_ONLY
def test_unusable_file_fails_the_batch(serve, tmp_path):
    server = serve()
    client = server.client()
    path = tmp_path / "in.jsonl"
    path.write_text("a,b,c\n1,2,3\n4,5,6\n7,8,9\n10,11,12\n13,14,15\n")
    batch = client.batches.create(input_file_id=upload(client, path).id, endpoint="/v1/completions",
                                  completion_window="24h")
    batch = wait_batch(client, batch.id)
    assert batch.status == "failed" and batch.failed_at
    assert "does not look like JSONL" in batch.errors.data[0].message


def test_a_batch_left_validating_by_a_dead_server_is_parsed_by_another(db_url, broker_url, tmp_path, files_dir,
                                                                       serve):
    """The server that took the request died before parsing: the batch is stored `validating`.
    A server started later finds it in its sweep and parses it."""
    from llmbatch.jobs import batches
    from llmbatch.jobs.files import Upload
    from llmbatch.jobs.settings import Settings

    settings = Settings.from_env(database_url=db_url, broker_url=broker_url, files_dir=files_dir)
    db = Database(db_url)
    db.ensure_schema()
    up = Upload(settings)
    up.write(b'{"prompt": "left behind"}\n{"prompt": "too"}\n')
    with db.write() as s:
        f = up.commit(s, filename="in.jsonl", purpose="batch", owner=None)
        job = batches.create_batch(s, settings, input_file_id=f.id, endpoint="/v1/completions",
                                   completion_window="24h", metadata=None, model=None, owner=None)
    server = serve()
    batch = wait_batch(server.client(), job.id, ("in_progress", "completed"), timeout=60)
    assert batch.request_counts.total == 2
    db.dispose()


def test_api_keys(serve, tmp_path, db_url, files_dir):
    keys = ["sk-alpha-0123456789abcdef", "sk-beta-fedcba9876543210"]
    server = serve(LLMBATCH_API_KEYS=",".join(keys))
    alice, bob = server.client(keys[0]), server.client(keys[1])
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "mine"}, "{bad"])

    with pytest.raises(openai.AuthenticationError):
        server.client("sk-wrong").batches.list()
    r = http("GET", server.url + "/v1/batches")  # no Authorization header at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for path_ in ("/", "/metrics", "/v1/files/x"):
        assert http("GET", server.url + path_).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        server.client("sk-wrong").files.create(file=open(path, "rb"), purpose="batch")
    assert not list(files_dir.iterdir())

    f = upload(alice, path)
    batch = alice.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    batch = wait_batch(alice, batch.id, ("in_progress",))
    # Bob sees none of it: everything is "not found", never "forbidden".
    for call in (lambda: bob.files.retrieve(f.id), lambda: bob.files.content(f.id), lambda: bob.files.delete(f.id),
                 lambda: bob.batches.retrieve(batch.id), lambda: bob.batches.cancel(batch.id),
                 lambda: bob.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h"),
                 lambda: bob.batches.list(after=batch.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert bob.batches.list().data == []
    r = http("GET", server.url + f"/jobs/{batch.id}", headers={"Authorization": f"Bearer {keys[1]}"})
    assert r.status_code == 404
    assert batch.id not in http("GET", server.url + "/", headers={"Authorization": f"Bearer {keys[1]}"}).text
    # Alice can; the dashboard takes her key as HTTP Basic too (what a browser sends).
    assert [b.id for b in alice.batches.list()] == [batch.id]
    assert batch.id in http("GET", server.url + "/", auth=("", keys[0])).text
    cancelled = alice.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    errors = alice.files.content(wait_batch(alice, batch.id).error_file_id).text
    with pytest.raises(openai.NotFoundError):
        bob.files.content(wait_batch(alice, batch.id).error_file_id)
    assert "cancelled" in errors

    # Only hashes are stored, and no key reaches the log.
    with Database(db_url).read() as s:
        owners = {s.get(Job, batch.id).owner, s.get(File, f.id).owner}
    assert owners == {hashlib.sha256(keys[0].encode()).hexdigest()}
    server.stop()
    log = server.log_path.read_text()
    assert "GET /v1/batches" in log
    assert not any(k in log for k in keys)


@SQLITE_ONLY
def test_uploads_over_the_limit_are_413_and_store_nothing(serve, tmp_path, db_url, files_dir):
    server = serve(LLMBATCH_MAX_FILE_BYTES="1000")
    client = server.client()
    big = write_jsonl(tmp_path / "big.jsonl", [{"prompt": "x" * 100}] * 30)  # about 3.5 kB
    with pytest.raises(openai.APIStatusError) as exc:
        upload(client, big)
    assert exc.value.status_code == 413
    # Without a Content-Length (a chunked body), the limit is found while streaming.
    boundary = "b0undary"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
               "Content-Type: application/jsonl\r\n\r\n").encode()
        for _ in range(10):
            yield b'{"prompt": "' + b"y" * 300 + b'"}\n'
        yield f"\r\n--{boundary}--\r\n".encode()

    r = http("POST", server.url + "/v1/files", content=body(),
                   headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text
    assert "larger than 1000 bytes" in r.json()["error"]["message"]
    assert list(files_dir.iterdir()) == []
    with Database(db_url).read() as s:
        assert s.scalar(select(func.count()).select_from(File)) == 0
    # Just under the limit is fine.
    small = write_jsonl(tmp_path / "small.jsonl", [{"prompt": "x" * 100}] * 8)
    assert upload(client, small).bytes == small.stat().st_size


@SQLITE_ONLY
def test_malformed_uploads_are_400_and_store_nothing(serve, tmp_path, db_url, files_dir):
    server = serve()
    client = server.client()
    good = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    with pytest.raises(openai.BadRequestError, match="purpose must be 'batch'"):
        client.files.create(file=open(good, "rb"), purpose="fine-tune")
    cases = {
        "no boundary": ({"content-type": "multipart/form-data"}, b"x"),
        "not multipart": ({"content-type": "application/json"}, b"{}"),
        "truncated": ({"content-type": "multipart/form-data; boundary=zz"},
                      b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{"prompt"'),
        "garbage": ({"content-type": "multipart/form-data; boundary=zz"}, b"this is not multipart at all\r\n"),
        "no file part": ({"content-type": "multipart/form-data; boundary=zz"},
                         b'--zz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--zz--\r\n'),
        "no purpose": ({"content-type": "multipart/form-data; boundary=zz"},
                       b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
                       b'{"prompt": "x"}\n\r\n--zz--\r\n'),
    }
    for name, (headers, body) in cases.items():
        r = http("POST", server.url + "/v1/files", content=body, headers=headers)
        assert r.status_code == 400, (name, r.status_code, r.text)
        assert r.json()["error"]["message"], name
    assert list(files_dir.iterdir()) == []
    with Database(db_url).read() as s:
        assert s.scalar(select(func.count()).select_from(File)) == 0


@SQLITE_ONLY
def test_metrics(serve, tmp_path, broker_url):
    server = serve()
    client = server.client()
    f = upload(client, write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(3)] + ["{bad"]))
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                                  extra_body={"model": "metrics-model"})
    wait_batch(client, batch.id, ("in_progress",))
    from llmbatch.worker.app import queue_name

    queue = queue_name("metrics-model")  # a readable slug plus a hash
    # The chunk is published just after the parse commits (which makes the batch in_progress).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = http("GET", server.url + "/metrics").text
        if f'queue="{queue}"}} 0.0' not in text:
            break
        time.sleep(0.2)
    assert 'llmbatch_items{model="metrics-model",state="pending"} 3.0' in text
    assert 'llmbatch_items{model="metrics-model",state="failed"} 1.0' in text
    assert 'llmbatch_tokens_total{kind="completion",model="metrics-model"} 0.0' in text
    # No worker takes this model: its one chunk (chunks of 1024) waits in its Redis list.
    assert f'llmbatch_queue_depth{{model="metrics-model",queue="{queue}"}} 1.0' in text
    assert "llmbatch_broker_up 1.0" in text


def test_serve_refuses_a_public_address_without_keys(tmp_path):
    env = {"LLMBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "LLMBATCH_API_KEYS": ""}
    import os

    r = subprocess.run([sys.executable, "-m", "llmbatch.jobs.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "refusing to serve on 0.0.0.0 without API keys" in r.stderr and "Traceback" not in r.stderr


def test_server_does_not_import_torch(tmp_path):
    code = ("import sys; from llmbatch.jobs.api.app import create_app; from llmbatch.jobs.settings import Settings; "
            f"create_app(Settings.from_env(database_url='sqlite:///{tmp_path / 'x.db'}'), []); "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_real_model_end_to_end(tmp_path, sqlite_url, broker_url, files_dir):
    """The bundled SmolLM2 through the API: upload, batch, a real worker, results in OpenAI's shapes."""
    server = Server(sqlite_url, broker_url, tmp_path / "serve.log", env={"LLMBATCH_FILES_DIR": str(files_dir)})
    worker = start_worker(sqlite_url, broker_url, tmp_path / "worker.log")
    try:
        client = server.client()
        lines = [{"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "x", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 5,
                           "temperature": 0}},
                 {"custom_id": "text", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "x", "prompt": "1, 2, 3,", "max_tokens": 4}}]
        f = upload(client, write_jsonl(tmp_path / "in.jsonl", lines))
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        batch = wait_batch(client, batch.id, timeout=300)
        assert batch.status == "completed" and batch.request_counts.completed == 2, batch
        assert batch.error_file_id is None
        parsed = dict(parse_output_line(line) for line in client.files.content(batch.output_file_id).text.splitlines())
        chat, text = parsed["chat"], parsed["text"]
        assert chat.choices[0].message.content and 0 < chat.usage.completion_tokens <= 5
        assert text.choices[0].text and 0 < text.usage.completion_tokens <= 4
        assert batch.usage.output_tokens == chat.usage.completion_tokens + text.usage.completion_tokens
    finally:
        stop_worker(worker)
        server.stop()
