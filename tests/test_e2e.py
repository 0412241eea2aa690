"""End to end, no mocks: submit a mixed file, a real `llmbatch worker` subprocess takes the work
from Redis and runs the bundled model in 4-bit on the CPU, and the export has one row per line."""

import json

import pytest
from click.testing import CliRunner

from llmbatch.jobs.cli import cli
from tests.support import MIXED_BAD_LINES, MIXED_LINES, start_worker, stop_worker, wait_for_status, write_jsonl

pytestmark = pytest.mark.slow


def test_submit_worker_export(db_url, broker_url, tmp_path):
    runner = CliRunner()

    def invoke(*args):
        result = runner.invoke(cli, ["--database-url", db_url, "--broker-url", broker_url, *map(str, args)],
                               env={"LLMBATCH_CHUNK_SIZE": "3"}, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    path = write_jsonl(tmp_path / "mixed.jsonl", MIXED_LINES)
    job_id = invoke("submit", path, "--max-tokens", "8").stdout.strip()
    log_path = tmp_path / "worker.log"
    worker = start_worker(db_url, broker_url, log_path)
    try:
        status = wait_for_status(invoke, job_id, proc=worker, log_path=log_path)
    finally:
        stop_worker(worker)
    good = len(MIXED_LINES) - len(MIXED_BAD_LINES)
    assert (status["total"], status["succeeded"], status["failed"]) == (len(MIXED_LINES), good, len(MIXED_BAD_LINES))
    assert status["pending"] == status["running"] == 0
    assert status["completion_tokens"] > 0 and status["finished_at"]

    rows = [json.loads(line) for line in invoke("export", job_id).stdout.splitlines()]
    assert [r["line"] for r in rows] == list(range(1, len(MIXED_LINES) + 1))
    for row in rows:
        if row["line"] in MIXED_BAD_LINES:
            assert row["status"] == "failed"
            assert row["error"]["message"].startswith(f"line {row['line']}:")
            assert MIXED_BAD_LINES[row["line"]] in row["error"]["message"]
        else:
            assert row["status"] == "succeeded", row
            assert row["output"].strip(), row
            assert row["prompt_tokens"] > 0 and 0 < row["completion_tokens"] <= 8
            assert row["finish_reason"] in ("stop", "length")
            assert row["worker"] and row["latency_ms"] is not None
    # Per-line max_tokens (6) overrides the job default (8); a finish by length uses exactly that many.
    raw = next(r for r in rows if r["custom_id"] == "raw")
    assert raw["completion_tokens"] <= 6
    openai_rows = [json.loads(line) for line in invoke("export", job_id, "--format", "openai").stdout.splitlines()]
    assert len(openai_rows) == len(MIXED_LINES)
    # The model that ran (the job's), not the line's body.model ("gpt-4o"): issue 20.
    oa_chat = next(r for r in openai_rows if r["custom_id"] == "oa-chat")
    assert oa_chat["response"]["body"]["model"] == status["model"]
