"""Scale: a million-line job through submit, status and export, on SQLite and PostgreSQL.

Each step runs the real CLI (`python -m jobs.cli ...`) in a fresh process; its wall time and
peak RSS (os.wait4's ru_maxrss of that process alone) are recorded. Targets (issue 5), for
1,000,000 lines of about 200 MB on the 2-core test machine:

  submit (parse, validate, store, enqueue to Redis)   <= 60 s,   peak RSS < 500 MB
  status of that job (the read)                        <= 100 ms
  export, each of jsonl / openai / csv                 <= 60 s,   peak RSS < 500 MB

Between submit and export every item is marked succeeded, with a plausible output, by one bulk
SQL UPDATE (not timed as a target), so the export has real content.

  python benchmarks/scale.py                              # 1,000,000 lines, both backends
  python benchmarks/scale.py --lines 20000 --backend sqlite --no-record
  python benchmarks/scale.py --json-out scale.json        # also write the rows as JSON

Needs Redis (default redis://127.0.0.1:6379/11, flushed before and after) and, for PostgreSQL,
postgresql+psycopg://postgres@127.0.0.1:5432/test (a fresh schema per run, dropped after).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Scale"
MODEL = "scale-bench-model"
LOAD_AT_START = (0.0, 0.0, 0.0)
TARGETS = {"submit": 60.0, "export": 60.0, "status_ms": 100.0, "rss_mb": 500.0}

WORDS = ("the a of to and in is it that for on with as was at by be this from or have an they which one you "
         "were her all she there would their we him been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much your "
         "way well down should because each just those people how too little state good very make world still own "
         "see men work long get here between both life being under never day same another know while last might "
         "us great old year off come since against go came right used take three summarise translate classify "
         "review sentiment document paragraph question answer explain briefly café naïve résumé 東京 データ").split()
SYSTEM = ["You are a helpful assistant.", "You are a terse classifier. Answer with one word.",
          "You summarise documents in two sentences."]


# -- the input file -----------------------------------------------------------------------------------


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


def make_line(rng: random.Random, n: int) -> str:
    """One input line: raw prompt, chat messages or an OpenAI batch request, some with per-line params."""
    cid = f"req-{n:07d}"
    kind = rng.random()
    params = {}
    r = rng.random()
    if r < 0.10:
        params = {"max_tokens": rng.choice([16, 32, 64, 128])}
    elif r < 0.15:
        params = {"temperature": round(rng.random(), 2), "top_p": 0.9, "seed": rng.randint(0, 10**6)}
    elif r < 0.18:
        params = {"stop": ["\n\n", "###"], "max_new_tokens": 48}
    if kind < 0.40:
        obj = {"custom_id": cid, "prompt": _text(rng, 14, 32), **params}
    elif kind < 0.75:
        msgs = [{"role": "user", "content": _text(rng, 10, 24)}]
        if rng.random() < 0.5:
            msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEM)})
        obj = {"custom_id": cid, "messages": msgs, **params}
    else:
        params.pop("max_new_tokens", None)
        if rng.random() < 0.8:
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": _text(rng, 8, 20)}],
                    "max_tokens": 64, "temperature": 0, **params}
            url = "/v1/chat/completions"
        else:
            body = {"model": "gpt-3.5-turbo-instruct", "prompt": _text(rng, 8, 20), "max_tokens": 64, **params}
            url = "/v1/completions"
        obj = {"custom_id": cid, "method": "POST", "url": url, "body": body}
    return json.dumps(obj, ensure_ascii=False)


def make_input(path: Path, lines: int, seed: int, bad_every: int) -> Path:
    if path.exists():
        return path
    rng = random.Random(seed)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        buf = []
        for n in range(1, lines + 1):
            if bad_every and n % bad_every == 0:
                buf.append('{"custom_id": "req-%07d", "prompt": ' % n)  # invalid JSON: a failed item
            else:
                buf.append(make_line(rng, n))
            if len(buf) >= 10_000:
                f.write("\n".join(buf) + "\n")
                buf.clear()
        if buf:
            f.write("\n".join(buf) + "\n")
    tmp.replace(path)
    return path


# -- measuring a step in a fresh process --------------------------------------------------------------


def run_measured(argv: list[str], env: dict, stdout=subprocess.PIPE) -> dict:
    """Run argv; wall time and the peak RSS of that one process (wait4), and its output."""
    t0 = time.perf_counter()
    out_f = tempfile.TemporaryFile() if stdout is subprocess.PIPE else stdout
    err_f = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, stdout=out_f, stderr=err_f, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err_f.seek(0)
    stderr = err_f.read().decode(errors="replace")
    stdout_text = ""
    if stdout is subprocess.PIPE:
        out_f.seek(0)
        stdout_text = out_f.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"step failed ({proc.returncode}): {shlex.join(argv)}\n{stderr[-4000:]}")
    return {"wall_s": wall, "rss_mb": usage.ru_maxrss / 1024, "stdout": stdout_text, "stderr": stderr}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmbatch.jobs.cli", *args]


# -- helpers that run in their own process (`scale.py _status URL JOB`, `scale.py _finish URL JOB`) ----


def _status_probe(url: str, job_id: str, repeats: int) -> None:
    """Time the status read itself: what `status JOB --json` does once the process is up."""
    from llmbatch.jobs import service
    from llmbatch.jobs.db import Database

    t0 = time.perf_counter()
    db = Database(url)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        with db.read() as s:
            summary = service.job_summary(service.get_job(s, job_id))
        json.dumps(summary)
        times.append((time.perf_counter() - t) * 1000)
    print(json.dumps({"first_ms": times[0], "median_ms": statistics.median(times[1:] or times),
                      "max_ms": max(times[1:] or times), "summary": summary,
                      "total_s": time.perf_counter() - t0}))


def _finish_all(url: str, job_id: str) -> None:
    """Mark every pending item succeeded with a plausible output, in one UPDATE, and the job completed."""
    from datetime import timedelta

    from sqlalchemy import String, case, cast, literal, select, update
    from sqlalchemy.sql import func

    from llmbatch.jobs.db import Database
    from llmbatch.jobs.models import Item, ItemStatus, Job, JobStatus, utcnow

    db = Database(url)
    pg = not db.is_sqlite
    # Outputs vary in length and content (quotes, a newline, a leading '-' the CSV escapes).
    output = (case((Item.line % 7 == 0, literal("-")), else_=literal("")) + literal("Answer for ") + Item.custom_id
              + literal(': "the result" is ') + cast(Item.line * 37 % 1000, String)
              + case((Item.line % 3 == 0, literal(".\nSecond paragraph, with a comma, and more words.")),
                     else_=literal(" - done.")))
    now = utcnow()
    t0 = time.perf_counter()
    with db.write() as s:
        n = s.execute(
            update(Item).where(Item.job_id == job_id, Item.status == ItemStatus.pending).values(
                status=ItemStatus.succeeded, output=output,
                finish_reason=case((Item.line % 5 == 0, literal("length")), else_=literal("stop")),
                prompt_tokens=20 + Item.line % 50, completion_tokens=5 + Item.line % 60,
                started_at=now - timedelta(seconds=1), finished_at=now, latency_ms=100 + Item.line % 900,
                worker="bench@host", attempts=1)
        ).rowcount
        totals = select(func.coalesce(func.sum(Item.prompt_tokens), 0), func.coalesce(func.sum(Item.completion_tokens), 0)
                        ).where(Item.job_id == job_id)
        prompt_tokens, completion_tokens = s.execute(totals).one()
        s.execute(update(Job).where(Job.id == job_id).values(
            succeeded=Job.succeeded + n, pending=Job.pending - n, status=JobStatus.completed,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, started_at=now, finished_at=now))
    if pg:
        with db.engine.connect() as conn:  # fresh statistics, as autovacuum would have them soon
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE items")
    print(json.dumps({"updated": n, "wall_s": time.perf_counter() - t0}))


# -- one backend --------------------------------------------------------------------------------------


def _pg_schema(base_url: str, schema: str, drop: bool = False) -> str:
    from sqlalchemy import create_engine
    from sqlalchemy.schema import CreateSchema, DropSchema

    admin = create_engine(base_url)
    with admin.begin() as conn:
        conn.execute(DropSchema(schema, cascade=True) if drop else CreateSchema(schema))
    admin.dispose()
    return f"{base_url}?options=-csearch_path%3D{schema}"


def bench_backend(backend: str, input_path: Path, lines: int, args, work: Path) -> list[dict]:
    import redis

    rows: list[dict] = []
    schema = None
    if backend == "sqlite":
        db_path = work / f"scale-{uuid.uuid4().hex[:8]}.db"
        url = f"sqlite:///{db_path}"
    else:
        schema = "scale_" + uuid.uuid4().hex[:10]
        url = _pg_schema(args.postgres_url, schema)
    env = {**os.environ, "LLMBATCH_DATABASE_URL": url, "LLMBATCH_BROKER_URL": args.redis_url,
           "LLMBATCH_HOME": str(work), "PYTHONPATH": str(ROOT)}
    broker = redis.Redis.from_url(args.redis_url)
    broker.flushdb()
    try:
        run_measured(cli("db", "upgrade"), env)
        size_mb = input_path.stat().st_size / 1e6

        # 1. submit: parse, validate, store, enqueue.
        step = run_measured(cli("submit", str(input_path), "--model", MODEL, "--json", "--max-tokens", "64"), env)
        info = json.loads(step["stdout"])
        job_id = info["id"]
        from llmbatch.worker.app import queue_name

        queued = broker.llen(queue_name(MODEL))
        assert info["total"] == lines, info
        assert queued == info["chunks"], (queued, info["chunks"])
        assert step["stdout"].count("\n") == 1, "submit's stdout must be one line"
        rows.append(dict(backend=backend, step="submit", wall_s=step["wall_s"], rss_mb=step["rss_mb"],
                         target=f"<= {TARGETS['submit']:.0f} s",
                         note=f"{lines:,} lines, {size_mb:.0f} MB, {info['chunks']:,} chunks queued"))
        print(f"[{backend}] submit: {step['wall_s']:.1f} s, {step['rss_mb']:.0f} MB", file=sys.stderr)

        # 2. status: the read itself (median of repeats, warm connection) and the whole CLI command.
        probe = run_measured([sys.executable, __file__, "_status", url, job_id, str(args.status_repeats)], env)
        p = json.loads(probe["stdout"])
        assert p["summary"]["total"] == lines
        clis = []
        for _ in range(5):
            r = run_measured(cli("status", job_id, "--json"), env)
            assert json.loads(r["stdout"])["id"] == job_id
            clis.append(r)
        cli_wall = statistics.median(r["wall_s"] for r in clis)
        rows.append(dict(backend=backend, step="status (read)", wall_s=p["median_ms"] / 1000,
                         rss_mb=max(r["rss_mb"] for r in clis), target=f"<= {TARGETS['status_ms']:.0f} ms",
                         note=(f"median of {args.status_repeats} reads {p['median_ms']:.2f} ms (max "
                               f"{p['max_ms']:.2f}, first incl. connect {p['first_ms']:.1f}); whole "
                               f"`status --json` command incl. Python start: {cli_wall * 1000:.0f} ms")))
        print(f"[{backend}] status: {p['median_ms']:.2f} ms read, {cli_wall * 1000:.0f} ms command", file=sys.stderr)

        # 3. every item succeeded (setup for export, not a target).
        fin = run_measured([sys.executable, __file__, "_finish", url, job_id], env)
        f = json.loads(fin["stdout"])
        rows.append(dict(backend=backend, step="(mark all succeeded)", wall_s=fin["wall_s"], rss_mb=fin["rss_mb"],
                         target="setup", note=f"one bulk UPDATE of {f['updated']:,} rows"))

        # 4. export in each format.
        for fmt in ("jsonl", "openai", "csv"):
            out = work / f"export.{fmt}"
            step = run_measured(cli("export", job_id, "-o", str(out), "--format", fmt), env)
            with open(out, "rb") as fh:
                n = sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
            expect = lines + (1 if fmt == "csv" else 0)
            if fmt == "csv":  # outputs with a newline are quoted and span two physical lines
                assert n >= expect, (n, expect)
            else:
                assert n == expect, (fmt, n, expect)
            out_mb = out.stat().st_size / 1e6
            out.unlink()
            rows.append(dict(backend=backend, step=f"export {fmt}", wall_s=step["wall_s"], rss_mb=step["rss_mb"],
                             target=f"<= {TARGETS['export']:.0f} s", note=f"{lines:,} rows, {out_mb:.0f} MB"))
            print(f"[{backend}] export {fmt}: {step['wall_s']:.1f} s, {step['rss_mb']:.0f} MB", file=sys.stderr)
    finally:
        broker.flushdb()
        if schema:
            _pg_schema(args.postgres_url, schema, drop=True)
        else:
            for suffix in ("", "-wal", "-shm"):
                Path(str(db_path) + suffix).unlink(missing_ok=True)
    return rows


def verdict(row: dict) -> str:
    if row["target"] == "setup":
        return ""
    if row["step"].startswith("status"):
        ok = row["wall_s"] * 1000 <= TARGETS["status_ms"]
    else:
        ok = row["wall_s"] <= TARGETS["submit"] and row["rss_mb"] < TARGETS["rss_mb"]
    return "yes" if ok else "**no**"


def markdown(rows: list[dict], command: str, lines: int, size_mb: float) -> str:
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    load = ", ".join(f"{x:.1f}" for x in LOAD_AT_START)
    date = datetime.date.today().isoformat()
    out = [SECTION, "",
           f"`benchmarks/scale.py`: {lines:,}-line JSONL input ({size_mb:.0f} MB; prompt, messages and OpenAI batch "
           "lines, some with per-line parameters, 1 in 10,000 invalid), each step the real CLI in a fresh process. "
           "Wall time is the whole command, Python start included; peak RSS is that process's ru_maxrss. "
           "Status is the read itself (median, warm connection); the whole command's time is in the notes.", "",
           f"- Machine: {machine}. Date: {date}.",
           f"- Services: PostgreSQL and Redis on the same machine. Load average when the run began: {load}.",
           f"- Command: `{command}`", "",
           "| backend | step | wall | peak RSS | target | met | notes |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        wall = f"{r['wall_s'] * 1000:.2f} ms" if r["step"].startswith("status") else f"{r['wall_s']:.1f} s"
        out.append(f"| {r['backend']} | {r['step']} | {wall} | {r['rss_mb']:.0f} MB | {r['target']} | "
                   f"{verdict(r)} | {r['note']} |")
    return "\n".join(out) + "\n"


GENERATED_END = "<!-- end of the table scale.py writes; notes below it are kept -->"


def record(section: str) -> None:
    """Replace the generated part of our own section of RESULTS.md; leave the rest of the file alone.

    Our section runs from '## Scale' to the next '## ' heading; what follows GENERATED_END in it
    (notes written by hand) is kept.
    """
    section += "\n" + GENERATED_END + "\n"
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip() == SECTION), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        mine = lines[start:end]
        keep = next((i for i, l in enumerate(mine) if l.rstrip() == GENERATED_END), None)
        notes = "".join(mine[keep + 1:]) if keep is not None else ""
        rest = "".join(lines[end:])
        new = "".join(lines[:start]) + section + notes + ("\n" + rest if rest and not notes.endswith("\n\n") else rest)
    RESULTS_MD.write_text(new)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_status":
        return _status_probe(argv[1], argv[2], int(argv[3]))
    if argv and argv[0] == "_finish":
        return _finish_all(argv[1], argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--bad-every", type=int, default=10_000, help="every Nth line is invalid JSON (0: none)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llmbatch-scale",
                    help="input file (kept, reused) and scratch databases")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    ap.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--status-repeats", type=int, default=21)
    ap.add_argument("--no-record", action="store_true", help="don't write benchmarks/RESULTS.md")
    args = ap.parse_args(argv)

    global LOAD_AT_START
    LOAD_AT_START = os.getloadavg()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    input_path = make_input(args.workdir / f"input-{args.lines}-{args.seed}-{args.bad_every}.jsonl",
                            args.lines, args.seed, args.bad_every)
    size_mb = input_path.stat().st_size / 1e6
    print(f"input {input_path} ({size_mb:.0f} MB) ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    rows = []
    for backend in backends:
        rows += bench_backend(backend, input_path, args.lines, args, args.workdir)
    command = "python benchmarks/scale.py " + shlex.join(a for a in argv if a)
    md = markdown(rows, command.strip(), args.lines, size_mb)
    print(md)
    if args.json_out:
        args.json_out.write_text(json.dumps({"command": command, "lines": args.lines, "input_mb": size_mb,
                                             "cores": os.cpu_count(), "date": datetime.date.today().isoformat(),
                                             "rows": rows}, indent=2))
    if not args.no_record:
        record(md)


if __name__ == "__main__":
    main()
