"""Load: one 100,000-item job plus 20 small jobs, submitted at once, through two worker
processes with the `echo` engine (the model would only measure itself). Nothing may be lost."""

import json
import subprocess
import sys

import pytest

from benchmarks.orchestration import run_load

pytestmark = pytest.mark.slow


def test_100k_items_and_20_small_jobs_through_two_workers_lose_nothing(sqlite_url, broker_url, tmp_path):
    result = run_load(sqlite_url, broker_url, tmp_path, items=100_000, small_jobs=20, small_size=50, workers=2)
    assert len(result["statuses"]) == 21
    for job_id, status in result["statuses"].items():
        assert status["status"] == "completed"
        assert status["succeeded"] == status["total"] and status["failed"] == status["cancelled"] == 0
    assert sum(s["total"] for s in result["statuses"].values()) == 101_000
    big = max(result["statuses"].values(), key=lambda s: s["total"])
    # The rows themselves, not just the counters: one per line, each with its echo.
    out = subprocess.run([sys.executable, "-m", "llmbatch.jobs.cli", "--database-url", sqlite_url, "export", big["id"]],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 100_000
    lines = [json.loads(line) for line in out[:3]] + [json.loads(out[-1])]
    assert [r["line"] for r in lines] == [1, 2, 3, 100_000]
    assert all(r["status"] == "succeeded" and r["output"].startswith("echo big item") for r in lines)
    ids = {json.loads(line)["custom_id"] for line in out}
    assert len(ids) == 100_000
    print(f"\nload: {result['items']} items in {result['elapsed_s']:.1f}s = {result['items_per_s']:.0f} items/s")
