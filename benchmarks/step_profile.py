"""Where a decode step's and a prefill's GPU time goes (issues 18 and 22), by kernel, one GPU call.

  python benchmarks/step_profile.py --modes bnb,auto,invariant --rows 32,512 --json-out $OUT/profile.json

Random Llama-3.1-8B in NF4 (bf16). For each mode (an NF4 kernel of nf4.KERNELS, or `invariant`: the
batch-invariant mode, issue 22) and row count: the CUDA-graph step time (as throughput.micro), then one eager
step under torch.profiler, its kernels' device time summed by part of the model (`PARTS`, by kernel name),
and the same for one prefill of 16 x 512 tokens. Eager kernel times are the graph's kernels without the
launch gaps, so `graph_ms - kernels_ms` is roughly what the graph still leaves idle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import throughput as tp  # noqa: E402
from llmbatch.worker.engine import EngineConfig, invariant, load_engine, nf4  # noqa: E402
from llmbatch.worker.engine.engine import Engine  # noqa: E402

# First match wins; names as CUDA reports them (Triton kernels keep their Python names).
PARTS = [
    ("nf4 cuda", r"nf4_mma"),
    ("nf4 triton", r"_nf4_kernel"),
    ("nf4 dequant (bnb)", r"dequant|kDequant"),
    ("nf4 gemv (bnb)", r"gemv_4bit|kgemm_4bit|gemm_4bit"),
    ("invariant matmul", r"_matmul_kernel|_matmul_reduce"),
    ("invariant rms_norm", r"_rms_norm_kernel"),
    ("attention", r"attend|paged|flash|fmha|attention|sdpa|_attn|efficient"),
    ("cuBLAS gemm", r"gemm|nvjet|sm90_|cutlass|xmma|gemv|splitKreduce"),
    ("sampling, sort", r"sort|topk|cumsum|scan|multinomial|softmax|argmax"),
    ("copies", r"[Cc]opy|memcpy|memset|fill"),
    ("elementwise, reduce", r"elementwise|vectorized|reduce|Reduce|index|gather|scatter|cat|pow|mean|rsqrt|silu"),
]


def part_of(name: str) -> str:
    return next((p for p, rx in PARTS if re.search(rx, name)), "other")


def profile(fn, reps: int = 3) -> dict:
    """Kernel device time of fn, per call, by part; and the top kernels."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    parts, kernels, launches = {}, {}, 0
    for e in prof.events():
        us = getattr(e, "device_time", None)
        if us is None:
            us = e.cuda_time
        if e.device_type != torch.autograd.DeviceType.CUDA or not us:
            continue
        launches += 1
        p = part_of(e.name)
        parts[p] = parts.get(p, 0.0) + us / 1000 / reps
        kernels[e.name] = kernels.get(e.name, 0.0) + us / 1000 / reps
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {"kernels_ms": round(sum(parts.values()), 3), "launches": launches // reps,
            "parts_ms": {k: round(v, 3) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
            "top": [(n[:120], round(v, 3)) for n, v in top]}


def mode_engine(base: Engine, mode: str) -> Engine:
    on = mode == "invariant"
    invariant.use(base.model, False)
    nf4.use(base.model, "bnb" if on else mode)
    if on:
        invariant.use(base.model, True)
    config = dataclasses.replace(base.config, batch_invariant=on)
    return Engine(config, loaded=(base.model, base.tokenizer, base.device, base.dtype))


def run_mode(engine: Engine, rows: list[int], columns: int) -> dict:
    r, dev = engine.runner, engine.device
    out = {}
    r.allocate(max(rows), max(rows) * (-(-columns // 16)) + 64, columns)
    for slot in range(max(rows)):
        r.reserve(slot, columns)
    r.kv.normal_()
    for B in rows:
        r.tokens[:B] = torch.randint(0, tp.WORD_VOCAB, (B,), device=dev)
        r.pos[:B] = torch.randint(columns // 4, columns - 1, (B,), device=dev)
        r.decode(B, columns - 1)  # eager first sight, then capture on the next call
        graph = tp.timed(lambda: r.decode(B, columns - 1), 10)
        with torch.inference_mode():
            prof = profile(lambda: r._decode(B, columns))
        out[f"decode_{B}"] = {"graph_ms": round(graph, 3), **prof}
        print(B, json.dumps(out[f"decode_{B}"]), flush=True)
    r.release()
    k, T = 16, 512
    r.allocate(k, k * T // 16 + 64, T)
    for slot in range(k):
        r.reserve(slot, T)
    ids = torch.randint(0, tp.WORD_VOCAB, (k, T), device=dev)
    lens = torch.full((k,), T, device=dev)
    wall = tp.timed(lambda: r.prefill(0, ids, lens), 3)
    out["prefill_16x512"] = {"wall_ms": round(wall, 2), **profile(lambda: r.prefill(0, ids, lens), 2)}
    print("prefill", json.dumps(out["prefill_16x512"]), flush=True)
    r.release()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="bnb,auto,invariant", help=f"from {', '.join(nf4.KERNELS)}, invariant")
    ap.add_argument("--rows", default="32,512")
    ap.add_argument("--columns", type=int, default=640)
    ap.add_argument("--model-dir", default="/tmp/llmbatch-random-llama31-8b")
    ap.add_argument("--json-out", required=True)
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in (*nf4.KERNELS, "invariant")]
    if bad:
        ap.error(f"--modes: unknown {', '.join(bad)}")
    try:
        rows = [int(x) for x in args.rows.split(",")]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1:
        ap.error("--rows: positive integers, comma-separated")
    if args.columns < 2:
        ap.error("--columns: at least 2 (a row's depth in tokens)")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    tp.build_random_model(Path(args.model_dir), 0.002)
    t = time.perf_counter()
    base = load_engine(EngineConfig(model=args.model_dir, nf4_kernel="bnb"))
    print(f"loaded in {time.perf_counter() - t:.1f}s", flush=True)
    base.runner.release()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv)}
    for mode in modes:
        print("==", mode, flush=True)
        e = mode_engine(base, mode)
        res[mode] = run_mode(e, rows, args.columns)
        del e
        torch.cuda.empty_cache()
        Path(args.json_out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
