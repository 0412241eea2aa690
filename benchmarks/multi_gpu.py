"""One job over K GPUs of a host (`llmbatch worker --gpus 0,1`) against the same job on one GPU.

Real `llmbatch worker` processes over a local Redis and SQLite, the random Llama-3.1-8B of
benchmarks/throughput.py in NF4. For each device set (one GPU, then all of --gpus): start the
worker, wait until every pinned process has loaded the model, run a warm-up job, then time one
job of --prompts prompts (16-512 tokens, --new-tokens new, greedy) from its first item started
to its last item finished (from the database). Reports output tokens/s and the speed-up
(target: >= 1.85x on two H100s).

    python benchmarks/multi_gpu.py --gpus 0,1 --json-out multi_gpu.json
    python benchmarks/multi_gpu.py --smoke             # CPU: echo engine, two "GPUs", a few prompts
    python benchmarks/multi_gpu.py --smoke --engine model   # CPU: the bundled model in two processes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def texts_for(args) -> list[str]:
    if args.engine == "echo":
        return [" ".join(f"w{i}-{j}" for j in range(16 + i % 64)) for i in range(args.prompts)]
    from transformers import AutoTokenizer

    from benchmarks.e2e_worker import workload
    from llmbatch.worker.engine import EngineConfig
    from llmbatch.worker.engine.loading import resolve_checkpoint

    tok = AutoTokenizer.from_pretrained(resolve_checkpoint(EngineConfig(model=args.model, cache_dir=args.cache_dir)))
    return [item.text for item in workload(args, tok)]


def run_on(devices: list[str], args, texts: list[str], broker: str, workdir: Path) -> dict:
    """Start `llmbatch worker --gpus DEVICES`, warm it up, time one job; returns the figures."""
    from sqlalchemy import func, select

    from llmbatch.jobs.db import Database
    from llmbatch.jobs.models import Item

    tag = "gpus-" + "-".join(devices)
    db_url = f"sqlite:///{workdir / (tag + '.db')}"
    env = {**os.environ, "LLMBATCH_DATABASE_URL": db_url, "LLMBATCH_BROKER_URL": broker, "LLMBATCH_MODEL": args.model,
           "LLMBATCH_ENGINE": args.engine,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("CUDA_VISIBLE_DEVICES", None)  # --gpus names physical devices here
    if args.cache_dir:
        env["LLMBATCH_MODEL_CACHE"] = args.cache_dir

    def cli(*a, chunk_size):
        return subprocess.run([sys.executable, "-m", "llmbatch.jobs.cli", *a], env={**env,
                              "LLMBATCH_CHUNK_SIZE": str(chunk_size)}, capture_output=True, text=True,
                              check=True).stdout.strip()

    def job_file(name, lines):
        path = workdir / f"{tag}-{name}"
        path.write_text("".join(json.dumps({"prompt": t, "max_tokens": args.new_tokens, "temperature": 0}) + "\n"
                                for t in lines))
        return path

    log_path = workdir / f"{tag}.log"
    log = open(log_path, "wb")
    worker = subprocess.Popen([sys.executable, "-m", "llmbatch.jobs.cli", "worker", "--gpus", ",".join(devices) + ",",
                               "--loglevel", "INFO"], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)

    def wait(job_id, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = json.loads(cli("status", job_id, "--json", chunk_size=1))
            if s["status"] == "completed":
                return s
            if worker.poll() is not None:
                raise RuntimeError(log_path.read_text()[-3000:])
            time.sleep(0.5)
        raise RuntimeError(f"job {job_id} unfinished after {timeout}s: {s}\n{log_path.read_text()[-3000:]}")

    try:
        t0 = time.monotonic()
        while log_path.read_text(errors="replace").count(" ready.") < len(devices):  # every process has its model
            if worker.poll() is not None or time.monotonic() - t0 > args.timeout:
                raise RuntimeError(f"workers did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        loaded_s = time.monotonic() - t0
        # Warm-up: small chunks, so every process runs some (CUDA graphs, allocator) before the timing.
        warm = texts[: max(8, 16 * len(devices))]
        wait(cli("submit", str(job_file("warmup.jsonl", warm)), chunk_size=max(1, len(warm) // (4 * len(devices)))),
             args.timeout)
        job_id = cli("submit", str(job_file("job.jsonl", texts)), chunk_size=args.chunk_size)
        status = wait(job_id, args.timeout)
    finally:
        worker.terminate()  # the --gpus parent forwards it to every pinned process
        try:
            worker.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, 9)
    db = Database(db_url)
    with db.read() as s:
        first, last, tokens = s.execute(select(func.min(Item.started_at), func.max(Item.finished_at),
                                               func.sum(Item.completion_tokens)).where(Item.job_id == job_id)).one()
        per_worker = dict(s.execute(select(Item.worker, func.count()).where(Item.job_id == job_id)
                                    .group_by(Item.worker)).all())
    db.dispose()
    wall = max((last - first).total_seconds(), 1e-6)
    return {"devices": devices, "items": status["succeeded"], "failed": status["failed"], "output_tokens": tokens,
            "wall_s": round(wall, 2), "output_tok_s": round(tokens / wall, 1), "load_s": round(loaded_s, 1),
            "items_per_process": sorted(per_worker.values(), reverse=True)}


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.throughput import WORKLOADS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="0,1", help="the devices of the multi-GPU run (the baseline uses the first)")
    ap.add_argument("--model", help="checkpoint (default: the random Llama-3.1-8B, built if missing)")
    ap.add_argument("--model-dir", default="/tmp/llmbatch-random-llama31-8b")
    ap.add_argument("--layer-std", type=float, default=0.002)
    ap.add_argument("--cache-dir")
    ap.add_argument("--engine", choices=["model", "echo"], default="model")
    ap.add_argument("--workload", default="varied", choices=WORKLOADS, help="a benchmarks/throughput.py workload")
    ap.add_argument("--prompts", type=int, default=4096)
    ap.add_argument("--chunk-size", type=int, default=512, help="items per chunk: enough chunks to share")
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=500)
    ap.add_argument("--smoke", action="store_true", help="CPU, a few prompts (echo engine unless --engine model)")
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    devices = [d.strip() for d in args.gpus.split(",") if d.strip()]
    if args.smoke:
        if "--engine" not in (argv or sys.argv[1:]):
            args.engine = "echo"
        args.prompts, args.chunk_size, args.new_tokens = min(args.prompts, 64), 8, min(args.new_tokens, 8)
        args.min_len, args.max_len = 8, 32
        args.model = args.model or "smollm2-135m-instruct"
    elif args.model is None:
        from benchmarks.throughput import build_random_model

        build_random_model(Path(args.model_dir), args.layer_std)
        args.model = args.model_dir
    texts = texts_for(args)
    from benchmarks.e2e_worker import start_redis

    with tempfile.TemporaryDirectory(prefix="llmbatch-multi-gpu-") as tmp:
        workdir = Path(tmp)
        broker, redis_proc = start_redis(workdir)
        try:
            one = run_on(devices[:1], args, texts, broker, workdir)
            print(f"1 GPU  ({devices[0]}): {one}", flush=True)
            many = run_on(devices, args, texts, broker, workdir)
            print(f"{len(devices)} GPUs ({','.join(devices)}): {many}", flush=True)
        finally:
            if redis_proc:
                redis_proc.terminate()
    gpu = "cpu"
    if not args.smoke:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    speedup = many["output_tok_s"] / one["output_tok_s"]
    result = {"gpu": gpu, "engine": args.engine, "model": args.model, "prompts": args.prompts,
              "chunk_size": args.chunk_size, "new_tokens": args.new_tokens, "one": one, "many": many,
              "speedup": round(speedup, 3), "target": 1.85 if not args.smoke else None}
    print(json.dumps(result, indent=2))
    if not args.smoke:
        print(f"speed-up {speedup:.2f}x over one GPU with {len(devices)} GPUs (target >= 1.85x): "
              + ("MET" if speedup >= 1.85 else "NOT MET"))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
