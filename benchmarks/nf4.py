"""Our NF4 kernel (worker/engine/nf4.py) against bitsandbytes and bf16 `F.linear`, on one GPU, in one run.

  python benchmarks/nf4.py --json-out nf4.json                  # kernels: ceilings, shapes x rows, invariance
  python benchmarks/nf4.py --engine --json-out nf4_engine.json  # also the engine A/B (bnb, then triton)

Kernel part. The ceilings first (a device-to-device copy, an 8192^3 bf16 product). Then each
Llama-3.1-8B projection shape (N, K) at 1..512 rows: bitsandbytes' `matmul_4bit` (what Linear4bit
runs), ours, and bf16 `F.linear` over the dequantized weight; times are medians of
`triton.testing.do_bench`, which clears the L2 before every call (a decode step never finds its
weights there: the model is 3.5 GB). Effective bandwidth counts the packed weight bytes (N*K/2;
the absmax adds 1/8). Correctness: max abs error against the float32 product of the very bf16
weights bitsandbytes dequantizes, in units of the bf16 rounding of the reference. Batch invariance:
a row's output bitwise equal at M = 1, 20, 37, 128 and 512, with the physical split forced both
ways, and in a shuffled batch. --variants times other plans (block sizes, warps, stages, chunks,
the select-tree table) for tuning.

Engine part (--engine): the random Llama-3.1-8B of benchmarks/throughput.py, loaded once in NF4; for
each kernel (`nf4.use(model, kind)`, then a fresh Engine, so CUDA graphs are captured with it):
warm-up, the `fixed` and `mixed` workloads, then throughput.micro's decode step and prefill.
match@32 between the two kernels' greedy tokens over the first 64 `fixed` prompts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--smoke" in sys.argv:  # before Triton is imported: its interpreter is chosen when kernels are defined
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llmbatch.worker.engine import nf4  # noqa: E402

SHAPES = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096), "gate_proj/up_proj": (14336, 4096),
          "down_proj": (4096, 14336)}
ROWS = (1, 8, 16, 32, 64, 128, 256, 512)
MMA, MMA_VARIANTS, MMA_CHECKED = False, [], []  # --mma: the CUDA kernel too (nf4_mma.py), variants, checked ones
DEV = "cuda"  # --smoke: "cpu", under Triton's interpreter, tiny shapes (a dry run of this script)


def bench(fn, reps: int = 50) -> float:
    """Median ms of fn, L2 cleared before each call (do_bench's own flush)."""
    if DEV == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1000
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median")


def ceilings() -> dict:
    n = 1 << 30  # 2 GiB of bf16 each way
    a = torch.empty(n, dtype=torch.bfloat16, device=DEV).normal_()
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), 100)
    copy = 2 * a.numel() * 2 / ms / 1e9
    del a, b
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEV)
    y = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEV)
    ms_mm = bench(lambda: x @ y, 200)
    out = {"copy_tb_s": round(copy, 3), "bf16_mm_tflops": round(2 * 8192 ** 3 / ms_mm / 1e9, 1)}
    print("ceilings", out, flush=True)
    return out


def quantized(N: int, K: int, nested: bool, seed: int):
    import bitsandbytes.functional as bf

    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(N, K, device=DEV, generator=g).to(torch.bfloat16) * 0.02
    packed, qs = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    return packed, qs, bf.dequantize_4bit(packed, qs).to(torch.bfloat16)


