"""`llmbatch serve` as a process: how it stops on real signals, and its exit codes (issue 20)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import Server, write_jsonl

pytestmark = pytest.mark.slow


def _process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line), read from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        table[int(entry.name)] = (int(fields[1]), fields[0], cmd)
    return table


def _descendants(pid: int) -> dict[int, str]:
    table = _process_table()
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _, cmd) in table.items():
            if ppid == parent and child not in found:
                found[child] = cmd
                frontier.append(child)
    return found


def _alive(pids) -> list[int]:
    table = _process_table()
    return [p for p in pids if p in table and table[p][1] != "Z"]


@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)],
                         ids=["SIGTERM", "SIGINT", "Ctrl-C"])
def test_serve_stops_its_children_and_exits_0_on_a_signal(sig, group, sqlite_url, broker_url, tmp_path):
    """The signal goes to the server's own pid only, as `docker stop` and systemd's main-process
    stop send it: nothing in its process group is signalled for it, so the server itself must
    stop the ingest child and multiprocessing's resource tracker. Ctrl-C in a terminal signals
    the whole group instead."""
    server = Server(sqlite_url, broker_url, tmp_path / "serve.log", env={"LLMBATCH_FILES_DIR": str(tmp_path / "f")})
    try:
        client = server.client()
        f = client.files.create(file=open(write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}]), "rb"),
                                purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
        deadline = time.monotonic() + 60
        while client.batches.retrieve(batch.id).status == "validating":  # parsed in the ingest child
            assert time.monotonic() < deadline, "the batch was never parsed"
            time.sleep(0.2)
        children = _descendants(server.proc.pid)
        assert any("spawn_main" in cmd for cmd in children.values()), children  # the ingest child
        assert any("resource_tracker" in cmd for cmd in children.values()), children

        (os.killpg if group else os.kill)(server.proc.pid, sig)
        rc = server.proc.wait(60)
        log = server.log_path.read_text()
        assert not _alive(children), f"left running: {[children[p] for p in _alive(children)]}"
        assert rc == 0, log[-3000:]  # a clean stop, not "killed by SIGTERM" (143)
        assert "Application shutdown complete" in log
        assert "leaked" not in log and "Traceback" not in log and "Aborted" not in log, log[-3000:]
    finally:
        server.stop()


def test_a_busy_port_is_one_line_and_exit_1(sqlite_url, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "llmbatch.jobs.cli", "serve", "--port", str(port)],
                           env={**os.environ, "LLMBATCH_DATABASE_URL": sqlite_url}, capture_output=True, text=True,
                           timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert f"cannot listen on 127.0.0.1:{port}: the port is already in use" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_bad_option_is_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmbatch.jobs.cli", "serve", "--port", "70000"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--port" in r.stderr
