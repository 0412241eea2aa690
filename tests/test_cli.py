"""The command line, driven through CliRunner against real Redis, SQLite and PostgreSQL."""

import base64
import csv
import io
import json
import time
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
    assert missing.exit_code == 1 and "no job with id or name 'job_nope'" in missing.stderr


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
    assert out_of_range.exit_code == 2 and "must be between 0 and 2, got 5.0" in out_of_range.output


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


# ---- issue 14: the command line as a new user meets it -------------------------------------------


@pytest.mark.parametrize("flag,value,problem", [
    ("--max-tokens", "0", "must be between 1 and"),
    ("--temperature", "-1", "must be between 0 and 2"),
    ("--temperature", "3", "must be between 0 and 2"),
    ("--top-p", "1.5", "greater than 0 and at most 1"),
    ("--top-k", "-1", "0 (off) or a positive integer"),
    ("--stop", "", "non-empty strings"),
])
def test_out_of_range_generation_flags_are_usage_errors(invoke, tmp_path, flag, value, problem):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    result = invoke("submit", path, flag, value)
    assert result.exit_code == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and f"Invalid value for '{flag}'" in error[0] and problem in error[0], result.stderr
    assert "Traceback" not in result.output
    assert json.loads(invoke("status", "--json").stdout) == []  # nothing stored


def test_status_watch_interval_must_be_positive(invoke):
    result = invoke("status", "--watch", "--interval", "-1")
    assert result.exit_code == 2 and "Invalid value for '--interval'" in result.stderr


def test_postgres_url_in_libpq_form_just_works(pg_url, broker_url, tmp_path):
    libpq = "postgres://" + pg_url.split("://", 1)[1]
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    runner = CliRunner()
    submit = runner.invoke(cli, ["--database-url", libpq, "--broker-url", broker_url, "submit", str(path)])
    assert submit.exit_code == 0, submit.output
    job_id = submit.stdout.strip()
    # Stored in PostgreSQL: the psycopg URL sees the same job.
    status = runner.invoke(cli, ["--database-url", pg_url, "status", job_id, "--json"])
    assert json.loads(status.stdout)["id"] == job_id


@pytest.mark.parametrize("url,problem", [
    ("mysql://user@localhost/db", "no driver for 'mysql' is installed"),
    ("not-a-url", "not a database URL"),
    ("postgresql://u:secret@h:abc/db", "not a database URL: 'postgresql+psycopg://u:***@h:abc/db'"),
])
def test_unusable_database_url_is_one_clean_line(url, problem):
    result = CliRunner().invoke(cli, ["--database-url", url, "status"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and problem in result.stderr, result.stderr
    assert "Traceback" not in result.output and "secret" not in result.output


def test_mistyped_sqlite_path_is_refused_and_creates_nothing(tmp_path):
    missing = tmp_path / "nonexistent" / "dir"
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{missing}/x.db", "status"])
    assert result.exit_code == 1 and f"the directory {missing} does not exist" in result.stderr
    assert not (tmp_path / "nonexistent").exists()


def test_default_sqlite_database_is_created_under_llmbatch_home(tmp_path):
    home = tmp_path / "fresh-home"
    result = CliRunner().invoke(cli, ["status"], env={"LLMBATCH_HOME": str(home), "LLMBATCH_DATABASE_URL": None})
    assert result.exit_code == 0, result.output
    assert (home / "llmbatch.db").exists()


def test_one_line_json_array_is_not_jsonl(invoke, tmp_path):
    path = tmp_path / "array.jsonl"
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]) + "\n")
    result = invoke("submit", path)
    assert result.exit_code == 1 and "does not look like JSONL" in result.stderr
    assert "line 1: expected a JSON object, got array" in result.stderr
    assert json.loads(invoke("status", "--json").stdout) == []


def test_export_to_a_missing_directory_is_a_clean_error(invoke, tmp_path):
    job_id = invoke("submit", write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])).stdout.strip()
    result = invoke("export", job_id, "-o", tmp_path / "nonexistent-dir" / "out.jsonl")
    assert result.exit_code == 1
    assert result.stderr.strip().endswith("No such file or directory") and "cannot write" in result.stderr
    assert "Traceback" not in result.output


def test_exporting_an_unfinished_job_warns_and_only_takes_pending(invoke, tmp_path):
    job_id = invoke("submit", write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}, "bad", {"prompt": "y"}])).stdout.strip()
    result = invoke("export", job_id)
    assert result.exit_code == 0
    assert f"warning: job {job_id} is queued, not finished: 2 pending and 0 running of 3" in result.stderr
    pending = [json.loads(line) for line in invoke("export", job_id, "--only", "pending").stdout.splitlines()]
    assert [(r["line"], r["status"], r["error"]) for r in pending] == [(1, "pending", None), (3, "pending", None)]
    assert invoke("export", job_id, "--only", "running").stdout == ""
    invoke("cancel", job_id)
    assert "warning" not in invoke("export", job_id).stderr  # a finished job exports quietly