def ulps(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| in units of half a bf16 ulp of |ref| (<= 1: within the rounding of the reference)."""
    half = ref.abs().clamp_min(2 ** -60) * 2 ** -8
    return round(((y.float() - ref).abs() / half).max().item(), 3)


def correctness(name: str, N: int, K: int) -> dict:
    """Half-ulps against the product of bitsandbytes' bf16 weights (the exact plan's promise), and the
    relative error against the unrounded float32 weights (code * absmax), ours and bitsandbytes'."""
    out = {}
    for nested in (False, True):
        packed, qs, wq = quantized(N, K, nested, 1)
        exact = nf4.float32_weights(packed, qs)
        for M in (1, 7, 37, 512 if DEV == "cuda" else 64):
            x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
            y = nf4.matmul(x, packed, qs)
            ref = x.float() @ wq.float().t()
            ref32 = x.double() @ exact.double().t()
            bnb_y = nf4.reference(x, packed, qs)
            rel = lambda v: round(((v.double() - ref32).norm() / ref32.norm()).item(), 6)  # noqa: E731
            out[f"nested={nested} M={M}"] = {"ours_half_ulps": ulps(y, ref), "bnb_half_ulps": ulps(bnb_y, ref),
                                             "ours_rel_err": rel(y), "bnb_rel_err": rel(bnb_y),
                                             "max_abs_err": round((y.float() - ref).abs().max().item(), 6),
                                             "nan": bool(y.isnan().any())}
    print("correctness", name, out, flush=True)
    return out


def invariance(name: str, N: int, K: int, nested: bool = False) -> dict:
    """Row bits across batch sizes, physical split, and batch mates (a shuffled batch)."""
    packed, qs, _ = quantized(N, K, nested, 2)
    top = 512 if DEV == "cuda" else 160
    x = torch.randn(top, K, device=DEV, dtype=torch.bfloat16)
    full = nf4.matmul(x, packed, qs)
    res = {}
    for M in (1, 20, 37, 128):
        for split in (None, True, False):
            y = nf4.matmul(x[:M], packed, qs, split=split)
            res[f"M={M} split={split}"] = bool(torch.equal(y, full[:M]))
    res[f"M={top} split=True"] = bool(torch.equal(nf4.matmul(x, packed, qs, split=True), full))
    perm = torch.randperm(top, device=DEV)
    res[f"M={top} shuffled"] = bool(torch.equal(nf4.matmul(x[perm], packed, qs), full[perm]))
    other = torch.randn(36, K, device=DEV, dtype=torch.bfloat16)  # row 0 among other mates
    res["M=37 other mates"] = bool(torch.equal(nf4.matmul(torch.cat([x[:1], other]), packed, qs)[:1], full[:1]))
    res["all"] = all(res.values())
    print("invariance", name, f"nested={nested}", res, flush=True)
    return res


def mma_checks(name: str, N: int, K: int, **opts) -> dict:
    """The CUDA kernel (nf4_mma.py; opts: build and launch options): error against the float32 weights (and
    bitsandbytes' own), and row bits across batch sizes, forced tiles (nt, mt), batch mates, bias and fp16."""
    from llmbatch.worker.engine import nf4_mma

    mm = lambda *a, **k: nf4_mma.matmul(*a, **k, **opts)  # noqa: E731
    out = {}
    for nested in (False, True):
        packed, qs, wq = quantized(N, K, nested, 5)
        exact = nf4.float32_weights(packed, qs)
        x = torch.randn(200, K, device=DEV, dtype=torch.bfloat16)
        full = mm(x, packed, qs)
        ref32 = x.double() @ exact.double().t()
        bnb_y = nf4.reference(x, packed, qs)
        rel = lambda v, r=ref32: round(((v.double() - r).norm() / r.norm()).item(), 6)  # noqa: E731
        res = {"ours_rel_err": rel(full), "bnb_rel_err": rel(bnb_y),
               "max_abs_vs_bnb": round((full.float() - bnb_y.float()).abs().max().item(), 5),
               "nan": bool(full.isnan().any())}
        bits = {}
        for M in (1, 5, 8, 9, 16, 17, 33, 64, 65, 130):
            bits[f"M={M}"] = torch.equal(mm(x[:M], packed, qs), full[:M])
        for nt in (1, 2):
            for mt in (1, 2, 4, 8):
                bits[f"M=37 nt={nt} mt={mt}"] = torch.equal(mm(x[:37], packed, qs, nt=nt, mt=mt), full[:37])
        perm = torch.randperm(200, device=DEV)
        bits["shuffled"] = torch.equal(mm(x[perm], packed, qs), full[perm])
        other = torch.randn(20, K, device=DEV, dtype=torch.bfloat16)
        bits["other mates"] = torch.equal(mm(torch.cat([x[:1], other]), packed, qs)[:1], full[:1])
        res["bits_all"] = all(bits.values())
        res["bits_failed"] = [k for k, v in bits.items() if not v]
        bias = torch.randn(N, device=DEV, dtype=torch.bfloat16)
        yb = mm(x[:9], packed, qs, bias)
        res["bias_max_abs"] = round((yb.float() - (full[:9].float() + bias.float())).abs().max().item(), 5)
        xh = x[:9].half()
        res["fp16_rel_err"] = rel(mm(xh, packed, qs), ref32[:9])
        out[f"nested={nested}"] = res
    print("mma", name, opts, out, flush=True)
    return out


