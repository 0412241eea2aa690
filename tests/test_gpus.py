"""`llmbatch worker --gpus`: one pinned worker process per GPU (echo engine; no GPU needed to start them)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmbatch.jobs.cli import cli
from llmbatch.worker.gpus import node_name, parse
from tests.support import start_worker, stop_worker, wait_for_status, write_jsonl

pytestmark = pytest.mark.slow


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_parse_maps_counts_and_lists_onto_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert parse("2") == ["0", "1"] and parse("1,3") == ["1", "3"] and parse("3,") == ["3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert parse("all") == ["4", "5", "6"] and parse("2") == ["4", "5"] and parse("0,2") == ["4", "6"]
    assert node_name(None, "1") == "llmbatch-gpu1@%h" and node_name("w@box", "0") == "w-gpu0@box"


def test_one_pinned_worker_per_gpu_serves_the_queue_and_stops_on_sigterm(sqlite_url, broker_url, tmp_path,
                                                                         monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    runner = CliRunner()
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"w{i} x y", "max_tokens": 2} for i in range(12)])
    job_id = runner.invoke(cli, ["--database-url", sqlite_url, "--broker-url", broker_url, "submit", str(path)],
                           env={"LLMBATCH_CHUNK_SIZE": "2"}).stdout.strip()

    def invoke(*args):
        return runner.invoke(cli, ["--database-url", sqlite_url, "--broker-url", broker_url, *args])

    log = tmp_path / "w.log"
    proc = start_worker(sqlite_url, broker_url, log, "--gpus", "0,1", "--engine", "echo")
    try:
        status = wait_for_status(invoke, job_id, timeout=120, proc=proc, log_path=log)
        deadline = time.monotonic() + 60
        while log.read_text().count("ready: model ") < 2:  # each child, once its model is loaded
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.3)
        text = log.read_text()
        assert "CUDA_VISIBLE_DEVICES=0" in text and "CUDA_VISIBLE_DEVICES=1" in text, text[-3000:]
        assert "llmbatch-gpu0@" in text and "llmbatch-gpu1@" in text
        assert status["succeeded"] == 12
        assert len(_group_members(proc.pid)) >= 5  # this process, two workers and their pool processes
        os.kill(proc.pid, signal.SIGTERM)  # the parent alone: it must stop its workers
        proc.wait(60)
        deadline = time.monotonic() + 30
        while _group_members(proc.pid):
            assert time.monotonic() < deadline, f"left running: {_group_members(proc.pid)}"
            time.sleep(0.3)
    finally:
        stop_worker(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]


def test_a_gpu_worker_that_cannot_load_the_model_stops_them_all(sqlite_url, broker_url, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    log = tmp_path / "w.log"
    proc = start_worker(sqlite_url, broker_url, log, "--gpus", "2", "--model", "/nonexistent")
    try:
        proc.wait(120)
    finally:
        stop_worker(proc)
    text = log.read_text()
    assert proc.returncode == 1, text[-3000:]
    assert "cannot load model '/nonexistent'" in text and "exited with code 1" in text
    assert not _group_members(proc.pid)