def _claim_first_chunk(db_url, job_id):
    """Act as a worker that has taken the job's first chunk: its items are `running`."""
    from sqlalchemy import select

    from llmbatch.jobs import work
    from llmbatch.jobs.db import Database
    from llmbatch.jobs.models import Chunk

    db = Database(db_url)
    with db.write() as s:
        chunk_id = s.scalars(select(Chunk.id).where(Chunk.job_id == job_id).order_by(Chunk.seq)).first()
        work.claim_chunk(s, chunk_id, "w1", 30)
    db.dispose()
    return chunk_id


def test_cancel_reports_running_items_that_will_stop(invoke, db_url, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": str(i)} for i in range(5)])
    job_id = invoke("submit", path).stdout.strip()  # chunks of 2: [1, 2] [3, 4] [5]
    _claim_first_chunk(db_url, job_id)
    result = invoke("cancel", job_id)
    assert result.exit_code == 0
    assert f"{job_id} cancelling: 3 item(s) cancelled, 2 running item(s) stop after the micro-batch in flight" \
        in result.stdout


def test_retry_resumes_a_cancelled_job(invoke, broker_url, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}, "bad", {"prompt": "y"}, {"prompt": "z"}])
    job_id = invoke("submit", path).stdout.strip()
    redis.Redis.from_url(broker_url).flushdb()
    assert "llmbatch retry" in invoke("cancel", job_id).stdout
    result = invoke("retry", job_id)
    assert result.exit_code == 0 and "requeued 2 chunk(s)" in result.stdout, result.output
    status = json.loads(invoke("status", job_id, "--json").stdout)
    assert (status["status"], status["pending"], status["cancelled"], status["failed"]) == ("queued", 3, 0, 1)
    assert len(_queued_messages(broker_url)) == 2


def test_a_unique_name_works_wherever_a_job_id_does(invoke, broker_url, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    job_id = invoke("submit", path, "--name", "eval-v3").stdout.strip()
    assert json.loads(invoke("status", "eval-v3", "--json").stdout)["id"] == job_id
    assert "eval-v3" in invoke("status").stdout  # the table shows names
    assert json.loads(invoke("export", "eval-v3").stdout)["status"] == "pending"
    assert invoke("cancel", "eval-v3").stdout.startswith(f"{job_id} cancelled")
    assert "requeued 1 chunk(s)" in invoke("retry", "eval-v3").stdout
    # A name two jobs share is refused, listing both.
    other = invoke("submit", path, "--name", "eval-v3").stdout.strip()
    result = invoke("status", "eval-v3")
    assert result.exit_code == 1 and "matches 2 jobs" in result.stderr
    assert job_id in result.stderr and other in result.stderr


def test_status_watch_without_a_job_refreshes_the_table(invoke, db_url, tmp_path):
    import threading

    from llmbatch.jobs import service
    from llmbatch.jobs.db import Database

    job_id = invoke("submit", write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])).stdout.strip()

    def cancel_soon():
        time.sleep(1.0)
        db = Database(db_url)
        with db.write() as s:
            service.cancel(s, job_id)
        db.dispose()

    canceller = threading.Thread(target=cancel_soon)
    canceller.start()
    result = invoke("status", "--watch", "--interval", "0.2")
    canceller.join()
    assert result.exit_code == 0
    tables = result.stdout.split("ID ")[1:]
    assert len(tables) >= 3, result.stdout  # it kept refreshing while the job was queued
    assert "queued" in tables[0] and "cancelled" in tables[-1]


def test_run_writes_line_numbers_prompt_lengths_and_warnings(engine, tmp_path, sqlite_url, monkeypatch):
    """Engine errors name the line, a too-long prompt records its real length, a cut max_tokens is said."""
    from llmbatch.worker import engines
    from tests.test_engine import variant

    small = variant(engine)
    small.context_length = 24
    monkeypatch.setattr(engines, "make_engine", lambda model, settings: small)
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "Hi", "max_tokens": 2},
        {"prompt": " ".join(["word"] * 40), "max_tokens": 2},
        {"prompt": "one two three four five six seven eight nine ten", "max_tokens": 64},
    ])
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(cli, ["--database-url", sqlite_url, "run", str(path), "-o", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["status"] == "succeeded" and rows[0]["warning"] is None
    assert rows[1]["error"]["code"] == "context_length_exceeded"
    assert rows[1]["error"]["message"].startswith("line 2: prompt is ") and rows[1]["prompt_tokens"] > 24
    assert rows[2]["status"] == "succeeded" and rows[2]["warning"].startswith("max_tokens 64 cut to ")
    job_id = result.stderr.split()[1].rstrip(":")  # "job job_...: 3 line(s), ..."
    as_csv = CliRunner().invoke(cli, ["--database-url", sqlite_url, "export", job_id, "--format", "csv"])
    table = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["warning"] for r in table] == [r["warning"] or "" for r in rows]


@pytest.mark.parametrize("command,option", [
    ("status", "as_json"), ("run", "name"), ("submit", "top_p"), ("submit", "top_k"), ("submit", "seed"),
    ("run", "top_p"), ("run", "top_k"), ("run", "seed"), ("export", "only"),
])
def test_options_are_described_in_help(command, option):
    param = next(p for p in cli.commands[command].params if p.name == option)
    assert param.help and len(param.help) > 10
    shown = CliRunner().invoke(cli, [command, "--help"]).stdout
    assert param.help.split()[0] in shown
