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
from llmbatch.jobs.models import Batch as BatchRow
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
    # issue 20: line 6 (oa-text) names url /v1/completions in a /v1/chat/completions batch: a bad line.
    bad = len(MIXED_BAD_LINES) + 1
    assert batch.request_counts.total == len(MIXED_LINES)
    assert batch.request_counts.failed == bad
    assert batch.request_counts.completed == len(MIXED_LINES) - bad
    assert batch.model == "smollm2-135m-instruct" and batch.completed_at and batch.in_progress_at

    out = client.files.content(batch.output_file_id).text.splitlines()
    parsed = dict(parse_output_line(line) for line in out)
    assert set(parsed) == {"raw", "chat", "oa-chat", "line-9"}
    # issue 20: body.model is the model that ran, not the line's "gpt-4o".
    assert isinstance(parsed["oa-chat"], ChatCompletion) and parsed["oa-chat"].model == "smollm2-135m-instruct"
    assert all(c.model == "smollm2-135m-instruct" for c in parsed.values())
    assert parsed["oa-chat"].choices[0].message.content  # the echo engine echoes the prompt
    errors = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    assert len(errors) == bad
    for e in errors:
        assert e["response"] is None
        err = BatchError.model_validate(e["error"])
        assert err.code == "invalid_input"
    assert any("invalid JSON" in e["error"]["message"] and "line 3" in e["error"]["message"] for e in errors)
    mismatch = next(e for e in errors if e["custom_id"] == "oa-text")["error"]["message"]
    assert mismatch == ("line 6: url '/v1/completions' does not match the batch's endpoint "
                        "'/v1/chat/completions'")
    # A generated file's size is the size of its content.
    assert client.files.retrieve(batch.output_file_id).bytes == len("\n".join(out).encode()) + 1
    # issue 20: measured once the batch is finished and stored on its row; a request reads it.
    error_bytes = len(client.files.content(batch.error_file_id).content)
    assert client.files.retrieve(batch.error_file_id).bytes == error_bytes
    with Database(db_url).read() as s:
        row = s.get(BatchRow, batch.id)
        assert (row.output_bytes, row.error_bytes) == (len("\n".join(out).encode()) + 1, error_bytes)
        assert row.sized_for == s.get(Job, batch.id).finished_at
    with Database(db_url).write() as s:
        s.get(BatchRow, batch.id).output_bytes = 7  # not the real size: shows where the answer comes from
    assert client.files.retrieve(batch.output_file_id).bytes == 7

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
        # Greedy SmolLM2 answers this in a few tokens and ends its turn (finish_reason "stop").
        ask = "What is 2+2? Answer with just the number."
        lines = [{"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "x", "messages": [{"role": "user", "content": ask}], "max_tokens": 24,
                           "temperature": 0, "logprobs": True, "top_logprobs": 2}},
                 {"custom_id": "chat2", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "x", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}}]
        f = upload(client, write_jsonl(tmp_path / "in.jsonl", lines))
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        batch = wait_batch(client, batch.id, timeout=300)
        assert batch.status == "completed" and batch.request_counts.completed == 2, batch
        assert batch.error_file_id is None
        parsed = dict(parse_output_line(line) for line in client.files.content(batch.output_file_id).text.splitlines())
        chat, chat2 = parsed["chat"], parsed["chat2"]
        assert chat.model == chat2.model == "smollm2-135m-instruct"  # what ran, not the lines' "x"
        assert chat.choices[0].message.content and chat.choices[0].finish_reason == "stop"
        assert 0 < chat.usage.completion_tokens <= 24
        # issue 20: logprobs.content covers the message, not the end-of-turn token that ended it.
        tokens = [t.token for t in chat.choices[0].logprobs.content]
        assert "<|im_end|>" not in tokens and len(tokens) == chat.usage.completion_tokens - 1
        assert "".join(tokens).strip() == chat.choices[0].message.content.strip()
        assert chat2.choices[0].message.content and 0 < chat2.usage.completion_tokens <= 4
        assert batch.usage.output_tokens == chat.usage.completion_tokens + chat2.usage.completion_tokens
    finally:
        stop_worker(worker)
        server.stop()


# -- issue 20: isolation and limits ---------------------------------------------------------------------

KEYS = ["sk-alpha-0123456789abcdef", "sk-beta-fedcba9876543210"]
ADMIN_KEY = "sk-operator-00112233445566"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def owned_job(db_url, broker_url, tmp_path, key: str, name: str, model: str, lines: list) -> str:
    """A named job of the given key, stored through the library (the API gives batches no name)."""
    from llmbatch.jobs import service
    from llmbatch.jobs.files import owner_of
    from llmbatch.jobs.settings import Settings

    settings = Settings.from_env(database_url=db_url, broker_url=broker_url)
    path = write_jsonl(tmp_path / f"{name}-{time.monotonic_ns()}.jsonl", lines)
    db = Database(db_url)
    with db.write() as s, open(path, "rb") as fp:
        job = service.submit(s, fp, settings, model=model, name=name).job
        job.owner = owner_of(key)
        job_id = job.id
    db.dispose()
    return job_id


