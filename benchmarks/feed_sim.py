"""The end of a job on K GPUs, without GPUs: the real runner and database, a paced stand-in for the engine.

issue 23 asks whether the engine's next-chunk feed (worker/runner.py: `more()` claims the job's
next pending chunk whenever the engine asks) lets one worker hoard chunks while another idles
at the job's end. The echo engine cannot show it: it asks for more only when fewer than 64
requests wait. The real scheduler (worker/engine/scheduler.py, `run_slots`) asks whenever fewer
requests wait than it has slots, every MORE_EVERY_S; with 512 slots and 512-item chunks that is
as soon as a chunk has been admitted, so each worker holds a whole chunk that nothing runs yet.

`PacedEngine` follows run_slots' policy with time scaled down: `slots` rows decode together, one
step every `step_s` (every row makes one token a step, up to its max_tokens; no prefill cost),
rows are admitted largest max_tokens first once `refill_fraction` of the slots are free, `more` is asked while fewer
requests wait than there are slots (at most every `ask_s`, or at once when idle), results are
yielded every `flush_s`. K threads stand in for K pinned workers: each takes chunk ids from one
queue (Celery's messages, prefetch 1) and calls the real `runner.run_chunk` against SQLite or
PostgreSQL. The figures are benchmarks/multi_gpu.py's, read from the same rows.

`--feed-ahead N` tries the proposed fix: the engine asks for more only while it holds fewer than
slots + N requests (running or waiting), so a worker claims its next chunk just before its batch
would run short, not one chunk early. It is applied in this stand-in, not in worker/runner.py.

    python benchmarks/feed_sim.py --workers 4 --prompts 16384 --chunk-size 512
    python benchmarks/feed_sim.py --workers 4 --prompts 16384 --chunk-size 512 --feed-ahead 64
"""

from __future__ import annotations

import argparse
import heapq
import io
import json
import os
import queue
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class PaceConfig:
    slots: int = 512  # EngineConfig.max_batch_size
    step_s: float = 0.005  # one decode step; about 65 ms on an H200 at 512 rows with prefill: 13x faster
    ask_s: float = 0.04  # scheduler.MORE_EVERY_S (0.5 s), scaled the same
    flush_s: float = 0.08  # EngineConfig.flush_seconds (1.0 s), scaled the same
    refill_fraction: float = 0.125  # EngineConfig.refill_fraction
    feed_ahead: int | None = None  # the fix under test: ask only while holding < slots + feed_ahead requests


class PacedEngine:
    """run_slots' admission and feed policy, with a sleep for each decode step instead of a model."""

    def __init__(self, config: PaceConfig):
        self.config = config
        self.asks = self.claims = self.steps = 0  # `more` calls, those that brought requests, decode steps
        # Seconds the loop stood still for the runner: inside `more` (claims), and while a yielded
        # batch of results was being written (the runner writes before it resumes the generator).
        self.more_s = self.write_s = 0.0
        self.max_waiting = 0  # the most requests claimed and not yet running: what this worker hoards

    def generate(self, requests, more=None):
        from llmbatch.worker.engine.types import Result, Usage

        c = self.config
        # Largest need first, as run_slots admits (its need is prompt + max_tokens; the prompt is a few words here).
        waiting = deque(sorted(requests, key=lambda r: -r.params.max_tokens))
        active: list[tuple[int, int, float, object]] = []  # heap of (finish step, tie, started, request)
        done: list = []
        step, tie, asked, last_flush = 0, 0, 0.0, time.monotonic()
        refill_at = max(1, int(c.slots * c.refill_fraction))
        while True:
            if active:
                time.sleep(c.step_s)
                step += 1
                self.steps += 1
                now = time.time()
                while active and active[0][0] <= step:
                    _, _, started, r = heapq.heappop(active)
                    done.append(Result(id=r.id, output="", finish_reason="length",
                                       usage=Usage(8, r.params.max_tokens), started_at=started, finished_at=now))
            held = len(active) + len(waiting)
            if more is not None and len(waiting) < c.slots and (c.feed_ahead is None or
                                                                held < c.slots + c.feed_ahead) and (
                    not (waiting or active) or time.monotonic() - asked >= c.ask_s):
                asked = time.monotonic()
                t = time.perf_counter()
                fresh = more()
                self.more_s += time.perf_counter() - t
                self.asks += 1
                self.claims += bool(fresh)
                if fresh:
                    waiting = deque(sorted([*waiting, *fresh], key=lambda r: -r.params.max_tokens))
                    self.max_waiting = max(self.max_waiting, len(waiting))
            free = c.slots - len(active)
            if waiting and free and (not active or free >= refill_at):
                now = time.time()
                for _ in range(min(free, len(waiting))):
                    r = waiting.popleft()
                    tie += 1
                    heapq.heappush(active, (step + r.params.max_tokens, tie, now, r))
            idle = not (waiting or active)
            if done and (idle or time.monotonic() - last_flush >= c.flush_s):
                t = time.perf_counter()
                yield done
                self.write_s += time.perf_counter() - t
                done, last_flush = [], time.monotonic()
            if idle:
                return


