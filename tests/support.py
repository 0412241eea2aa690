"""Test data and small helpers shared by several test modules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def write_jsonl(path: Path, lines: list) -> Path:
    """Lines given as dicts are JSON-encoded; strings are written as they are (bad lines)."""
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


# Three line forms, per-line parameters, and bad lines of several kinds.
MIXED_LINES = [
    {"custom_id": "raw", "prompt": "The capital of France is", "max_tokens": 6},
    {"custom_id": "chat", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6},
    '{"custom_id": "broken", "prompt": ',  # invalid JSON
    {"custom_id": "oa-chat", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "Count to three."}], "max_tokens": 6}},
    {"custom_id": "unknown", "prompt": "hi", "frobnicate": 1},  # unknown parameter
    {"custom_id": "oa-text", "method": "POST", "url": "/v1/completions",
     "body": {"model": "x", "prompt": "1, 2, 3,", "max_tokens": 6, "temperature": 0}},
    {"custom_id": "raw", "prompt": "duplicate id"},  # duplicate custom_id
    {"custom_id": "empty", "prompt": ""},  # empty prompt
    {"prompt": "No id here, so line-9.", "max_tokens": 5, "temperature": 0.7, "seed": 1},
]
MIXED_BAD_LINES = {3: "invalid JSON", 5: "unknown parameter", 7: "duplicate custom_id", 8: "empty prompt"}


def start_worker(db_url, broker_url, log_path, *extra, env=None):
    """`llmbatch worker` in its own process group, so a test can kill it and its children."""
    full_env = {**os.environ, "LLMBATCH_DATABASE_URL": db_url, "LLMBATCH_BROKER_URL": broker_url,
                "PYTHONUNBUFFERED": "1", **(env or {})}
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "llmbatch.jobs.cli", "worker", "--loglevel", "INFO", *extra],
                            env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_worker(proc, sig=signal.SIGTERM, timeout=30):
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_status(invoke, job_id, states=("completed",), timeout=240, proc=None, log_path=None):
    """Poll `status --json` until the job is in one of `states` (or, given a callable, it says yes)."""
    done = states if callable(states) else (lambda s: s["status"] in states)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = json.loads(invoke("status", job_id, "--json").stdout)
        if done(status):
            return status
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.3)
    pytest.fail(f"job {job_id} still {status} after {timeout}s:\n{log_path.read_text()[-3000:] if log_path else ''}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server of the test's own, on its own port, that the test may stop and restart."""

    def __init__(self, workdir: Path, *, password: str | None = None, tls_dir: Path | None = None):
        self.port = free_port()
        self.workdir, self.password, self.tls_dir = workdir, password, tls_dir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls_dir:
            ca = self.tls_dir / "ca.pem"
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir)]
        if self.tls_dir:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls_dir / "server.pem"),
                     "--tls-key-file", str(self.tls_dir / "server.key"), "--tls-ca-cert-file",
                     str(self.tls_dir / "ca.pem"), "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_listening()
        return self

    def _wait_listening(self, timeout: float = 10) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class TcpProxy:
    """Forwards a local port to a server; `cut()` drops every connection and refuses new ones."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        import socket
        import threading

        self.target = (target_host, target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.down = threading.Event()
        self.sockets: list = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        import socket

        self.down.set()
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self.sockets.clear()

    def restore(self) -> None:
        self.down.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()


def export_rows(invoke, job_id, fmt="jsonl") -> list[dict]:
    return [json.loads(line) for line in invoke("export", job_id, "--format", fmt).stdout.splitlines()]


def assert_every_line_has_one_final_result(invoke, job_id, n_lines) -> list[dict]:
    """The promise: one row per line, no custom_id twice, nothing pending or running, counters true."""
    rows = export_rows(invoke, job_id)
    assert [r["line"] for r in rows] == list(range(1, n_lines + 1))
    ids = [r["custom_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a custom_id appears twice"
    assert not [r for r in rows if r["status"] in ("pending", "running")]
    status = json.loads(invoke("status", job_id, "--json").stdout)
    for state in ("succeeded", "failed", "cancelled", "pending", "running"):
        assert status[state] == sum(r["status"] == state for r in rows), state
    assert status["total"] == n_lines
    assert status["completion_tokens"] == sum(r["completion_tokens"] or 0 for r in rows)
    assert status["prompt_tokens"] == sum(r["prompt_tokens"] or 0 for r in rows)
    return rows


class Server:
    """`llmbatch serve` in a subprocess of its own, on a free loopback port."""

    def __init__(self, db_url: str, broker_url: str, log_path: Path, env: dict | None = None, host="127.0.0.1"):
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, "LLMBATCH_DATABASE_URL": db_url, "LLMBATCH_BROKER_URL": broker_url,
                    "PYTHONUNBUFFERED": "1", "LLMBATCH_INGEST_SWEEP_SECONDS": "1", **(env or {})}
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "llmbatch.jobs.cli", "serve", "--host", host,
                                      "--port", str(self.port)], env=full_env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"llmbatch serve exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        pytest.fail(f"llmbatch serve did not listen within {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def client(self, api_key: str = "no-key", **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=30, **kw)

    def stop(self) -> None:
        stop_worker(self.proc)
        self.log.close()
