"""Orchestration load: one big job plus many small jobs submitted at once, drained by worker
processes running the `echo` engine (near-zero cost), so what is measured is the queue, the
database and the bookkeeping, not the model.

    python benchmarks/orchestration.py --items 100000 --small-jobs 20 --workers 2 --backend sqlite

Prints items/s and appends a row to benchmarks/RESULTS.md with --record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_file(path: Path, n: int, prefix: str) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"{prefix}-{i}", "prompt": f"echo {prefix} item {i}",
                                "max_tokens": 8}) + "\n")
    return path


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmbatch.jobs.cli", *args], env=env, capture_output=True, text=True,
                          check=True)


def status(job_id: str, env: dict) -> dict:
    return json.loads(cli("status", job_id, "--json", env=env).stdout)


def run_load(db_url: str, broker_url: str, workdir: Path, *, items: int = 100_000, small_jobs: int = 20,
             small_size: int = 50, workers: int = 2, timeout: float = 900) -> dict:
    env = {**os.environ, "LLMBATCH_DATABASE_URL": db_url, "LLMBATCH_BROKER_URL": broker_url,
           "PYTHONPATH": str(ROOT)}
    cli("db", "upgrade", env=env)
    files = [write_file(workdir / "big.jsonl", items, "big")]
    files += [write_file(workdir / f"small-{j}.jsonl", small_size, f"s{j}") for j in range(small_jobs)]
    logs = [open(workdir / f"worker-{i}.log", "wb") for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, "-m", "llmbatch.jobs.cli", "worker", "--engine", "echo", "-n", f"load{i}@%h",
                               "--loglevel", "WARNING"], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True) for i, log in enumerate(logs)]
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(files)) as pool:  # every job submitted at once
            job_ids = list(pool.map(lambda f: cli("submit", str(f), env=env).stdout.strip(), files))
        submitted = time.monotonic() - started
        pending = set(job_ids)
        final = {}
        while pending and time.monotonic() - started < timeout:
            for job_id in list(pending):
                s = status(job_id, env)
                if s["status"] == "completed":
                    final[job_id] = s
                    pending.discard(job_id)
            time.sleep(0.5)
        elapsed = time.monotonic() - started
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    if pending:
        raise RuntimeError(f"{len(pending)} job(s) unfinished after {timeout}s")
    total = items + small_jobs * small_size
    return {"job_ids": job_ids, "statuses": final, "items": total, "submit_s": submitted, "elapsed_s": elapsed,
            "items_per_s": total / elapsed, "workers": workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--small-jobs", type=int, default=20)
    parser.add_argument("--small-size", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--record", action="store_true", help="Append a row to benchmarks/RESULTS.md.")
    args = parser.parse_args()
    import redis
    from sqlalchemy import create_engine
    from sqlalchemy.schema import CreateSchema, DropSchema

    redis.Redis.from_url(args.broker_url).flushdb()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        schema = None
        if args.backend == "sqlite":
            db_url = f"sqlite:///{workdir / 'load.db'}"
        else:
            schema = f"load_{os.getpid()}"
            admin = create_engine(args.postgres_url)
            with admin.begin() as conn:
                conn.execute(CreateSchema(schema))
            db_url = f"{args.postgres_url}?options=-csearch_path%3D{schema}"
        try:
            result = run_load(db_url, args.broker_url, workdir, items=args.items, small_jobs=args.small_jobs,
                              small_size=args.small_size, workers=args.workers)
        finally:
            if schema:
                with admin.begin() as conn:
                    conn.execute(DropSchema(schema, cascade=True))
    lost = sum(s["total"] - s["succeeded"] for s in result["statuses"].values())
    print(f"{result['items']} items in {len(result['job_ids'])} jobs through {args.workers} echo workers "
          f"({args.backend}): {result['elapsed_s']:.1f} s, {result['items_per_s']:.0f} items/s, "
          f"submit {result['submit_s']:.1f} s, lost {lost}")
    if args.record:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(f"| {time.strftime('%Y-%m-%d')} | {platform.node()} ({os.cpu_count()} cores) | {args.backend} | "
                    f"{result['items']} items, {len(result['job_ids'])} jobs | {args.workers} | "
                    f"{result['elapsed_s']:.1f} s | {result['items_per_s']:.0f} | {lost} | "
                    f"`python benchmarks/orchestration.py --items {args.items} --small-jobs {args.small_jobs} "
                    f"--workers {args.workers} --backend {args.backend} --record` |\n")


if __name__ == "__main__":
    main()
