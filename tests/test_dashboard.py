"""The dashboard in a real headless Chromium (Debian's `chromium`), against a live `llmbatch serve`."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from datetime import timedelta

import pytest

from llmbatch.jobs import service, work
from llmbatch.jobs.db import Database
from llmbatch.jobs.models import ItemStatus, utcnow
from llmbatch.jobs.settings import Settings
from tests.support import Server

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*args: str, timeout: float = 90) -> str:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--no-first-run", "--user-data-dir=/tmp/llmbatch-test-chromium", *args],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def progress(dom: str, job_id: str) -> str:
    row = re.search(rf'<tr id="{job_id}">(.*?)</tr>', dom, re.S)
    assert row, f"no row for {job_id} in the page"
    return re.search(r'class="pct progress-text">([^<]*)<', row.group(1)).group(1)


@pytest.fixture
def running_job(sqlite_url):
    """A 10-line job (one bad line) in chunks of 3, and a function that finishes its next chunk."""
    db = Database(sqlite_url)
    db.ensure_schema()
    settings = Settings.from_env(database_url=sqlite_url, chunk_size=3)
    lines = b"".join(b'{"prompt": "p%d"}\n' % i for i in range(9)) + b'{"prompt": \n'
    with db.write() as s:
        submitted = service.submit(s, io.BytesIO(lines), settings, name="nightly-eval")
    chunks = iter(submitted.chunk_ids)

    def advance() -> None:
        chunk_id = next(chunks)
        with db.write() as s:
            chunk = work.claim_chunk(s, chunk_id, "test-worker", 60)
            items = work.running_items(s, chunk_id)
            start = utcnow() - timedelta(seconds=2)
            results = [work.ItemResult(item_id=i.id, status=ItemStatus.succeeded, output="ok", finish_reason="stop",
                                       prompt_tokens=3, completion_tokens=40, started_at=start, finished_at=utcnow())
                       for i in items]
            assert work.record_results(s, chunk, "test-worker", results, 60)
            work.finish_chunk(s, chunk, "test-worker")

    yield submitted.job.id, advance
    db.dispose()


def test_dashboard_renders_and_progress_moves(sqlite_url, running_job, tmp_path, quiet_broker_url):
    job_id, advance = running_job
    server = Server(sqlite_url, quiet_broker_url, tmp_path / "serve.log")
    try:
        advance()
        first = chromium("--dump-dom", server.url + "/")
        assert "<title>llmbatch · jobs</title>" in first and "nightly-eval" in first
        assert progress(first, job_id) == "4 / 10 (40.0%)"  # 3 succeeded + the bad line
        advance()
        second = chromium("--dump-dom", server.url + "/")
        assert progress(second, job_id) == "7 / 10 (70.0%)"
        row = re.search(rf'<tr id="{job_id}">(.*?)</tr>', second, re.S).group(1)
        assert re.search(r'class="num failed-n">1<', row)  # the failure count
        assert re.search(r'class="num">[\d,.]+</td>\s*<td class="num">\d+s<', row)  # tokens/s, then an ETA

        # The job page: its numbers and a sample of the failed lines with their errors.
        page = chromium("--dump-dom", f"{server.url}/jobs/{job_id}")
        assert "invalid JSON" in page and "line 10" in page and "running" in page

        # The inline script refreshes the page in place (no reload): virtual time runs its timer.
        live = chromium("--dump-dom", "--virtual-time-budget=7000", server.url + "/")
        refreshes = int(re.search(r'data-refreshes="(\d+)"', live).group(1))
        assert refreshes >= 1 and progress(live, job_id) == "7 / 10 (70.0%)"

        shot = tmp_path / "dashboard.png"
        chromium(f"--screenshot={shot}", "--window-size=1280,400", server.url + "/")
        assert shot.stat().st_size > 5000
    finally:
        server.stop()
    assert "Traceback" not in server.log_path.read_text()
