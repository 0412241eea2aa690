"""HTTP API load: a 1M-line upload plus batch creation, while 20 clients poll the batch.

Starts a real `llmbatch serve` (loopback only, no worker: this measures the API and the parse, not
generation), then:

  1. uploads the file (POST /v1/files, multipart streamed from disk);
  2. creates the batch (POST /v1/batches: must return at once, `validating`);
  3. runs N clients that each poll GET /v1/batches/{id} every --interval seconds until the batch is
     parsed (`in_progress`), recording every latency;
  4. reports: upload time, create latency, time until parsed, poll latency p50/p99/max, and the
     peak RSS (VmHWM) of the server process and of its parsing child.

Targets (issue 12): server peak RSS < 500 MB; poll p99 < 100 ms.

  python benchmarks/api_load.py                                  # 1,000,000 lines, SQLite
  python benchmarks/api_load.py --lines 20000 --no-record        # smoke run
  python benchmarks/api_load.py --backend postgresql

The input is scale.py's generator (same lines, cached under --workdir). Bounded: every wait has a
deadline, and the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import http.client
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scale import _pg_schema, make_input  # noqa: E402

RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## HTTP API load (issue 12)"
TARGETS = {"rss_mb": 500.0, "p99_ms": 100.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Child processes, recursively, from /proc (the parsing pool's workers)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children + [d for c in children for d in descendants(c)]


def vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def upload(port: int, path: Path) -> dict:
    """POST /v1/files with the file streamed from disk (the client stays small too)."""
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body():
        yield head
        with open(path, "rb") as f:
            while piece := f.read(1 << 20):
                yield piece
        yield tail

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/files", body=body(), headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(head) + path.stat().st_size + len(tail))})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    if r.status != 200:
        raise SystemExit(f"upload failed: {r.status} {data[:500]!r}")
    return json.loads(data)


def _drop_queue(redis_url: str, model: str) -> None:
    """No worker runs here: drop the chunk messages the batch queued."""
    import redis

    from llmbatch.worker.app import queue_name

    client = redis.Redis.from_url(redis_url)
    client.delete(queue_name(model))
    client.close()


def post_json(port: int, path: str, obj: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=json.dumps(obj), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    if r.status != 200:
        raise SystemExit(f"POST {path} failed: {r.status} {data[:500]!r}")
    return json.loads(data)


async def poller(port: int, batch_id: str, interval: float, deadline: float, latencies: list[float],
                 done: asyncio.Event) -> None:
    """One client on one keep-alive connection: GET the batch until it is parsed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET /v1/batches/{batch_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    try:
        while not done.is_set() and time.monotonic() < deadline:
            t0 = time.perf_counter()
            writer.write(request)
            await writer.drain()
            headers = await reader.readuntil(b"\r\n\r\n")
            length = next(int(h.split(b":")[1]) for h in headers.split(b"\r\n") if h.lower().startswith(b"content-length"))
            body = await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            if json.loads(body)["status"] != "validating":
                done.set()
            await asyncio.sleep(interval)
    finally:
        writer.close()


async def poll_all(port: int, batch_id: str, n: int, interval: float, timeout: float) -> tuple[list[float], float]:
    latencies: list[float] = []
    done = asyncio.Event()
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    await asyncio.gather(*[poller(port, batch_id, interval, deadline, latencies, done) for _ in range(n)])
    if not done.is_set():
        raise SystemExit(f"batch {batch_id} still validating after {timeout}s")
    return latencies, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(args) -> dict:
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    input_path = make_input(work / f"input-{args.lines}-{args.seed}-{args.bad_every}.jsonl", args.lines, args.seed,
                            args.bad_every)
    run_dir = Path(tempfile.mkdtemp(prefix="api-load-", dir=work))
    if args.backend == "sqlite":
        db_url = f"sqlite:///{run_dir / 'llmbatch.db'}"
    else:
        schema = "api_load_" + uuid.uuid4().hex[:10]
        db_url = _pg_schema(args.postgres_url, schema)
    port = free_port()
    env = {**os.environ, "LLMBATCH_DATABASE_URL": db_url, "LLMBATCH_BROKER_URL": args.redis_url,
           "LLMBATCH_FILES_DIR": str(run_dir / "files"), "LLMBATCH_HOME": str(run_dir), "LLMBATCH_API_KEYS": ""}
    log = open(run_dir / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "llmbatch.jobs.cli", "serve", "--port", str(port),
                               "--loglevel", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"server did not start:\n{(run_dir / 'serve.log').read_text()[-3000:]}")
                time.sleep(0.1)
        rss_idle = vm_hwm_mb(server.pid)
        t0 = time.perf_counter()
        f = upload(port, input_path)
        upload_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        batch = post_json(port, "/v1/batches", {"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                                "completion_window": "24h", "model": "api-load-model"})
        create_ms = (time.perf_counter() - t0) * 1000
        assert batch["status"] == "validating", batch
        latencies, parsed_s = asyncio.run(poll_all(port, batch["id"], args.pollers, args.interval, args.timeout))
        children = descendants(server.pid)
        rss_server = vm_hwm_mb(server.pid)
        rss_child = max((vm_hwm_mb(c) for c in children), default=0.0)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", f"/v1/batches/{batch['id']}")
        final = json.loads(conn.getresponse().read())
        conn.close()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
        if args.backend == "postgresql":
            _pg_schema(args.postgres_url, schema, drop=True)
        _drop_queue(args.redis_url, "api-load-model")
        shutil.rmtree(run_dir, ignore_errors=True)  # the database and the uploaded copy: hundreds of MB
    ms = [x * 1000 for x in latencies]
    return {
        "backend": args.backend, "lines": args.lines, "input_mb": input_path.stat().st_size / 1e6,
        "upload_s": upload_s, "create_ms": create_ms, "parsed_s": parsed_s, "status": final["status"],
        "total": final["request_counts"]["total"], "failed": final["request_counts"]["failed"],
        "polls": len(ms), "p50_ms": statistics.median(ms), "p99_ms": pct(ms, 0.99), "max_ms": max(ms),
        "rss_server_mb": rss_server, "rss_server_idle_mb": rss_idle, "rss_parser_mb": rss_child,
        "pollers": args.pollers, "interval_s": args.interval,
    }


def markdown(r: dict, command: str, load: tuple) -> str:
    ok_rss = r["rss_server_mb"] < TARGETS["rss_mb"]
    ok_p99 = r["p99_ms"] < TARGETS["p99_ms"]
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    return "\n".join([
        SECTION, "",
        f"`benchmarks/api_load.py`: a real `llmbatch serve` on loopback, no worker. Upload of a "
        f"{r['lines']:,}-line file ({r['input_mb']:.0f} MB, scale.py's lines), batch creation, then "
        f"{r['pollers']} clients polling `GET /v1/batches/ID` every {r['interval_s']} s (keep-alive) until the "
        "batch is parsed. Peak RSS is VmHWM from /proc: the server process, and its parsing child apart.", "",
        f"- Machine: {machine}. Date: {datetime.date.today().isoformat()}. Backend: {r['backend']}. "
        f"Load average at start: {', '.join(f'{x:.1f}' for x in load)}.",
        f"- Command: `{command}`", "",
        "| measure | value | target | met |", "|---|---|---|---|",
        f"| upload (POST /v1/files) | {r['upload_s']:.1f} s | | |",
        f"| create (POST /v1/batches), returns `validating` | {r['create_ms']:.0f} ms | at once | |",
        f"| parsed and stored (until `in_progress`) | {r['parsed_s']:.1f} s | | |",
        f"| polls: p50 / p99 / max ({r['polls']:,} requests) | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} / "
        f"{r['max_ms']:.1f} ms | p99 < 100 ms | {'yes' if ok_p99 else '**no**'} |",
        f"| server peak RSS (idle before upload) | {r['rss_server_mb']:.0f} MB ({r['rss_server_idle_mb']:.0f} MB) "
        f"| < 500 MB | {'yes' if ok_rss else '**no**'} |",
        f"| parsing child peak RSS | {r['rss_parser_mb']:.0f} MB | | |",
        f"| batch after parsing | {r['status']}, {r['total']:,} requests, {r['failed']:,} bad lines | | |",
        "",
    ])


def record(section: str) -> None:
    """Replace our own section of RESULTS.md (up to the next '## '), or append it."""
    text = RESULTS_MD.read_text()
    lines = text.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip() == SECTION), None)
    if start is None:
        RESULTS_MD.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    RESULTS_MD.write_text("".join(lines[:start]) + section + ("\n" if end < len(lines) else "") + "".join(lines[end:]))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--pollers", type=int, default=20)
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between one client's polls")
    ap.add_argument("--timeout", type=float, default=600, help="most seconds to wait for the parse")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--bad-every", type=int, default=10_000)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llmbatch-scale")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    ap.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--no-record", action="store_true", help="don't write benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    load = os.getloadavg()
    result = run(args)
    md = markdown(result, "python benchmarks/api_load.py " + shlex.join(argv), load)
    print(md)
    print(json.dumps(result), file=sys.stderr)
    if not args.no_record:
        record(md)


if __name__ == "__main__":
    main()