@SQLITE_ONLY
def test_every_job_lookup_is_owner_scoped_names_included(serve, tmp_path, db_url, broker_url):
    server = serve(LLMBATCH_API_KEYS=",".join(KEYS), LLMBATCH_ADMIN_KEYS=ADMIN_KEY)
    alice, bob = KEYS
    a1 = owned_job(db_url, broker_url, tmp_path, alice, "eval", "alice-model", [{"prompt": "a"}])
    a2 = owned_job(db_url, broker_url, tmp_path, alice, "eval", "alice-model", [{"prompt": "b"}])
    b1 = owned_job(db_url, broker_url, tmp_path, bob, "eval", "bob-model", [{"prompt": "c"}])
    b2 = owned_job(db_url, broker_url, tmp_path, bob, "bob-solo", "bob-model", [{"prompt": "d"}, "{bad"])

    def page(key, ref):
        return http("GET", server.url + f"/jobs/{ref}", headers=bearer(key))

    # Bob's one job named "eval" opens by name: Alice's two of that name are not his to see.
    r = page(bob, "eval")
    assert r.status_code == 200 and b1 in r.text and a1 not in r.text
    # Opened by name, the page lists the job's failed lines (it looked them up by the name before).
    r = page(bob, "bob-solo")
    assert r.status_code == 200 and b2 in r.text and "invalid JSON" in r.text, r.text
    # A name two of Alice's jobs share: 409 in OpenAI's shape, listing her jobs only.
    r = page(alice, "eval")
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["code"] == "ambiguous_name" and a1 in err["message"] and a2 in err["message"]
    assert b1 not in err["message"] and "2 jobs" in err["message"]
    for ref in (b1, b2, "bob-solo"):  # another key's job, by id or by name: not found
        assert page(alice, ref).status_code == 404

    # /metrics: a key sees its own totals only, and no queue depths (a queue holds everyone's work) ...
    mine = http("GET", server.url + "/metrics", headers=bearer(bob)).text
    assert 'llmbatch_items{model="bob-model",state="pending"} 2.0' in mine
    assert 'llmbatch_items{model="bob-model",state="failed"} 1.0' in mine
    assert "alice-model" not in mine and "llmbatch_queue_depth{" not in mine
    # ... an operator key sees every owner's, and the queues.
    everything = http("GET", server.url + "/metrics", headers=bearer(ADMIN_KEY)).text
    assert 'llmbatch_items{model="alice-model",state="pending"} 2.0' in everything
    assert 'llmbatch_items{model="bob-model",state="pending"} 2.0' in everything
    assert 'llmbatch_queue_depth{model="alice-model"' in everything
    # An operator key is an API key too, owning what it makes.
    assert server.client(ADMIN_KEY).batches.list().data == []


def _multipart(boundary: str, fields: list[tuple[str, str]], file: bytes = b'{"prompt": "x"}\n') -> bytes:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n{v}\r\n'.encode() for n, v in fields]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n\r\n'.encode()
                 + file + f"\r\n--{boundary}--\r\n".encode())
    return b"".join(parts)


@SQLITE_ONLY
def test_upload_fields_are_capped_in_count_and_bytes(serve, db_url, files_dir):
    server = serve(LLMBATCH_MAX_FILE_BYTES="100000")
    headers = {"content-type": "multipart/form-data; boundary=zz"}
    ok = http("POST", server.url + "/v1/files", content=_multipart("zz", [("purpose", "batch")]), headers=headers)
    assert ok.status_code == 200, ok.text
    many = [("purpose", "batch")] + [(f"f{i}", "x") for i in range(16)]  # 17 fields besides the file
    r = http("POST", server.url + "/v1/files", content=_multipart("zz", many), headers=headers)
    assert r.status_code == 400 and "too many form fields" in r.json()["error"]["message"], r.text
    heavy = [("purpose", "batch")] + [(f"f{i}", "y" * 40_000) for i in range(2)]  # each under 64 KiB, not together
    r = http("POST", server.url + "/v1/files", content=_multipart("zz", heavy), headers=headers)
    assert r.status_code == 400 and "more than 65536 bytes together" in r.json()["error"]["message"], r.text

    def endless_fields():  # chunked: no Content-Length to refuse up front (300 fields of 64 KiB were taken)
        yield b'--zz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        for i in range(300):
            yield f'--zz\r\nContent-Disposition: form-data; name="pad{i}"\r\n\r\n'.encode() + b"p" * 1000 + b"\r\n"
        yield b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{"prompt": "x"}\n\r\n--zz--\r\n'

    r = http("POST", server.url + "/v1/files", content=endless_fields(), headers=headers)
    assert r.status_code == 400 and "too many form fields" in r.json()["error"]["message"], r.text
    assert [p.name for p in files_dir.iterdir()] == [ok.json()["id"]]  # the refused ones left nothing
    with Database(db_url).read() as s:
        assert s.scalar(select(func.count()).select_from(File)) == 1


