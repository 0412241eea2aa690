"""One job over K GPUs of a host (`llmbatch worker --gpus 0,1,2,3`) against the same job on one GPU.

Real `llmbatch worker` processes over Redis and SQLite or PostgreSQL, the random Llama-3.1-8B of
benchmarks/throughput.py in NF4. For each device set (one GPU, then all of --gpus): start the
worker, wait until every pinned process has loaded the model, run a warm-up job, then time one
job of --prompts lines of a throughput.py workload (default `varied`: 16-512-token prompts,
max_tokens 16-256 per line, greedy). Every figure is read from the database rows afterwards:

  wall_s         the job's first item started -> its last chunk finished
  per worker     items, chunks, busy_s (time holding a chunk in progress: the union of
                 [its first item started, chunk finished] over the worker's chunks), generating_s
                 (the union of its items' [started, finished]), start_lag_s and idle_end_s (its last
                 chunk finished -> the job's last chunk finished)
  hoarded_items  items that started after the first worker ran out of work: work still queued
                 behind another worker (claimed ahead by its feed) when one went idle

Targets (issue 23): speed-up >= 0.925 x K (3.7x on four GPUs, 1.85x on two), and every worker's
idle_end_s <= 5% of wall_s. A device listed twice (`--gpus 0,0`) starts two processes sharing that
GPU (for the end-of-job idle on one GPU); there is no speed-up target then.

    python benchmarks/multi_gpu.py --gpus 0,1,2,3 --prompts 16384 --json-out multi_gpu.json
    LLMBATCH_DATABASE_URL=postgresql+psycopg://USER@HOST/DB python benchmarks/multi_gpu.py --backend postgresql ...
    python benchmarks/multi_gpu.py --smoke --gpus 0,1,2,3 --prompts 2048   # CPU: four echo workers

With --backend postgresql each run gets a fresh schema in LLMBATCH_DATABASE_URL's database, dropped
afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IDLE_TARGET = 0.05  # of the wall time, per worker
SPEEDUP_PER_GPU = 0.925  # 3.7x on four, 1.85x on two


# -- figures from rows (no I/O) ------------------------------------------------------


@dataclass
class ItemRow:
    worker: str | None
    chunk_worker: str | None  # who finished the item's chunk
    chunk_id: int | None
    started: datetime | None
    finished: datetime | None


@dataclass
class ChunkRow:
    id: int
    worker: str | None
    finished: datetime | None


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of [a, b] intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def figures(items: list[ItemRow], chunks: list[ChunkRow], processes: int) -> dict:
    """Per-worker busy time, end-of-job idle time and item split of one finished job.

    processes: how many worker processes served it; one that got no chunk idled the whole job.
    """
    started = [i.started.timestamp() for i in items if i.started]
    done_chunks = [c for c in chunks if c.finished]
    start = min(started)
    end = max([c.finished.timestamp() for c in done_chunks] + [i.finished.timestamp() for i in items if i.finished])
    wall = max(end - start, 1e-6)
    first_start: dict[int, float] = {}  # chunk id -> its first item started
    for i in items:
        if i.worker and i.started:
            first_start[i.chunk_id] = min(first_start.get(i.chunk_id, float("inf")), i.started.timestamp())
    workers: dict[str, dict] = {}
    for c in done_chunks:
        w = workers.setdefault(c.worker, {"worker": c.worker, "items": 0, "chunks": 0, "_held": [], "_gen": []})
        w["chunks"] += 1
        if c.id in first_start:  # a chunk with no item started (cancelled, given up) was never busy
            w["_held"].append((first_start[c.id], c.finished.timestamp()))
        w["last_chunk_finished"] = max(w.get("last_chunk_finished", start), c.finished.timestamp())
    for i in items:
        if i.worker in workers:
            w = workers[i.worker]
            w["items"] += 1
            if i.started and i.finished:
                w["_gen"].append((i.started.timestamp(), i.finished.timestamp()))
    rows, idle = [], []  # idle: each process's seconds idle at the end, unrounded (the fraction is taken of these)
    for w in sorted(workers.values(), key=lambda w: (-w["items"], w["worker"])):
        held, gen = w.pop("_held"), w.pop("_gen")
        busy, last = union_seconds(held), w.pop("last_chunk_finished")
        idle.append(end - last)
        rows.append({**w, "busy_s": round(busy, 3), "busy_frac": round(busy / wall, 4),
                     "generating_s": round(union_seconds(gen), 3),
                     "start_lag_s": round(min((a for a, _ in held), default=end) - start, 3),
                     "idle_end_s": round(end - last, 3), "idle_end_frac": round((end - last) / wall, 4)})
    # The first worker to run out of work; items that started after it were queued behind another.
    first_idle = min((end - r["idle_end_s"] for r in rows), default=end)
    never = processes - len(rows)  # processes that never finished a chunk of this job
    idle += [wall] * max(0, never)  # (rounding wall first made a never-used process idle over 100% of it)
    return {
        "wall_s": round(wall, 3),
        "workers": rows,
        "idle_workers": max(0, never),
        "items_per_process": sorted([r["items"] for r in rows], reverse=True) + [0] * max(0, never),
        "items_without_worker": sum(1 for i in items if not i.worker),
        # An item written by a worker other than the one that finished its chunk: should never be.
        "items_off_chunk_worker": sum(1 for i in items if i.worker and i.worker != i.chunk_worker),
        "max_idle_end_s": round(max(idle), 3),
        "max_idle_end_frac": round(max(idle) / wall, 4),
        "hoarded_items": sum(1 for i in items if i.started and i.started.timestamp() > first_idle),
    }


def read_job(db_url: str, job_id: str) -> tuple[list[ItemRow], list[ChunkRow], int]:
    """The job's items and chunks, and its output tokens."""
    from sqlalchemy import func, select

    from llmbatch.jobs.db import Database
    from llmbatch.jobs.models import Chunk, Item

    db = Database(db_url)
    try:
        with db.read() as s:
            items = [ItemRow(*r) for r in s.execute(
                select(Item.worker, Chunk.worker, Item.chunk_id, Item.started_at, Item.finished_at)
                .outerjoin(Chunk, Chunk.id == Item.chunk_id).where(Item.job_id == job_id))]
            chunks = [ChunkRow(*r) for r in s.execute(
                select(Chunk.id, Chunk.worker, Chunk.finished_at).where(Chunk.job_id == job_id))]
            tokens = s.scalar(select(func.sum(Item.completion_tokens)).where(Item.job_id == job_id)) or 0
    finally:
        db.dispose()
    return items, chunks, tokens


