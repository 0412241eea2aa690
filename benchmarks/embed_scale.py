"""Scale of an embedding job (issue 21): a million lines submit, run and export to Parquet.

Each step runs in a fresh process; its wall time and peak RSS (os.wait4's ru_maxrss of that
process alone) are recorded, as benchmarks/scale.py does for text jobs:

  submit   `llmbatch submit --task embed` of N native embedding lines (parse, validate, store, enqueue)
  run      every chunk through worker/runner.run_chunk with the echo engine's `embed` (a unit
           vector per input, ECHO_DIM = 384 float32s, from the input's CRC): the real result path,
           float32 bytes written per micro-batch, without a model
  export   `llmbatch export --format parquet` (row groups of 16,384 vectors); `--formats parquet,jsonl`
           times the JSON text export too

  python benchmarks/embed_scale.py                          # 1,000,000 lines on SQLite
  python benchmarks/embed_scale.py --lines 20000 --no-record
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scale import WORDS, cli, run_measured  # noqa: E402

RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Embedding scale (issue 21)"
MODEL = "scale-embed-model"


def make_input(path: Path, lines: int, seed: int) -> Path:
    """Native embedding lines of 8-120 words; every 50th has two inputs."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(lines):
            texts = [" ".join(rng.choices(WORDS, k=rng.randint(8, 120))) for _ in range(2 if i % 50 == 0 else 1)]
            f.write('{"custom_id": "d%d", "input": %s}\n' % (i, str(texts).replace("'", '"')))
    return path


def _drain(url: str, job_id: str) -> None:
    """Run every chunk of the job through the runner with the echo engine (its own process)."""
    from sqlalchemy import select

    from llmbatch.jobs.db import Database
    from llmbatch.jobs.models import Chunk
    from llmbatch.worker.echo import EchoEngine
    from llmbatch.worker.runner import run_chunk

    db = Database(url)
    with db.read() as s:
        chunk_ids = list(s.scalars(select(Chunk.id).where(Chunk.job_id == job_id).order_by(Chunk.seq)))
    engine = EchoEngine()
    for chunk_id in chunk_ids:
        run_chunk(db, engine, chunk_id, "embed-scale [echo engine]", 300, prefetch=False)


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_drain":
        return _drain(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llmbatch-embed-scale")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    ap.add_argument("--formats", default="parquet",
                    help="export formats to time, comma-separated (parquet first; jsonl writes every float as text)")
    ap.add_argument("--no-record", action="store_true", help="don't write benchmarks/RESULTS.md")
    args = ap.parse_args(argv)

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("*"):
        old.unlink()
    src = make_input(work / "in.jsonl", args.lines, args.seed)
    url = f"sqlite:///{work / 'scale.db'}"
    env = {**os.environ, "LLMBATCH_DATABASE_URL": url, "LLMBATCH_BROKER_URL": args.redis_url,
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    run_measured(cli("db", "upgrade"), env)
    rows = []
    step = run_measured(cli("submit", str(src), "--task", "embed", "--model", MODEL), env)
    job_id = step["stdout"].strip()
    rows.append(("submit", step))
    rows.append(("run (echo embed)", run_measured([sys.executable, __file__, "_drain", url, job_id], env)))
    for fmt in args.formats.split(","):
        out = work / f"out.{fmt}"
        rows.append((f"export --format {fmt}", run_measured(cli("export", job_id, "--format", fmt, "-o", str(out)), env)))
        rows[-1][1]["size_mb"] = out.stat().st_size / 1e6
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(work / "out.parquet").metadata
    db_mb = (work / "scale.db").stat().st_size / 1e6
    def size(r: dict) -> str:
        return f"{r['size_mb']:.0f} MB" if "size_mb" in r else ""

    table = "\n".join(f"| {name} | {r['wall_s']:.1f} | {r['rss_mb']:.0f} | {size(r)} |" for name, r in rows)
    section = (f"{SECTION}\n\n{args.lines:,} native embedding lines (8-120 words, every 50th with two inputs), "
               f"SQLite, 384-dimension float32 vectors from the echo engine; {platform.node()}, "
               f"{os.cpu_count()} CPUs, {datetime.date.today()}.\n`python benchmarks/embed_scale.py "
               f"--lines {args.lines}`\n\n| step | wall s | peak RSS MB | output |\n|---|---|---|---|\n{table}\n\n"
               f"Database after the run: {db_mb:.0f} MB; Parquet: {meta.num_rows:,} rows in {meta.num_row_groups} "
               f"row groups.\n")
    print(section)
    if not args.no_record:
        text = RESULTS_MD.read_text()
        start = text.find(SECTION + "\n")
        if start >= 0:
            end = text.find("\n## ", start + len(SECTION))
            text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + section
        RESULTS_MD.write_text(text)


if __name__ == "__main__":
    main()
