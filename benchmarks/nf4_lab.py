"""Where our NF4 kernel's time goes (issue 18): structural variants timed side by side, one GPU call.

  python benchmarks/nf4_lab.py --json-out $OUT/lab.json

Each variant is the same swap-AB split-K skeleton (programs over out-feature tiles x fixed K chunks,
float32 partials) with one stage added at a time, so the differences place the time:
  copy   load the packed bytes only (summed, so the loads stay): the skeleton's memory ceiling
  nodeq  packed bytes cast to bf16 straight into the MMA: loads + MMA, no unpacking
  shift  nibbles unpacked and cast (no table), two MMAs (even k, odd k), absmax after the MMA
  lut    as shift, values from the 16-entry NF4 table (float32 load, cast): the full algorithm
  lut16  as lut with a bf16 table (16-bit loads)
  prmt   as lut with the table in registers (nf4.decode_asm, the shipped kernel's lookup)
  prmt1  as prmt, one K=64 product over the interleaved tile
  prmtx  as prmt, the activations permuted first (each block's even k, then its odd k) so their loads are
         contiguous and pipelined; the permutation is timed too
The full algorithm scales by absmax after the MMA (per 64-element block, per out feature): the
table's values are rounded to bf16 instead of code * absmax, so it is not bitwise bitsandbytes'
dequantization, only within its rounding (checked below against the float32 reference).
Also timed: bitsandbytes, bf16 F.linear, the shipped nf4.matmul, and invariant.matmul's tile
choices (issue 22) against F.linear, with a bitwise check that the row-tile height does not change
a row's bits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from benchmarks.nf4 import bench, quantized  # noqa: E402  (do_bench median with L2 flush; seeded NF4 weights)
from llmbatch.worker.engine import invariant, nf4  # noqa: E402

MODES = {"copy": 0, "nodeq": 1, "shift": 2, "lut": 3, "lut16": 4, "prmt": 5, "prmt1": 6, "prmtx": 7}

# The register table lookup is the shipped one (nf4.decode_asm); the lab's kernels are bf16 only.
PRMT = nf4.decode_asm(torch.bfloat16)


@triton.jit(do_not_specialize=["M"])
def _lab(X, W, ABS, LUT, LUT16, P, M, N, KH, s_xm, CHUNK,
         MODE: tl.constexpr, BN: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr,
         PRMT_ASM: tl.constexpr = PRMT):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_c = tl.program_id(2)
    n = pid_n * BN + tl.arange(0, BN)
    rows = pid_b * BB + tl.arange(0, BB)
    row_ok = rows < M
    kb = tl.arange(0, 32)  # bytes of one 64-element absmax block
    w_row = W + n.to(tl.int64)[:, None] * KH
    x_row = X + rows.to(tl.int64)[None, :] * s_xm
    acc = tl.zeros([BN, BB], dtype=tl.float32)
    k0 = pid_c * CHUNK
    for k in range(k0, k0 + CHUNK, BK):
        for j in tl.static_range(BK // 64):
            kj = k + 64 * j
            packed = tl.load(w_row + (kj // 2 + kb)[None, :])  # [BN, 32] uint8
            if MODE == 7:  # x pre-permuted: each 64-block holds its 32 even k, then its 32 odd k
                xe = tl.load(x_row + (kj + kb)[:, None], mask=row_ok[None, :], other=0.0)
                xo = tl.load(x_row + (kj + 32 + kb)[:, None], mask=row_ok[None, :], other=0.0)
            else:
                xe = tl.load(x_row + (kj + 2 * kb)[:, None], mask=row_ok[None, :], other=0.0)  # [32, BB] even k
                xo = tl.load(x_row + (kj + 2 * kb + 1)[:, None], mask=row_ok[None, :], other=0.0)  # odd k
            if MODE == 0:
                acc += tl.sum(packed.to(tl.float32), axis=1)[:, None] + tl.sum(xe.to(tl.float32) + xo.to(tl.float32), axis=0)[None, :]
            elif MODE == 1:
                part = tl.dot(packed.to(X.dtype.element_ty), xe)
                acc += part
            else:
                q = packed.to(tl.int32)
                if MODE == 2:
                    hi = (q >> 4).to(X.dtype.element_ty)
                    lo = (q & 15).to(X.dtype.element_ty)
                elif MODE == 3:
                    hi = tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [LUT + (q >> 4)],
                                                   dtype=tl.float32, is_pure=True, pack=1).to(X.dtype.element_ty)
                    lo = tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [LUT + (q & 15)],
                                                   dtype=tl.float32, is_pure=True, pack=1).to(X.dtype.element_ty)
                elif MODE == 4:
                    hi = tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [LUT16 + (q >> 4)],
                                                   dtype=tl.bfloat16, is_pure=True, pack=1)
                    lo = tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [LUT16 + (q & 15)],
                                                   dtype=tl.bfloat16, is_pure=True, pack=1)
                else:
                    hi, lo = tl.inline_asm_elementwise(PRMT_ASM, "=r,=r,=r,=r,r", [packed],
                                                       dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
                if MODE == 6:  # one K=64 product over the interleaved tile
                    xs = tl.load(x_row + (kj + tl.arange(0, 64))[:, None], mask=row_ok[None, :], other=0.0)
                    part = tl.dot(tl.reshape(tl.join(hi, lo), [BN, 64]), xs)
                else:
                    part = tl.dot(hi, xe)
                    part = tl.dot(lo, xo, part)
                amax = tl.load(ABS + n.to(tl.int64) * (KH // 32) + kj // 64)  # [BN] float32
                acc += part * amax[:, None]
    tl.store(P + (pid_c * M + rows[None, :]).to(tl.int64) * N + n[:, None], acc, mask=row_ok[None, :])


def lab_matmul(x, packed, qs, mode, bn, bk, chunks, warps, stages, bb=None):
    N, K = qs.shape
    M = x.shape[0]
    bb = bb or (16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128)
    part = torch.empty(chunks, M, N, dtype=torch.float32, device=x.device)
    if mode == "prmtx":
        x = x.view(M, K // 64, 32, 2).transpose(-1, -2).reshape(M, K)
    lut16 = qs.code.to(torch.bfloat16)
    _lab[(-(-M // bb), N // bn, chunks)](x, packed, qs.absmax, qs.code, lut16, part, M, N, K // 2, x.stride(0),
                                        K // chunks, MODE=MODES[mode], BN=bn, BB=bb, BK=bk,
                                        num_warps=warps, num_stages=stages)
    return part.sum(0) if chunks > 1 else part[0]


SHAPES = {"gate_up": (14336, 4096), "down": (4096, 14336), "qo": (4096, 4096)}


def kernel_lab(rows, configs, out):
    import bitsandbytes as bnb

    for name, (N, K) in SHAPES.items():
        packed, qs, wq = quantized(N, K, False, 0)
        wbytes = N * K / 2
        for M in rows:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ wq.float().t()
            row = {"shape": name, "M": M, "bnb": bench(lambda: bnb.matmul_4bit(x, packed, quant_state=qs)),
                   "bf16": bench(lambda: F.linear(x, wq)), "shipped": bench(lambda: nf4.matmul(x, packed, qs))}
            for cfg in configs:
                mode, bn, bk, chunks, warps, stages = cfg
                key = f"{mode}/bn{bn}/bk{bk}/c{chunks}/w{warps}/s{stages}"
                try:
                    y = lab_matmul(x, packed, qs, mode, bn, bk, chunks, warps, stages)
                    if mode not in ("copy", "nodeq", "shift"):
                        err = ((y - ref).norm() / ref.norm()).item()
                        row[key + ":relerr"] = round(err, 6)
                    row[key] = bench(lambda: lab_matmul(x, packed, qs, mode, bn, bk, chunks, warps, stages))
                except Exception as exc:  # a variant that does not compile is reported
                    row[key] = None
                    row[key + ":error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            bnb_err = ((bnb.matmul_4bit(x, packed, quant_state=qs).float() - ref).norm() / ref.norm()).item()
            row["bnb:relerr"] = round(bnb_err, 6)
            best = min((v, k) for k, v in row.items() if isinstance(v, float) and ":" not in k and "/" in k)
            row["best"] = best[1]
            row["best_tb_s"] = round(wbytes / best[0] / 1e9, 3)
            row["bnb_tb_s"] = round(wbytes / row["bnb"] / 1e9, 3)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            out.append(row)


TILES = [(64, 128, 64, 4, 4), (128, 128, 64, 8, 4), (64, 64, 64, 4, 4), (128, 64, 64, 4, 4), (128, 256, 64, 8, 3)]


def gbench(fn) -> float:
    """Median ms of fn replayed in a CUDA graph (as the engine runs it): without the Python launch cost,
    which do_bench's events count wherever it exceeds the L2 flush before (the split's two launches did)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def invariant_lab(rows, out):
    """invariant.matmul at each tile shape, its K chunks as programs of their own (split) or summed by one
    program: timed in CUDA graphs against F.linear, and every contender's bits compared (none may change them)."""
    for name, (N, K) in {**SHAPES, "kv": (1024, 4096), "lm_head": (128256, 4096)}.items():
        torch.manual_seed(1)
        w = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
        for M in rows:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            row = {"shape": name, "M": M, "chunks": invariant.splits_for(N, K, 64),
                   "shipped": invariant.tiles_for(x.dtype, M),
                   "F.linear": gbench(lambda: F.linear(x, w)), "shipped_ms": gbench(lambda: invariant.matmul(x, w))}
            outs = {"shipped": invariant.matmul(x, w)}
            for tile in TILES:
                for split in (False, True):
                    key = "{}x{}x{}/w{}/s{}".format(*tile) + ("/split" if split else "")
                    try:
                        row[key] = gbench(lambda: invariant.matmul(x, w, split=split, tiles=tile))
                        outs[key] = invariant.matmul(x, w, split=split, tiles=tile)
                    except Exception as exc:
                        row[key] = None
                        row[key + ":error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            first = outs["shipped"]
            row["bitwise_all"] = all(torch.equal(first, v) for v in outs.values())
            if not row["bitwise_all"]:
                row["bitwise"] = {k: torch.equal(first, v) for k, v in outs.items()}
            timed_keys = [k for k, v in row.items() if isinstance(v, float) and k not in ("F.linear",)]
            row["best"] = min(timed_keys, key=lambda k: row[k])
            row["best_vs_F.linear"] = round(row[row["best"]] / row["F.linear"], 3)
            row["shipped_vs_F.linear"] = round(row["shipped_ms"] / row["F.linear"], 3)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            out.append(row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,16,64,512")
    ap.add_argument("--inv-rows", default="1,32,128,300,512,4096")
    ap.add_argument("--json-out")
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--skip-invariant", action="store_true")
    ap.add_argument("--ncu-one", help="mode,bn,bk,chunks,warps,stages,M,shape: one warm launch for ncu")
    args = ap.parse_args()
    if args.ncu_one:
        mode, bn, bk, chunks, warps, stages, M, shape = args.ncu_one.split(",")
        N, K = SHAPES[shape]
        packed, qs, _ = quantized(N, K, False, 0)
        x = torch.randn(int(M), K, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            lab_matmul(x, packed, qs, mode, int(bn), int(bk), int(chunks), int(warps), int(stages))
        torch.cuda.synchronize()
        return
    rows = [int(r) for r in args.rows.split(",")]
    configs = []
    for mode in ("copy", "nodeq", "shift", "lut", "lut16", "prmt", "prmt1", "prmtx"):
        configs.append((mode, 64, 128, 4, 4, 4))
    for bn, bk, chunks, warps, stages in [(64, 64, 4, 4, 6), (128, 128, 2, 4, 4), (128, 128, 4, 8, 4),
                                          (64, 256, 4, 4, 3), (64, 128, 8, 4, 4), (64, 128, 2, 4, 4)]:
        for mode in ("prmt", "prmtx"):
            configs.append((mode, bn, bk, chunks, warps, stages))
    res = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}}
    print(res["env"], flush=True)
    res["kernel"], res["invariant"] = [], []
    try:
        if not args.skip_kernel:
            kernel_lab(rows, configs, res["kernel"])
        if not args.skip_invariant:
            invariant_lab([int(r) for r in args.inv_rows.split(",")], res["invariant"])
    finally:
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