@SQLITE_ONLY
def test_stale_partial_uploads_are_swept_at_start_up(serve, files_dir):
    import os

    stale, fresh, stored = files_dir / ".upload-0badc0de", files_dir / ".upload-f00d", files_dir / "file-kept"
    for p in (stale, fresh, stored):
        p.write_bytes(b'{"prompt": "x"}\n')
    hour_ago = time.time() - 3600
    for p in (stale, stored):
        os.utime(p, (hour_ago, hour_ago))
    serve()
    assert not stale.exists()  # a dead server's partial upload
    assert fresh.exists()  # may be another live server's upload in progress (a shared directory)
    assert stored.exists()  # a stored file is never a temp file


@SQLITE_ONLY
def test_a_per_key_storage_quota_is_413_in_openai_shape(serve, tmp_path, files_dir):
    server = serve(LLMBATCH_API_KEYS=",".join(KEYS), LLMBATCH_MAX_STORAGE_BYTES_PER_KEY="1000")
    alice, bob = server.client(KEYS[0]), server.client(KEYS[1])
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x" * 580}])  # about 600 bytes
    first = upload(alice, path)
    with pytest.raises(openai.APIStatusError) as exc:
        upload(alice, path)  # 1200 bytes would be stored
    assert exc.value.status_code == 413
    err = exc.value.body
    assert err["code"] == "storage_quota_exceeded" and err["type"] == "invalid_request_error"
    assert err["param"] == "file" and "at most 1000 bytes" in err["message"]
    assert upload(bob, path).bytes == first.bytes  # the quota is per key
    alice.files.delete(first.id)
    assert upload(alice, path).bytes == first.bytes  # room again
    assert not [p for p in files_dir.iterdir() if p.name.startswith(".upload-")]


# -- issue 20: OpenAI parity ----------------------------------------------------------------------------


@SQLITE_ONLY
def test_files_list_pages_filters_and_orders(serve, tmp_path):
    server = serve(LLMBATCH_API_KEYS=",".join(KEYS))
    alice, bob = server.client(KEYS[0]), server.client(KEYS[1])
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    ids = [upload(alice, path).id for _ in range(5)]
    page = alice.files.list(limit=2)
    assert [f.id for f in page.data] == ids[::-1][:2] and page.has_more
    assert [f.id for f in alice.files.list(limit=2)] == ids[::-1]  # the SDK's auto-pagination follows `after`
    assert [f.id for f in alice.files.list(order="asc")] == ids
    assert [f.id for f in alice.files.list(order="asc", after=ids[1], limit=2).data] == ids[2:4]
    assert [f.id for f in alice.files.list(purpose="batch")] == ids[::-1]
    assert alice.files.list(purpose="batch_output").data == []
    assert bob.files.list().data == []  # owner-scoped
    with pytest.raises(openai.NotFoundError):
        bob.files.list(after=ids[0])
    with pytest.raises(openai.BadRequestError, match="order"):
        alice.files.list(order="sideways")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="limit"):
        alice.files.list(limit=0)


def _is_openai_error(body: dict) -> bool:
    return set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}


@SQLITE_ONLY
def test_health_readiness_and_the_error_shape_of_framework_errors(serve, tmp_path):
    from tests.support import free_port

    server = serve(LLMBATCH_API_KEYS=KEYS[0])
    assert http("GET", server.url + "/healthz").json() == {"status": "ok"}  # probes need no key
    ready = http("GET", server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    client = server.client(KEYS[0])
    with pytest.raises(openai.NotFoundError) as exc:  # no such route
        client.get("/no/such/route", cast_to=object)
    assert _is_openai_error(exc.value.response.json()) and exc.value.code == "unknown_url"
    with pytest.raises(openai.APIStatusError) as exc:  # a route, not that method
        client.delete("/batches", cast_to=object)
    assert exc.value.status_code == 405 and _is_openai_error(exc.value.response.json())
    with pytest.raises(openai.BadRequestError) as exc:  # what FastAPI answers 422 for
        client.get("/batches", cast_to=object, options={"params": {"limit": "many"}})
    assert _is_openai_error(exc.value.response.json()) and exc.value.param == "limit"
    r = http("GET", server.url + "/v1/batches")  # 401 too
    assert r.status_code == 401 and _is_openai_error(r.json())

    down = serve(LLMBATCH_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    r = http("GET", down.url + "/readyz")
    assert r.status_code == 503 and r.json()["checks"] == {"database": "ok", "broker": "down"}
    assert r.json()["error"]["code"] == "not_ready" and "broker unreachable" in r.json()["error"]["message"]
