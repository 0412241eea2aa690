"""Whole-command wall time of `llmbatch status --json`, Python start included (issue 14, item 7).

    python benchmarks/cli_startup.py --runs 10 URL [URL ...] [--before DIR]

Each URL must hold at least one job. --before DIR is a directory holding an older checkout as
DIR/llmbatch/{jobs,worker,migrations} (e.g. `git archive REV jobs worker migrations | tar -x -C
DIR/llmbatch`): its runs alternate with this checkout's, so both see the same machine load.
Prints the median and minimum of each, and the load average, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def once(env: dict) -> float:
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "llmbatch.jobs.cli", "status", "--json"], env=env,
                         capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"status failed: {run.stderr.strip()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--before", help="directory of an older checkout to compare with (see above)")
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores")
    for url in args.urls:
        env = {**os.environ, "LLMBATCH_DATABASE_URL": url}
        after, before = [], []
        for _ in range(args.runs):
            if args.before:
                before.append(once({**env, "PYTHONPATH": args.before}))
            after.append(once(env))
        line = f"{url.split(':', 1)[0]:<20} this checkout: median {statistics.median(after):.3f} s, min {min(after):.3f} s"
        if before:
            line += f"; before: median {statistics.median(before):.3f} s, min {min(before):.3f} s"
        print(line + f"  (load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