# -- the runs ------------------------------------------------------------------------


def job_lines(args, tok) -> list[dict]:
    """The workload as job lines, each with its own parameters (varied: max_tokens 16..2 x --new-tokens)."""
    from benchmarks.throughput import make_workload

    lines = []
    for it in make_workload(args.workload, args.prompts, args.min_len, args.max_len, args.new_tokens, tok,
                            args.seed, words=tok is None):
        p = it.params
        line = {"prompt": it.text, "max_tokens": p.max_tokens, "temperature": p.temperature}
        if p.temperature:
            line.update(top_p=p.top_p, seed=p.seed)
        if p.stop:
            line["stop"] = list(p.stop)
        lines.append(line)  # ignore_eos is not a line parameter: the random model never says EOS anyway
    return lines


def tokenizer(args):
    if args.engine == "echo":
        return None  # echo counts words: plain word prompts
    from transformers import AutoTokenizer

    from llmbatch.worker.engine import EngineConfig
    from llmbatch.worker.engine.loading import resolve_checkpoint

    return AutoTokenizer.from_pretrained(resolve_checkpoint(EngineConfig(model=args.model, cache_dir=args.cache_dir)))


class Backend:
    """A fresh database per run: a SQLite file, or a PostgreSQL schema dropped afterwards."""

    def __init__(self, kind: str, base_url: str | None, workdir: Path):
        self.kind, self.base_url, self.workdir, self.schemas = kind, base_url, workdir, []

    def new(self, tag: str) -> str:
        if self.kind == "sqlite":
            return f"sqlite:///{self.workdir / (tag + '.db')}"
        from sqlalchemy import create_engine
        from sqlalchemy.schema import CreateSchema

        schema = "bench_" + uuid.uuid4().hex[:12]
        admin = create_engine(self.base_url)
        with admin.begin() as conn:
            conn.execute(CreateSchema(schema))
        admin.dispose()
        self.schemas.append(schema)
        return f"{self.base_url}{'&' if '?' in self.base_url else '?'}options=-csearch_path%3D{schema}"

    def drop(self) -> None:
        if not self.schemas:
            return
        from sqlalchemy import create_engine
        from sqlalchemy.schema import DropSchema

        admin = create_engine(self.base_url)
        with admin.begin() as conn:
            for schema in self.schemas:
                conn.execute(DropSchema(schema, cascade=True))
        admin.dispose()


