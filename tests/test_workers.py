"""Workers you can see (jobs/workers.py): registration, heartbeats by the database's clock, and
what uses them: `llmbatch workers`, `status`, the submit and batch-create warnings, /v1/models,
the dashboard. Also the fast checks of a model name (worker/engines.check_model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from llmbatch.jobs import service, workers
from llmbatch.jobs.cli import cli
from llmbatch.jobs.models import Worker
from llmbatch.jobs.settings import Settings
from llmbatch.jobs.work import db_time
from tests.support import start_worker, stop_worker, write_jsonl


def _me(i=1, model="org/served"):
    return workers.Presence(id=f"host{i}:{100 + i}", host=f"host{i}", pid=100 + i, gpu="cuda:0 NVIDIA H200",
                            model=model, engine="model")


def _age(db, worker_id, seconds):
    with db.write() as s:
        s.execute(update(Worker).where(Worker.id == worker_id).values(last_seen=db_time(s, -seconds)))


def test_a_worker_is_live_while_its_heartbeat_is_fresh_by_the_database_clock(db):
    with db.write() as s:
        workers.register(s, _me(1), ["org/lora-a"])
        workers.register(s, _me(2, "org/other"))
    with db.read() as s:
        live = workers.list_workers(s)
        assert sorted(w.id for w, _ in live) == ["host1:101", "host2:102"] and all(ok for _, ok in live)
        assert workers.served(s) == {"org/other": [], "org/served": ["org/lora-a"]}
    _age(db, "host2:102", workers.LIVE_SECONDS + 5)  # missed three heartbeats
    with db.read() as s:
        assert [w.id for w, _ in workers.list_workers(s)] == ["host1:101"]
        assert {w.id: ok for w, ok in workers.list_workers(s, include_gone=True)} == {"host1:101": True,
                                                                                    "host2:102": False}
    with db.write() as s:
        assert workers.heartbeat(s, "host2:102", ["org/lora-b"])  # back
    with db.read() as s:
        assert workers.served(s) == {"org/other": ["org/lora-b"], "org/served": ["org/lora-a"]}
    with db.write() as s:
        workers.unregister(s, "host1:101")
        assert not workers.heartbeat(s, "host1:101")  # gone: the worker registers again
    _age(db, "host2:102", workers.FORGET_SECONDS + 5)
    with db.write() as s:
        workers.register(s, _me(3))  # forgets the long dead
    with db.read() as s:
        assert [w.id for w, _ in workers.list_workers(s, include_gone=True)] == ["host3:103"]


def _invoke(db_url, *args):
    return CliRunner().invoke(cli, ["--database-url", db_url, "--broker-url", os.environ.get(
        "LLMBATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379") + "/10", *map(str, args)])


def test_cli_lists_workers_and_submit_warns_when_no_live_worker_serves_the_model(db, db_url, tmp_path):
    with db.write() as s:
        workers.register(s, _me(1), ["org/lora-a"])
    out = _invoke(db_url, "workers", "--json")
    assert out.exit_code == 0, out.output
    [row] = json.loads(out.output)
    assert (row["id"], row["model"], row["gpu"], row["adapters"], row["live"]) == (
        "host1:101", "org/served", "cuda:0 NVIDIA H200", ["org/lora-a"], True)
    assert row["started_at"] and row["last_seen"]
    table = _invoke(db_url, "workers").output
    assert "host1:101" in table and "org/served" in table and "org/lora-a" in table
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    typo = _invoke(db_url, "submit", path, "--model", "org/typo")
    assert typo.exit_code == 0  # stored, and waits
    job_id = typo.stdout.strip()
    assert job_id.startswith("job_")
    assert "no live worker serves model 'org/typo'" in typo.stderr and "org/served" in typo.stderr
    served = _invoke(db_url, "submit", path, "--model", "org/served")
    assert served.exit_code == 0 and "warning" not in served.stderr
    status = _invoke(db_url, "status", job_id)
    assert status.exit_code == 0 and "no live worker serves model 'org/typo'" in status.stderr
    table = _invoke(db_url, "status").stdout
    assert table.rstrip().splitlines()[-1] == "workers: 1 on org/served"
    _age(db, "host1:101", workers.LIVE_SECONDS + 5)
    assert _invoke(db_url, "status").stdout.rstrip().splitlines()[-1].startswith("workers: none live")
    assert _invoke(db_url, "workers").output.startswith("no live workers")
    assert "(gone)" in _invoke(db_url, "workers", "--all").output


def _client(db_url, quiet_broker_url, tmp_path):
    import httpx
    from fastapi.testclient import TestClient

    from llmbatch.jobs.api.app import create_app

    settings = Settings.from_env(database_url=db_url, broker_url=quiet_broker_url, files_dir=tmp_path / "files")
    (tmp_path / "files").mkdir(exist_ok=True)
    return settings, TestClient(create_app(settings, [], ingest=False))


def test_v1_models_lists_what_live_workers_serve_and_a_batch_for_another_model_warns(
        db, db_url, quiet_broker_url, tmp_path):
    import openai

    with db.write() as s:
        workers.register(s, _me(1), ["org/lora-a"])
        workers.register(s, _me(2), ["org/lora-a", "org/lora-b"])  # same model twice: listed once
    settings, http = _client(db_url, quiet_broker_url, tmp_path)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http)
    models = client.models.list()
    assert [m.id for m in models.data] == ["org/served", "org/lora-a", "org/lora-b"]
    assert all(m.object == "model" and m.owned_by == "llmbatch" for m in models.data)
    assert [m.model_extra["parent"] for m in models.data] == [None, "org/served", "org/served"]
    f = client.files.create(file=("in.jsonl", b'{"prompt": "hi"}\n'), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                                  extra_body={"model": "org/nobody"})
    assert batch.status == "validating" and batch.errors is not None
    [err] = batch.errors.data
    assert err.code == "model_not_served" and "org/nobody" in err.message and "org/served" in err.message
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                                  extra_body={"model": "org/served"})
    assert batch.errors is None
    page = http.get("/")
    assert page.status_code == 200 and "host1:101" in page.text and "org/lora-b" in page.text
    assert "no live worker serves it" in page.text  # the org/nobody batch's row
    _age(db, "host1:101", workers.LIVE_SECONDS + 5)
    _age(db, "host2:102", workers.LIVE_SECONDS + 5)
    assert client.models.list().data == []


def test_a_cancelled_batch_shows_cancelling_at(db, db_url, quiet_broker_url, tmp_path):
    from llmbatch.jobs import batches

    settings, http = _client(db_url, quiet_broker_url, tmp_path)
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    up = http.post("/v1/files", files={"file": ("in.jsonl", path.read_bytes())}, data={"purpose": "batch"}).json()
    batch = http.post("/v1/batches", json={"input_file_id": up["id"], "endpoint": "/v1/completions",
                                           "completion_window": "24h"}).json()
    assert batches.ingest(db, settings, batch["id"]) == "parsed"
    with db.write() as s:  # a worker holds it: the cancel waits for the running item
        from llmbatch.jobs import work
        from llmbatch.jobs.models import Chunk

        work.claim_chunk(s, s.query(Chunk.id).filter(Chunk.job_id == batch["id"]).scalar(), "w", 30)
    cancelling = http.post(f"/v1/batches/{batch['id']}/cancel").json()
    assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"] is not None
    assert cancelling["cancelled_at"] is None
    assert abs(cancelling["cancelling_at"] - time.time()) < 60


# -- model names ------------------------------------------------------------------------------------


def _cli_subprocess(args, env=None, timeout=60):
    full = {**os.environ, **(env or {})}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "llmbatch.jobs.cli", *args], capture_output=True, text=True,
                         env=full, timeout=timeout)
    return out, time.monotonic() - start


def test_a_model_name_that_cannot_load_fails_fast_with_the_bundled_names(tmp_path):
    from llmbatch.jobs import embeddings
    from llmbatch.jobs.exceptions import ModelUnavailable
    from llmbatch.worker.engine.loading import BUNDLED
    from llmbatch.worker.engines import BUNDLED_NAMES, check_model

    assert (*BUNDLED, *embeddings.BUNDLED) == BUNDLED_NAMES
    with pytest.raises(ModelUnavailable, match=r"did you mean 'smollm2-135m-instruct'"):
        check_model("smollm2-135m")
    with pytest.raises(ModelUnavailable, match=r"cannot load model '/no/such/dir': no model directory there \(bundled models: smollm2"):
        check_model("/no/such/dir")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        start = time.monotonic()
        with pytest.raises(ModelUnavailable, match=r"cannot load model 'no/such-model':.*hub .* is offline"):
            check_model("no/such-model")
        assert time.monotonic() - start < 2
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    check_model("smollm2-135m-instruct")
    check_model(str(tmp_path))  # a directory: loading tells whether it holds a model


def test_worker_with_a_typo_of_the_bundled_name_exits_at_once_with_a_hint(sqlite_url, quiet_broker_url):
    out, took = _cli_subprocess(["--database-url", sqlite_url, "--broker-url", quiet_broker_url, "worker",
                                 "--model", "smollm2-135m"])
    assert out.returncode == 1 and took < 30
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == ("Error: cannot load model 'smollm2-135m': neither a directory nor a bundled model; did you "
                         "mean 'smollm2-135m-instruct'? (bundled models: smollm2-135m-instruct, all-minilm-l6-v2)")
    assert "ready" not in out.stderr and "Traceback" not in out.stderr


def test_run_with_a_model_that_cannot_load_is_one_line_and_leaves_no_job_waiting(sqlite_url, quiet_broker_url,
                                                                                tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}, {"prompt": "ho"}])
    base = ["--database-url", sqlite_url, "--broker-url", quiet_broker_url]
    out, took = _cli_subprocess([*base, "run", str(path), "--model", "/no/such/dir"])
    assert out.returncode == 1 and took < 30
    assert out.stderr.strip().splitlines() == ["Error: cannot load model '/no/such/dir': no model directory there "
                                               "(bundled models: smollm2-135m-instruct, all-minilm-l6-v2)"]
    out, _ = _cli_subprocess([*base, "run", str(path), "--model", "no/such-model"], env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert json.loads(_cli_subprocess([*base, "status", "--json"])[0].stdout) == []  # no job was made
    # A directory that holds no model: the job is made, then marked failed (never left queued).
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    out, _ = _cli_subprocess([*base, "run", str(path), "--model", str(empty)])
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and lines[-1].startswith(f"Error: cannot load model '{empty}'")
    assert lines[-1].endswith("is marked failed)") and "Traceback" not in out.stderr
    [job] = json.loads(_cli_subprocess([*base, "status", "--json"])[0].stdout)
    assert (job["status"], job["failed"], job["pending"], job["running"]) == ("failed", 2, 0, 0)


@pytest.mark.slow
def test_a_worker_registers_once_loaded_and_leaves_when_stopped(sqlite_url, broker_url, tmp_path):
    log = tmp_path / "w.log"
    w = start_worker(sqlite_url, broker_url, log, "--engine", "echo", "--model", "org/echo-model")
    try:
        deadline = time.monotonic() + 60
        rows = []
        while time.monotonic() < deadline and not rows:
            out = _invoke(sqlite_url, "workers", "--json")
            rows = json.loads(out.output) if out.exit_code == 0 else []
            time.sleep(0.5)
        assert rows, log.read_text()
        [row] = rows
        assert row["model"] == "org/echo-model" and row["engine"] == "echo" and row["live"]
        text = log.read_text()
        assert "ready: model org/echo-model loaded" in text and " ready." not in text
    finally:
        stop_worker(w)
    assert json.loads(_invoke(sqlite_url, "workers", "--json", "--all").output) == []  # it removed its row


def test_submit_json_carries_the_warning_instead_of_stderr(db, db_url, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    out = _invoke(db_url, "submit", path, "--json", "--model", "org/nobody")
    assert out.exit_code == 0 and out.stderr == ""
    assert "no live worker serves model 'org/nobody'" in json.loads(out.stdout)["warning"]