def submit(db_url: str, lines: list[dict], chunk_size: int) -> tuple[str, list[int]]:
    from llmbatch.jobs import service
    from llmbatch.jobs.db import Database
    from llmbatch.jobs.settings import Settings

    db = Database(db_url)
    db.ensure_schema()
    fp = io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())
    settings = Settings.from_env(database_url=db_url, chunk_size=chunk_size)
    with db.write() as s:
        sub = service.submit(s, fp, settings, model="paced")
        job_id, chunk_ids = sub.job.id, list(sub.chunk_ids)
    db.dispose()
    return job_id, chunk_ids


def drain(db_url: str, chunk_ids: list[int], workers: int, config: PaceConfig) -> dict:
    """K threads, each a worker taking chunk messages from one queue, run the job to its end."""
    from llmbatch.jobs.db import Database
    from llmbatch.worker.runner import run_chunk

    messages: queue.Queue[int] = queue.Queue()
    for cid in chunk_ids:
        messages.put(cid)
    engines = [PacedEngine(config) for _ in range(workers)]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        db = Database(db_url)
        try:
            while True:
                try:
                    cid = messages.get_nowait()
                except queue.Empty:
                    return  # every message is taken: a chunk still pending is fed to whoever asks
                run_chunk(db, engines[k], cid, f"sim-gpu{k}", lease_seconds=600)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=worker, args=(k,), name=f"sim-gpu{k}") for k in range(workers)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {"drain_s": round(time.monotonic() - t0, 2), "asks": [e.asks for e in engines],
            "claims": [e.claims for e in engines], "steps": [e.steps for e in engines],
            "max_waiting": [e.max_waiting for e in engines],
            "more_s": [round(e.more_s, 2) for e in engines], "write_s": [round(e.write_s, 2) for e in engines]}


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.multi_gpu import Backend, figures, job_lines, read_job
    from benchmarks.throughput import WORKLOADS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4, help="simulated GPUs (threads)")
    ap.add_argument("--prompts", type=int, default=16384)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--workload", default="varied", choices=WORKLOADS)
    ap.add_argument("--new-tokens", type=int, default=128, help="varied: max_tokens (steps) 16..2x this per line")
    ap.add_argument("--slots", type=int, default=PaceConfig.slots)
    ap.add_argument("--step-ms", type=float, default=1000 * PaceConfig.step_s)
    ap.add_argument("--feed-ahead", type=int, help="the fix: hold at most slots + N requests before asking for more")
    ap.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite",
                    help="postgresql: a fresh schema in LLMBATCH_DATABASE_URL's database")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    if min(args.workers, args.prompts, args.chunk_size, args.slots) < 1 or args.step_ms <= 0:
        ap.error("--workers, --prompts, --chunk-size and --slots must be at least 1, --step-ms above 0")
    url = os.environ.get("LLMBATCH_DATABASE_URL", "")
    if args.backend == "postgresql" and not url.startswith("postgresql"):
        ap.error("--backend postgresql needs LLMBATCH_DATABASE_URL=postgresql+psycopg://USER@HOST:PORT/DB")
    scale = args.step_ms / 65.0  # PaceConfig's defaults are for 5 ms a step
    config = PaceConfig(slots=args.slots, step_s=args.step_ms / 1000, ask_s=0.5 * scale, flush_s=1.0 * scale,
                        feed_ahead=args.feed_ahead)
    args.min_len, args.max_len = 4, 8  # the prompt text is never read
    lines = job_lines(args, None)
    with tempfile.TemporaryDirectory(prefix="llmbatch-feed-sim-") as tmp:
        backend = Backend(args.backend, url, Path(tmp))
        try:
            db_url = backend.new("sim")
            job_id, chunk_ids = submit(db_url, lines, args.chunk_size)
            run = drain(db_url, chunk_ids, args.workers, config)
            items, chunks, tokens = read_job(db_url, job_id)
        finally:
            backend.drop()
    fig = figures(items, chunks, processes=args.workers)
    for w in fig["workers"]:
        w["device"] = w["worker"].removeprefix("sim-gpu")  # simulated
    # Decode steps per worker at full batches and a perfect split: the floor of the steps each one ran.
    ideal = sum(line["max_tokens"] for line in lines) / (args.slots * args.workers)
    result = {"backend": args.backend, "workers": args.workers, "prompts": args.prompts,
              "chunk_size": args.chunk_size, "slots": args.slots, "step_ms": args.step_ms,
              "feed_ahead": args.feed_ahead, "finished": sum(1 for i in items if i.finished),
              "ideal_steps": round(ideal), **run, **fig}
    from benchmarks.multi_gpu import worker_table

    print(f"{args.workers} simulated GPUs, {args.backend}, chunk {args.chunk_size}, slots {args.slots}, "
          f"feed-ahead {args.feed_ahead}: wall {fig['wall_s']} s, steps {run['steps']} "
          f"(ideal {result['ideal_steps']}), worst idle at end {100 * fig['max_idle_end_frac']:.1f}%, "
          f"hoarded items {fig['hoarded_items']}, claims per worker {run['claims']}, most claimed and not running "
          f"{run['max_waiting']}, blocked in claims {run['more_s']} s, in writes {run['write_s']} s\n"
          + worker_table(fig))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