def start_workers(devices: list[str], env: dict, log) -> list[subprocess.Popen]:
    """`llmbatch worker --gpus D,...` for distinct devices; for a device listed twice (processes
    sharing a GPU, which --gpus refuses), one plain `llmbatch worker` per entry pinned to it."""
    base = [sys.executable, "-m", "llmbatch.jobs.cli", "worker", "--loglevel", "INFO"]
    if len(set(devices)) == len(devices):
        return [subprocess.Popen([*base, "--gpus", ",".join(devices) + ","], env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)]
    return [subprocess.Popen([*base, "-n", f"bench-p{k}-gpu{d}@%h"], env={**env, "CUDA_VISIBLE_DEVICES": d},
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            for k, d in enumerate(devices)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()  # a --gpus parent forwards it to every pinned process
    for p in procs:
        try:
            p.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)


def device_of(worker: str) -> str | None:
    """The GPU a live worker process (named `host:pid ...`) is pinned to, from its environment; None if unknown."""
    try:
        pid = int(worker.split(" ")[0].rsplit(":", 1)[1])
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (IndexError, ValueError, OSError):
        return None
    return next((v.split(b"=", 1)[1].decode() for v in env if v.startswith(b"CUDA_VISIBLE_DEVICES=")), None)


def run_on(devices: list[str], args, lines: list[dict], broker: str, db_url: str, workdir: Path) -> dict:
    """Start the workers on DEVICES, warm them up, time one job; returns the figures."""
    from llmbatch.jobs.db import Database
    from llmbatch.jobs.models import Job, JobStatus

    tag = "gpus-" + "-".join(devices)
    env = {**os.environ, "LLMBATCH_DATABASE_URL": db_url, "LLMBATCH_BROKER_URL": broker, "LLMBATCH_MODEL": args.model,
           "LLMBATCH_ENGINE": args.engine, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("CUDA_VISIBLE_DEVICES", None)  # --gpus names physical devices here
    env.pop("LLMBATCH_GPUS", None)
    if args.cache_dir:
        env["LLMBATCH_MODEL_CACHE"] = args.cache_dir

    def submit(name, rows, chunk_size):
        path = workdir / f"{tag}-{name}"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return subprocess.run([sys.executable, "-m", "llmbatch.jobs.cli", "submit", str(path)],
                              env={**env, "LLMBATCH_CHUNK_SIZE": str(chunk_size)}, capture_output=True, text=True,
                              check=True).stdout.strip()

    # The schema first, so that the worker processes do not race to create it.
    db = Database(db_url)
    db.ensure_schema()
    log_path = workdir / f"{tag}.log"
    log = open(log_path, "ab")
    procs = start_workers(devices, env, log)

    def wait(job_id, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = db.retrying(lambda s: s.get(Job, job_id).status, write=False)
            if status in (JobStatus.completed, JobStatus.cancelled):
                return
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.25)
        raise RuntimeError(f"job {job_id} unfinished after {timeout}s\n{log_path.read_text()[-3000:]}")

    try:
        t0 = time.monotonic()
        while log_path.read_text(errors="replace").count("ready: model ") < len(devices):  # every process has its model
            if any(p.poll() is not None for p in procs) or time.monotonic() - t0 > args.timeout:
                raise RuntimeError(f"workers did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        loaded_s = time.monotonic() - t0
        # Warm-up: small chunks, so every process runs some (CUDA graphs, allocator) before the timing.
        warm = lines[: max(8, 16 * len(devices))]
        wait(submit("warmup.jsonl", warm, max(1, len(warm) // (4 * len(devices)))), args.timeout)
        job_id = submit("job.jsonl", lines, args.chunk_size)
        wait(job_id, args.timeout)
        items, chunks, tokens = read_job(db_url, job_id)
        pinned = {c.worker: device_of(c.worker) for c in chunks if c.worker}  # while the processes live
    finally:
        stop(procs)
        log.close()
        db.dispose()
    fig = figures(items, chunks, processes=len(devices))
    for w in fig["workers"]:
        w["device"] = pinned.get(w["worker"])
    ok = sum(1 for i in items if i.finished)
    return {"devices": devices, "items": len(items), "finished": ok, "chunks": len(chunks), "output_tokens": tokens,
            "output_tok_s": round(tokens / fig["wall_s"], 1), "load_s": round(loaded_s, 1), **fig}


def worker_table(run: dict) -> str:
    head = "| worker | GPU | items | chunks | busy s | generating s | start lag s | idle at end s | idle / wall |\n" \
           "|---|---|---|---|---|---|---|---|---|\n"
    return head + "".join(f"| {w['worker']} | {w.get('device')} | {w['items']} | {w['chunks']} | {w['busy_s']} | "
                          f"{w['generating_s']} | "
                          f"{w['start_lag_s']} | {w['idle_end_s']} | {100 * w['idle_end_frac']:.1f}% |\n"
                          for w in run["workers"])


def parse_args(argv: list[str] | None):
    from benchmarks.throughput import WORKLOADS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="0,1", help="the devices of the multi-GPU run (the baseline uses the first); "
                                                   "a device listed twice runs two processes on it")
    ap.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite",
                    help="postgresql: a fresh schema per run in LLMBATCH_DATABASE_URL's database")
    ap.add_argument("--broker-url", default=None,
                    help="a Redis to use (default: start a redis-server, or a carried .whl/redis one)")
    ap.add_argument("--model", help="checkpoint (default: the random Llama-3.1-8B, built if missing)")
    ap.add_argument("--model-dir", default="/tmp/llmbatch-random-llama31-8b")
    ap.add_argument("--layer-std", type=float, default=0.002)
    ap.add_argument("--cache-dir")
    ap.add_argument("--engine", choices=["model", "echo"], default=None, help="default: model (echo with --smoke)")
    ap.add_argument("--workload", default="varied", choices=WORKLOADS, help="a benchmarks/throughput.py workload")
    ap.add_argument("--prompts", type=int, help="lines in the job (default 16,384; 256 with --smoke)")
    ap.add_argument("--chunk-size", type=int, help="items per chunk (default 512; 32 with --smoke)")
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128, help="varied: max_tokens 16..2x this per line")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--skip-baseline", action="store_true", help="run only the multi-process job")
    ap.add_argument("--baseline-json", help="with --skip-baseline: the speed-up against this earlier --json-out's "
                                            "multi-process run (e.g. `--gpus 0 --skip-baseline` in a call before)")
    ap.add_argument("--smoke", action="store_true", help="CPU, echo engine (unless --engine model), short lines")
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    args.devices = [d.strip() for d in args.gpus.split(",") if d.strip()]
    if not args.devices:
        ap.error(f"--gpus {args.gpus!r}: name at least one device")
    if args.baseline_json:
        try:
            args.baseline = json.loads(Path(args.baseline_json).read_text())["many"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            ap.error(f"--baseline-json {args.baseline_json}: not a multi_gpu.py --json-out file ({exc})")
    if args.backend == "postgresql":
        url = os.environ.get("LLMBATCH_DATABASE_URL", "")
        if not url.startswith("postgresql"):
            ap.error("--backend postgresql needs LLMBATCH_DATABASE_URL=postgresql+psycopg://USER@HOST:PORT/DB"
                     + (f" (it is {url.split(':', 1)[0]}:...)" if url else " (it is not set)"))
        args.base_url = url
    prompts, chunk_size = (256, 32) if args.smoke else (16384, 512)
    args.prompts = prompts if args.prompts is None else args.prompts
    args.chunk_size = chunk_size if args.chunk_size is None else args.chunk_size
    if args.smoke:
        args.engine = args.engine or "echo"
        args.new_tokens, args.min_len, args.max_len = min(args.new_tokens, 8), 8, 32
        args.model = args.model or "smollm2-135m-instruct"
    args.engine = args.engine or "model"
    if args.prompts < 1 or args.chunk_size < 1:
        ap.error("--prompts and --chunk-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    devices = args.devices
    if args.model is None:
        from benchmarks.throughput import build_random_model

        build_random_model(Path(args.model_dir), args.layer_std)
        args.model = args.model_dir
    lines = job_lines(args, tokenizer(args))
    from benchmarks.e2e_worker import start_redis

    with tempfile.TemporaryDirectory(prefix="llmbatch-multi-gpu-") as tmp:
        workdir = Path(tmp)
        backend = Backend(args.backend, getattr(args, "base_url", None), workdir)
        broker, redis_proc = (args.broker_url, None) if args.broker_url else start_redis(workdir)
        try:
            one = getattr(args, "baseline", None)
            if not args.skip_baseline:
                one = run_on(devices[:1], args, lines, broker, backend.new("one"), workdir)
                print(f"1 process ({devices[0]}): {one['output_tok_s']} tok/s, wall {one['wall_s']} s", flush=True)
            many = run_on(devices, args, lines, broker, backend.new("many"), workdir)
            print(f"{len(devices)} processes ({','.join(devices)}): {many['output_tok_s']} tok/s, wall "
                  f"{many['wall_s']} s", flush=True)
        finally:
            if redis_proc:
                redis_proc.terminate()
            backend.drop()
    gpu = "cpu"
    if args.engine == "model":
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    distinct = len(set(devices)) == len(devices)
    target = round(SPEEDUP_PER_GPU * len(devices), 3) if distinct and len(devices) > 1 and not args.smoke else None
    speedup = round(many["output_tok_s"] / one["output_tok_s"], 3) if one else None
    result = {"gpu": gpu, "backend": args.backend, "engine": args.engine, "model": args.model,
              "workload": args.workload, "prompts": args.prompts, "chunk_size": args.chunk_size,
              "new_tokens": args.new_tokens, "one": one, "many": many, "speedup": speedup, "target_speedup": target,
              "idle_target_frac": IDLE_TARGET, "idle_met": many["max_idle_end_frac"] <= IDLE_TARGET}
    print(json.dumps(result, indent=2))
    for name, run in (("1 process", one), (f"{len(devices)} processes", many)):
        if run:
            print(f"\n{name}, {args.backend}: wall {run['wall_s']} s, hoarded items {run['hoarded_items']}\n"
                  + worker_table(run))
    if target and speedup:
        print(f"speed-up {speedup:.2f}x over one GPU with {len(devices)} GPUs (target >= {target}x): "
              + ("MET" if speedup >= target else "NOT MET"))
    print(f"end-of-job idle: worst {100 * many['max_idle_end_frac']:.1f}% of the wall time (target <= 5%): "
          + ("MET" if result["idle_met"] else "NOT MET"))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
