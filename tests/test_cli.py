"""The command line, driven through CliRunner against real Redis, SQLite and PostgreSQL."""

import base64
import json
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from llmbatch.jobs.cli import cli
from llmbatch.jobs.settings import DEFAULT_MODEL
from llmbatch.worker.app import queue_name
from tests.support import write_jsonl

ROOT = Path(__file__).resolve().parent.parent
STATUS_FIELDS = {"id", "status", "model", "total", "pending", "running", "succeeded", "failed", "cancelled",
                 "prompt_tokens", "completion_tokens", "created_at", "started_at", "finished_at"}


@pytest.fixture
def broker_url(quiet_broker_url):
    return quiet_broker_url


@pytest.fixture
def invoke(db_url, broker_url):
    runner = CliRunner()

    def run(*args, env=None):
        return runner.invoke(cli, ["--database-url", db_url, "--broker-url", broker_url, *map(str, args)],
                             env={"LLMBATCH_CHUNK_SIZE": "2", **(env or {})}, catch_exceptions=False)

    return run


def _queued_messages(broker_url, model=DEFAULT_MODEL):
    client = redis.Redis.from_url(broker_url)
    raw = client.lrange(queue_name(model), 0, -1)
    return [json.loads(base64.b64decode(json.loads(m)["body"])) for m in raw]


def test_submit_stores_and_queues_ids_only(invoke, broker_url, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"secret prompt {i}"} for i in range(5)])
    result = invoke("submit", path, "--max-tokens", 9, "--name", "nightly")
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    assert job_id.startswith("job_")
    messages = _queued_messages(broker_url)
    assert len(messages) == 3  # 5 items, chunks of 2
    for args, kwargs, _embed in messages:
        assert args[0] == job_id and isinstance(args[1], int) and kwargs == {}
    assert b"secret prompt" not in b"".join(redis.Redis.from_url(broker_url).lrange(queue_name(DEFAULT_MODEL), 0, -1))
    status = json.loads(invoke("status", job_id, "--json").stdout)
    assert STATUS_FIELDS <= set(status)
    assert status["status"] == "queued" and status["pending"] == 5 and status["total"] == 5


def test_submit_json_and_model_queue(invoke, broker_url, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    result = invoke("submit", path, "--json", "--model", "org/Other-Model")
    info = json.loads(result.stdout)
    assert info["model"] == "org/Other-Model" and info["chunks"] == 1
    assert len(_queued_messages(broker_url, "org/Other-Model")) == 1
    assert _queued_messages(broker_url, "org_Other-Model") == []  # a look-alike name is another queue
    assert _queued_messages(broker_url) == []


def test_submit_with_bad_lines_reports_them(invoke, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "ok"}, "nope", {"prompt": "ok", "temperature": "hot"}])
    result = invoke("submit", path)
    assert result.exit_code == 0
    assert "2 bad line(s)" in result.stderr
    strict = invoke("submit", path, "--strict")
    assert strict.exit_code == 1
    assert "line 2:" in strict.stderr and "line 3:" in strict.stderr and "nothing was stored" in strict.stderr


def test_submit_when_the_broker_is_down_keeps_the_job_and_retry_queues_it(db_url, broker_url, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
    runner = CliRunner()
    down = runner.invoke(cli, ["--database-url", db_url, "--broker-url", "redis://:hunter2@127.0.0.1:1/0",
                               "submit", str(path)])
    assert down.exit_code == 1
    assert "is stored" in down.stderr and "llmbatch retry" in down.stderr
    assert "hunter2" not in down.output
    job_id = down.stderr.split("job ")[1].split()[0]
    up = runner.invoke(cli, ["--database-url", db_url, "--broker-url", broker_url, "retry", job_id])
    assert up.exit_code == 0, up.output
    assert len(_queued_messages(broker_url)) == 1


def test_status_table_and_unknown_job(invoke, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    job_id = invoke("submit", path).stdout.strip()
    table = invoke("status")
    assert table.exit_code == 0 and job_id in table.stdout and "queued" in table.stdout
    missing = invoke("status", "job_nope")
    assert missing.exit_code == 1 and "no job with id 'job_nope'" in missing.stderr


def test_cancel_and_export(invoke, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}, "bad", {"prompt": "y"}])
    job_id = invoke("submit", path).stdout.strip()
    result = invoke("cancel", job_id)
    assert result.exit_code == 0 and "cancelled" in result.stdout
    out = tmp_path / "out.csv"
    assert invoke("export", job_id, "-o", out, "--format", "csv").exit_code == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("custom_id,line,status") and len(lines) == 4
    rows = [json.loads(line) for line in invoke("export", job_id).stdout.splitlines()]
    assert [r["status"] for r in rows] == ["cancelled", "failed", "cancelled"]
    assert invoke("cancel", job_id).exit_code == 1


