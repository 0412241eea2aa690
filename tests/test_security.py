"""Secrets stay out of output and logs, TLS and password-protected Redis work, SQL is never formatted."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmbatch.jobs.cli import cli
from tests.support import RedisServer, start_worker, stop_worker, wait_for_status, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
REDIS_SECRET = "redis-s3cret-pw"
PG_SECRET = "pg-s3cret-pw"


def make_tls_files(directory: Path) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=llmbatch-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return directory


@pytest.mark.slow
def test_tls_redis_with_password_end_to_end_and_no_secret_leaks(pg_url, tmp_path):
    tls = make_tls_files(tmp_path)
    redis_server = RedisServer(tmp_path, password=REDIS_SECRET, tls_dir=tls).start()
    broker_url = redis_server.url
    assert broker_url.startswith("rediss://")
    db_url = pg_url.replace("postgres@", f"postgres:{PG_SECRET}@")  # trust auth ignores it; the URL still holds it
    runner = CliRunner()

    def invoke(*args):
        result = runner.invoke(cli, ["--database-url", db_url, "--broker-url", broker_url, *map(str, args)],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
        return result

    outputs: list[str] = []
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi", "max_tokens": 4}, {"prompt": "Yo", "max_tokens": 4}])
    job_id = invoke("submit", path).stdout.strip()
    log = tmp_path / "w.log"
    w = start_worker(db_url, broker_url, log)
    try:
        status = wait_for_status(invoke, job_id, timeout=240, proc=w, log_path=log)
    finally:
        stop_worker(w)
        redis_server.stop()
    assert status["succeeded"] == 2
    text = log.read_text() + "".join(outputs)
    assert "llmbatch worker: model" in text  # the banner with both URLs was printed...
    assert REDIS_SECRET not in text and PG_SECRET not in text  # ...with the passwords masked


def test_unreachable_database_error_hides_the_password():
    result = CliRunner().invoke(cli, ["--database-url", f"postgresql+psycopg://u:{PG_SECRET}@127.0.0.1:1/x",
                                      "status"])
    assert result.exit_code == 1
    assert "database unavailable" in result.output and "***" in result.output
    assert PG_SECRET not in result.output


def test_unreachable_broker_error_hides_the_password(sqlite_url, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    result = CliRunner().invoke(cli, ["--database-url", sqlite_url, "--broker-url",
                                      f"redis://:{REDIS_SECRET}@127.0.0.1:1/0", "submit", str(path)])
    assert result.exit_code == 1 and "could not be queued" in result.output
    assert REDIS_SECRET not in result.output


def test_redact_url():
    from llmbatch.jobs.settings import redact_url

    assert REDIS_SECRET not in redact_url(f"rediss://:{REDIS_SECRET}@h:6379/0?ssl_cert_reqs=required")
    assert PG_SECRET not in redact_url(f"postgresql+psycopg://u:{PG_SECRET}@h/db")
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


SQL_WORDS = re.compile(r"\bSELECT\b.*\bFROM\b|\bINSERT INTO\b|\bUPDATE\s+\w+\s+SET\b|\bDELETE FROM\b|\bWHERE\b|"
                       r"\bCOPY\s+\w+|\bPRAGMA\b|\b(CREATE|DROP)\s+(TABLE|SCHEMA|INDEX)\b|\bBEGIN\b", re.S)


def _literal_text(node: ast.AST) -> str:
    """The constant text a string expression is made of (f-string parts, operands, format templates)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_literal_text(v) for v in node.values)
    if isinstance(node, ast.BinOp):
        return _literal_text(node.left) + " " + _literal_text(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return _literal_text(node.func.value)
    return ""


def _formatted_sql(node: ast.AST) -> bool:
    """SQL text built by an f-string with holes, `%` or `+` on strings, or `.format(...)`."""
    built = (
        (isinstance(node, ast.JoinedStr) and any(isinstance(v, ast.FormattedValue) for v in node.values))
        or (isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)))
        or (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format")
    )
    return built and bool(SQL_WORDS.search(_literal_text(node)))


def sql_offenders(source: str, name: str = "<string>") -> list[int]:
    return sorted({n.lineno for n in ast.walk(ast.parse(source, name)) if _formatted_sql(n)})


def test_no_sql_is_built_by_formatting_strings():
    offenders = []
    for package in ("jobs", "worker", "migrations", "benchmarks"):
        for path in (ROOT / package).rglob("*.py"):
            offenders += [f"{path.relative_to(ROOT)}:{line}" for line in sql_offenders(path.read_text(), str(path))]
    assert offenders == [], f"SQL built by string formatting at {offenders}"


def test_the_scan_catches_formatted_queries_wherever_they_are_built():
    assert sql_offenders('session.execute(text(f"SELECT * FROM items WHERE id = {item_id}"))') == [1]
    assert sql_offenders('sql = "SELECT a FROM t"\nsql += f" WHERE job_id = {mark}"') == [2]
    assert sql_offenders('cur.execute("DELETE FROM items WHERE id = %s" % item_id)') == [1]
    assert sql_offenders('q = "UPDATE jobs SET x = {}".format(v)') == [1]
    assert sql_offenders('log.info(f"requeueing {n} chunks")') == []
    assert sql_offenders('note = f"one bulk UPDATE of {n:,} rows"') == []
    assert sql_offenders('cur.execute("SELECT 1 WHERE a = ?", (a,))') == []