MMA_OPTIONS = {"nt": (1, 2), "mt": (1, 2, 4, 8), "warps": (1, 2, 4, 8), "depth": (1, 2, 3), "lut": (0, 1),
               "persist": (0, 1)}


def _opts(variant: str) -> dict:
    """'lut=1,persist=1' -> {'lut': 1, 'persist': 1}: nf4_mma.matmul's build and launch options (ValueError
    naming the part that is not one)."""
    out = {}
    for part in variant.split(","):
        key, _, value = part.partition("=")
        if key not in MMA_OPTIONS or not value.isdigit() or int(value) not in MMA_OPTIONS[key]:
            raise ValueError(f"{part!r} is not an option: choose from "
                             + ", ".join(f"{k}={'|'.join(map(str, v))}" for k, v in MMA_OPTIONS.items()))
        out[key] = int(value)
    return out


def timing(name: str, N: int, K: int, rows, variants: dict, variant_rows=(), deadline: float = 1e18) -> list[dict]:
    import bitsandbytes as bnb

    packed, qs, wq = quantized(N, K, False, 3)
    wbytes = N * K / 2
    out = []
    for M in rows:
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        row = {"shape": name, "N": N, "K": K, "M": M}
        row["bnb_ms"] = bench(lambda: bnb.matmul_4bit(x, packed, quant_state=qs))
        row["bf16_ms"] = bench(lambda: F.linear(x, wq))
        if MMA:
            from llmbatch.worker.engine import nf4_mma

            row["mma_ms"] = bench(lambda: nf4_mma.matmul(x, packed, qs))
            row["mma_tb_s"] = round(wbytes / row["mma_ms"] / 1e9, 3)
            row["bnb_vs_mma"] = round(row["bnb_ms"] / row["mma_ms"], 2)
            row["mma_vs_bf16"] = round(row["mma_ms"] / row["bf16_ms"], 3)
            for v in MMA_VARIANTS:
                if M in variant_rows and time.time() < deadline:
                    row[f"mma[{v}]_ms"] = bench(lambda: nf4_mma.matmul(x, packed, qs, **_opts(v)))
        for vname, (plan, split) in variants.items():
            if vname != "triton" and (M not in variant_rows or time.time() > deadline):
                continue
            try:
                row[f"{vname}_ms"] = bench(lambda: nf4.matmul(x, packed, qs, plan=plan, split=split))
            except Exception as exc:  # a variant that does not compile is reported, not fatal
                row[f"{vname}_ms"] = None
                row[f"{vname}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        t = row["triton_ms"]
        row["triton_tb_s"] = round(wbytes / t / 1e9, 3)
        row["bnb_tb_s"] = round(wbytes / row["bnb_ms"] / 1e9, 3)
        row["triton_vs_bf16"] = round(t / row["bf16_ms"], 3)
        row["bnb_vs_triton"] = round(row["bnb_ms"] / t, 2)
        for k, v in list(row.items()):
            if k.endswith("_ms") and v is not None:
                row[k] = round(v, 4)
        print("time", row, flush=True)
        out.append(row)
    return out


def sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 132


def variant_plans(N: int, K: int, wanted: list[str]) -> dict:
    """name -> (plan, split): 'triton' is the shipped plan with its automatic split."""
    base = nf4.plan_for(N, K, sms())
    out = {"triton": (base, None)}
    for w in wanted:
        kv = dict(p.split("=") for p in w.split(","))
        fields = {k: (v == "1") if k == "tree" else int(v) for k, v in kv.items() if k != "split"}
        if "chunks" in fields:
            fields["chunk"] = K // fields["chunks"]
        plan = nf4.Plan(**{**base.__dict__, **fields})
        split = None if "split" not in kv else kv["split"] == "1"
        out[w] = (plan, split)
    return out


# -- engine A/B -----------------------------------------------------------------


def engine_ab(args) -> dict:
    from benchmarks import throughput as tp
    from llmbatch.worker.engine import EngineConfig, load_engine
    from llmbatch.worker.engine.engine import Engine

    if args.model is None:
        tp.build_random_model(Path(args.model_dir), 0.002)
    config = EngineConfig(model=args.model or args.model_dir, nf4_kernel="bnb", device=DEV)
    t = time.perf_counter()
    engine = load_engine(config)
    print(f"loaded in {time.perf_counter() - t:.1f}s", flush=True)
    loaded = (engine.model, engine.tokenizer, engine.device, engine.dtype)
    tok = engine.tokenizer
    words, lo, hi, new = args.model is None, args.min_len, args.max_len, args.new_tokens
    warm = tp.make_workload("fixed", min(64, args.prompts), lo, hi, 4, tok, 99, words)
    fixed = tp.make_workload("fixed", args.prompts, lo, hi, new, tok, 0, words)
    mixed = tp.make_workload("mixed", args.prompts, lo, hi, new, tok, 0, words)
    res, rows = {}, {}
    engine.runner.release()
    kinds = args.kernels.split(",")
    for kind in kinds:
        n = nf4.use(engine.model, kind)
        e = Engine(config, loaded=loaded)
        tp.run_engine(e, warm)
        r = {"modules_on_ours": n}
        r["fixed"], rows[kind] = tp.run_engine(e, fixed)
        print(kind, "fixed", r["fixed"], flush=True)
        r["mixed"], _ = tp.run_engine(e, mixed)
        print(kind, "mixed", r["mixed"], flush=True)
        r["mixed_vs_fixed"] = round(r["mixed"]["output_tok_s"] / r["fixed"]["output_tok_s"], 3)
        e.runner.release()
        if DEV == "cuda":
            r["micro"] = tp.micro(e, [32, 512], 640)  # decode step ms (CUDA graphs), prefill tok/s
            e.runner.release()
        else:
            r["micro"] = []
        res[kind] = r
        del e
        torch.cuda.empty_cache()
    nf4.use(engine.model, "bnb")
    for kind in kinds[1:]:
        res[f"fixed_{kind}_vs_{kinds[0]}"] = round(res[kind]["fixed"]["output_tok_s"]
                                                   / res[kinds[0]]["fixed"]["output_tok_s"], 3)
        res[f"mixed_{kind}_vs_{kinds[0]}"] = round(res[kind]["mixed"]["output_tok_s"]
                                                   / res[kinds[0]]["mixed"]["output_tok_s"], 3)
        res[f"match32_{kind}_vs_{kinds[0]}_64"] = tp.match_rate(rows[kind][:64], rows[kinds[0]][:64])
        res[f"match32_{kind}_vs_{kinds[0]}_all"] = tp.match_rate(rows[kind], rows[kinds[0]])
    print("engine", {k: v for k, v in res.items() if k not in kinds}, flush=True)
    return res


def summary(res: dict) -> None:
    print("\n== summary", res["env"])
    if "ceilings" in res:
        print("ceilings", res["ceilings"])
    for r in res.get("timing", []):
        print(f"{r['shape']:18} M={r['M']:4} bnb {r['bnb_ms']:.4f} ms ({r['bnb_tb_s']} TB/s)  triton "
              f"{r['triton_ms']:.4f} ms ({r['triton_tb_s']} TB/s)  bf16 {r['bf16_ms']:.4f}  triton/bf16 "
              f"{r['triton_vs_bf16']}  bnb/triton {r['bnb_vs_triton']}  "
              + (f"mma {r['mma_tb_s']} TB/s bnb/mma {r['bnb_vs_mma']} mma/bf16 {r['mma_vs_bf16']}  " if "mma_ms" in r
                 else "")
              + " ".join(f"{k[:-3]}={v}" for k, v in r.items() if k.endswith("_ms") and k[:-3] not in
                         ("bnb", "bf16", "triton")))
    for name, v in res.get("invariance", {}).items():
        print("invariance", name, v["all"], {k: b for k, b in v.items() if not b})
    for name, v in res.get("correctness", {}).items():
        print("correctness", name, "relative error vs float32 weights, ours",
              max(c["ours_rel_err"] for c in v.values()), "bnb", max(c["bnb_rel_err"] for c in v.values()),
              "| half-ulps vs bnb's bf16 weights", max(c["ours_half_ulps"] for c in v.values()))
    e = res.get("engine")
    if e:
        for kind in nf4.KERNELS:
            if kind not in e:
                continue
            k = e[kind]
            mic = {m.get("batch"): m.get("graph_ms") for m in k["micro"] if "batch" in m}
            pre = [m["prefill_tok_s"] for m in k["micro"] if "prefill_tok_s" in m]
            print(f"engine {kind}: fixed {k['fixed']['output_tok_s']} tok/s, mixed {k['mixed']['output_tok_s']} "
                  f"({k['mixed_vs_fixed']}x fixed), decode step ms {mic}, prefill tok/s {pre}")
        print({k: v for k, v in e.items() if k not in nf4.KERNELS})


def main(argv=None) -> dict:
    global DEV, SHAPES, MMA, MMA_VARIANTS, MMA_CHECKED
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="which of " + ", ".join(SHAPES))
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--variants", nargs="*", default=[],
                    help="extra plans to time, e.g. bk=256 warps=8 stages=4 bn=64 chunks=4 tree=1 split=0")
    ap.add_argument("--variant-shapes", default=None, help="shapes the variants run on (default all)")
    ap.add_argument("--variant-rows", default="1,16,64,512", help="rows the variants run at")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds after which variants are skipped")
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernel part")
    ap.add_argument("--no-triton-checks", action="store_true", help="time the Triton kernel, skip its checks")
    ap.add_argument("--engine", action="store_true", help="the engine A/B too")
    ap.add_argument("--kernels", default="bnb,triton", help="engine A/B: kernels in order, the first the baseline")
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--model", help="a checkpoint instead of the random Llama-3.1-8B")
    ap.add_argument("--model-dir", default="/tmp/llmbatch-random-llama31-8b")
    ap.add_argument("--smoke", action="store_true", help="a CPU dry run of this script: Triton's interpreter, a "
                                                           "tiny shape, the bundled model with a few prompts")
    ap.add_argument("--mma", action="store_true", help="the CUDA kernel (nf4_mma.py) too: checks and timings")
    ap.add_argument("--mma-variants", nargs="*", default=[],
                    help="timed variants: forced tiles and options, e.g. nt=1 nt=2,mt=8 warps=4 lut=1,persist=1")
    ap.add_argument("--mma-check", nargs="*", default=[], help="variants that also get the correctness checks")
    ap.add_argument("--mma-use", default="", help="options the engine part runs the CUDA kernel with, e.g. lut=1")
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    for kind in args.kernels.split(","):
        if kind not in nf4.KERNELS:
            ap.error(f"--kernels: unknown NF4 kernel {kind!r}: choose from {', '.join(nf4.KERNELS)}")
    for flag, values in (("--mma-variants", args.mma_variants), ("--mma-check", args.mma_check),
                         ("--mma-use", [args.mma_use] if args.mma_use else [])):
        for v in values:
            try:
                _opts(v)
            except ValueError as exc:
                ap.error(f"{flag}: {exc}")
    if args.mma_use and not set(_opts(args.mma_use)) <= {"depth", "lut", "persist"}:
        ap.error("--mma-use: only depth, lut and persist are the CUDA kernel's defaults (tiles follow the rows)")
    if (args.mma_variants or args.mma_check) and not args.mma:
        ap.error("--mma-variants and --mma-check time and check the CUDA kernel: add --mma")
    if (args.mma or args.mma_use) and args.smoke:
        ap.error("--mma and --mma-use need a CUDA GPU (the CUDA kernel has no CPU path); --smoke runs on the CPU")
    if args.smoke:
        DEV, SHAPES = "cpu", {"tiny": (128, 256)}
        args.shapes, args.rows, args.variant_rows = "tiny", "1,37", "1"
        args.model, args.prompts, args.min_len, args.max_len, args.new_tokens = \
            "smollm2-135m-instruct", 4, 8, 24, 6
    import bitsandbytes
    import triton

    given = argv if argv is not None else sys.argv[1:]
    res = {"date": datetime.date.today().isoformat(),
           "command": "python benchmarks/nf4.py " + " ".join(map(shlex.quote, given)),
           "env": {"gpu": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "torch": torch.__version__,
                   "triton": triton.__version__, "bitsandbytes": bitsandbytes.__version__}}
    torch.manual_seed(0)
    random.seed(0)
    t_start = time.time()

    def save():
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(res, indent=1))

    MMA, MMA_VARIANTS, MMA_CHECKED = args.mma, args.mma_variants, args.mma_check
    if MMA:
        from llmbatch.worker.engine import nf4_mma

        t = time.perf_counter()
        builds = {(o.get("depth", nf4_mma.DEPTH), bool(o.get("lut", nf4_mma.LUT)))
                  for o in map(_opts, MMA_VARIANTS + MMA_CHECKED + [args.mma_use] * bool(args.mma_use))}
        builds |= {(nf4_mma.DEPTH, nf4_mma.LUT)}
        nf4_mma.prebuild(sorted(builds))
        res["mma_build_s"] = round(time.perf_counter() - t, 1)
        print("mma build s", res["mma_build_s"], flush=True)
    if not args.no_kernels:
        if DEV == "cuda":
            res["ceilings"] = ceilings()
        rows = [int(r) for r in args.rows.split(",")]
        vshapes = set((args.variant_shapes or args.shapes).split(","))
        res["timing"], res["invariance"], res["correctness"], res["plans"] = [], {}, {}, {}
        for name in args.shapes.split(","):
            N, K = SHAPES[name]
            res["plans"][name] = nf4.plan_for(N, K, sms()).__dict__
            if MMA:
                res.setdefault("mma", {})[name] = mma_checks(name, N, K)
                for v in MMA_CHECKED:
                    res["mma"][f"{name} {v}"] = mma_checks(name, N, K, **_opts(v))
                save()
            if not args.no_triton_checks:
                res["invariance"][name] = invariance(name, N, K)
                res["invariance"][name + " nested"] = invariance(name, N, K, nested=True)
                res["correctness"][name] = correctness(name, N, K)
            save()
            variants = variant_plans(N, K, args.variants if name in vshapes else [])
            res["timing"] += timing(name, N, K, rows, variants, [int(r) for r in args.variant_rows.split(",")],
                                    t_start + args.budget)
            save()
    if args.engine:
        from llmbatch.worker.engine import nf4_mma

        for k, v in (_opts(args.mma_use) if args.mma_use else {}).items():
            setattr(nf4_mma, k.upper(), v)  # DEPTH, LUT, PERSIST: the defaults matmul and build() take
        res["mma_use"] = args.mma_use
        res["engine"] = engine_ab(args)
        save()
    summary(res)
    return res


if __name__ == "__main__":
    main()