def test_validate_reports_every_bad_line(invoke, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}, "{", {"messages": "no"}])
    result = invoke("validate", bad)
    assert result.exit_code == 1
    assert "line 2:" in result.stdout and "line 3:" in result.stdout and "2 of 3" in result.stderr
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "x"}])
    assert invoke("validate", good).exit_code == 0


def test_usage_errors_exit_2(invoke):
    assert invoke("export", "job_x", "--format", "xml").exit_code == 2


@pytest.mark.slow
def test_run_on_the_example_file_exports_every_line(tmp_path, sqlite_url):
    out = tmp_path / "results.jsonl"
    result = CliRunner().invoke(cli, ["--database-url", sqlite_url, "run", str(ROOT / "examples" / "prompts.jsonl"),
                                      "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    inputs = (ROOT / "examples" / "prompts.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(inputs)
    assert [r["custom_id"] for r in rows] == [json.loads(line).get("custom_id") for line in inputs]
    for row in rows:
        assert row["status"] == "succeeded", row
        assert row["output"] and row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
        assert row["finish_reason"] in ("stop", "length")
    assert "items" in result.stderr and "tok/s" in result.stderr


def test_response_format_flags_set_the_job_default(invoke, db_url, tmp_path):
    # issue 10: --response-format json / --json-schema FILE; flags share the lines' checks.
    from llmbatch.jobs.db import Database
    from llmbatch.jobs.models import Job

    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
    schema_file = tmp_path / "person.schema.json"
    schema_file.write_text(json.dumps(schema))
    by_schema = json.loads(invoke("submit", path, "--json", "--json-schema", schema_file).output)["id"]
    by_json = json.loads(invoke("submit", path, "--json", "--response-format", "json").output)["id"]
    db = Database(db_url)
    with db.read() as s:
        assert s.get(Job, by_schema).params == {"response_format": {
            "type": "json_schema", "json_schema": {"name": "person_schema", "schema": schema, "strict": True}}}
        assert s.get(Job, by_json).params == {"response_format": {"type": "json_object"}}
    db.dispose()

    both = invoke("submit", path, "--response-format", "json", "--json-schema", schema_file)
    assert both.exit_code == 2 and "give only one of --response-format and --json-schema" in both.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "frob"}))
    refused = invoke("submit", path, "--json-schema", bad)
    assert refused.exit_code == 2 and "invalid JSON schema" in refused.output
    bad.write_text("{nope")
    unreadable = invoke("submit", path, "--json-schema", bad)
    assert unreadable.exit_code == 2 and "not a JSON file" in unreadable.output
    out_of_range = invoke("submit", path, "--temperature", "5")
    assert out_of_range.exit_code == 2 and "'temperature' must be between 0 and 2, got 5.0" in out_of_range.output


def test_a_database_error_is_named_as_itself_not_as_unavailable(sqlite_url, broker_url, tmp_path):
    import sqlite3

    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, ["--database-url", sqlite_url, "--broker-url", broker_url, *args])

    job_id = invoke("submit", str(write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}]))).stdout.strip()
    conn = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    conn.execute("DROP TABLE items")  # the schema's version still says current
    conn.commit()
    conn.close()
    result = invoke("export", job_id)
    assert result.exit_code == 1
    assert "no such table: items" in result.stderr and "unavailable" not in result.stderr, result.stderr
    assert "Traceback" not in result.output
    result = invoke("cancel", job_id)  # through SQLAlchemy this time
    assert result.exit_code == 1
    assert "no such table: items" in result.stderr and "unavailable" not in result.stderr, result.stderr
    unreachable = runner.invoke(cli, ["--database-url", "postgresql+psycopg://u@127.0.0.1:1/x", "status"])
    assert unreachable.exit_code == 1 and "database unavailable" in unreachable.stderr


def test_llmbatch_engine_env_selects_the_echo_engine_and_results_say_so(tmp_path, sqlite_url):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one two three four", "max_tokens": 2}])
    result = CliRunner().invoke(cli, ["--database-url", sqlite_url, "run", str(path)],
                                env={"LLMBATCH_ENGINE": "echo"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    row = json.loads(Path(result.stdout.strip()).read_text())
    assert row["output"] == "one two"  # the echo engine's output, not the model's
    assert "[echo engine]" in row["worker"]


@pytest.mark.parametrize("spec, message", [("two", "expected all, a count"), ("0,0", "each index once"),
                                           ("-1", "none negative"), ("0", "at least one GPU")])
def test_worker_gpus_refuses_bad_values(invoke, spec, message):
    result = invoke("worker", "--gpus", spec, "--engine", "echo")
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_worker_gpus_all_without_a_gpu_is_a_clear_usage_error(invoke):
    result = invoke("worker", "--gpus", "all", "--engine", "echo", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.exit_code == 2 and "no CUDA GPU is visible" in result.stderr, result.output
