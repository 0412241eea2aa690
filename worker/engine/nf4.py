"""Our NF4 matmul: y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias), in Triton, batch-invariant.

It reads bitsandbytes' own storage as is (no repacking, no second copy): the packed weight is the
flat [N*K/2] uint8 of `Params4bit` (element e = n*K + k sits in byte e // 2, the high nibble for even
e), each run of 64 elements has one absmax, and a 4-bit code indexes `quant_state.code` (the 16 NF4
values). With double quantization (`quant_state.nested`) absmax is uint8, decoded as
state2.code[q] * state2.absmax[b // 256] + offset, all float32, exactly as dequantize_4bit does.
The absmax is decoded exactly as bitsandbytes does, on both plans below.

Design (one kernel for every M, tensor cores throughout):
- Dequantize in registers inside the K loop. The default plan (`Plan.post`) decodes 8 codes from one
  32-bit word with prmt/lop3 over byte tables held in the instructions (`decode_asm`: no table loads),
  multiplies each 64-element absmax block's table values by the activations (even k and odd k as two
  products, so no interleave), and scales the block's float32 sum by its absmax. Its weights are the
  table rounded to bf16, not bitsandbytes' code * absmax rounded to bf16: as close to the float32
  weights as bitsandbytes' (benchmarks/nf4.py, tests/test_nf4.py), not bitwise its products. The exact
  plan (post=False) multiplies code * absmax in float32 per weight, bitsandbytes' very values.
- Swap-AB: the dequantized weight tile is the MMA's left operand (its 64 rows are out features), the
  activations the right one, so a handful of rows costs one narrow MMA, not 64.
- Batch invariance by construction. The reduction over K is fixed by (N, K) alone: K is cut into
  `chunks` logical pieces (a fixed split-K for that shape), each summed over BK steps in order
  from a zero accumulator, and the chunk sums are added in chunk order, from 0.0. Small batches
  run one program per chunk and a second kernel adds the partials in that order; large batches
  run all chunks in one program and add them in the same order. Same float32 operations either
  way, so the physical split may follow M and a row's bits still do not. What may differ between
  M is the number of activation rows per program (the MMA's N width); that each output element's
  MMA result does not depend on it is checked on the GPU (benchmarks/nf4.py), not assumed.

Anything it does not cover (fp32 compute, other block sizes, FP4, shapes not multiples of 64, the
CPU) goes to bitsandbytes, which stays the reference.

Measured on an H200 (benchmarks/RESULTS.md, issue 18): bitwise invariant across M and split, faster
than bitsandbytes at 8-64 rows on gate/up and down (1.1-1.3x), slower at 1 row, on q/k/v/o, and above
64 rows (4-7x bf16 at 512). The skeleton, not the dequantization, is the limit: a variant that only
loads the packed bytes runs at ~1 TB/s (benchmarks/nf4_lab.py). nf4_mma.py, the same product in CUDA,
loads each byte where its MMA register needs it and runs 1.2-7x bitsandbytes at 1-32 rows; `route`
gives it 1-64 rows under LLMBATCH_NF4_KERNEL=auto (this kernel where it does not build), bitsandbytes the rest.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

try:  # Triton ships with CUDA builds of torch; CPU machines keep bitsandbytes.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

log = logging.getLogger(__name__)

# bnb: bitsandbytes everywhere. triton: ours in Triton at every row count (batch-invariant). cuda: ours in CUDA
# (nf4_mma.py) at every row count (batch-invariant). auto: whichever beat the others on an H200 at that row
# count (RESULTS.md, issue 18), falling back where one does not build (not batch-invariant).
KERNELS = ("bnb", "triton", "cuda", "auto")
CUDA_ROWS = 64  # auto: the CUDA kernel up to here (RESULTS.md: a layer at 64 rows 0.40 ms, Triton 0.59, bnb 0.50)
AUTO_ROWS = (2, 64)  # auto: Triton's where the CUDA kernel does not build; above 64 bitsandbytes' dequantize + cuBLAS
QBLOCK = 64  # elements per absmax: bitsandbytes' default, the only block size the kernel takes


@dataclass(frozen=True)
class Plan:
    """The K reduction of one (N, K) shape: fixed whatever M is."""
    bn: int  # out features per program (the MMA's M side)
    bk: int  # K per step
    chunks: int  # logical split of K; chunk sums are added in order
    chunk: int  # K per chunk, a multiple of 64 (the last may be shorter)
    warps: int = 4
    stages: int = 3
    tree: bool = False  # NF4 values by selects instead of the 16-entry table (benchmark variant)
    two: bool = False  # 2-D dequantization, even and odd k as two products (no interleave); bk 64 or 128.
    # Measured on an H200 (benchmarks/RESULTS.md, issue 18): no faster at 1-64 rows, slower at 512.
    post: bool = True  # absmax after the MMA (the default; see `decode_asm`); False: bitsandbytes' exact weights


def plan_for(N: int, K: int, sms: int = 132) -> Plan | None:
    """The fixed reduction for (N, K), or None where the kernel does not apply.

    Enough programs for small batches to fill the GPU: out-feature tiles x chunks >= ~2 waves.
    The plan depends on N and K (and the GPU's size) only, never on M.
    """
    if N % 64 or K % QBLOCK:
        return None
    bk = 128 if K % 128 == 0 else 64
    # The post-scaled plan: 64-feature tiles, 4 warps, 4 stages, about 4 programs an SM (3.8 x SMs: 8 chunks
    # for q/o and down on 132 SMs, 4 for gate/up): the best of the H200 lab at 1-64 rows (benchmarks/nf4_lab.py).
    # The exact plan (Plan(post=False)) stays a variant that tests and benchmarks build by hand.
    bn, want = 64, int(3.8 * sms)
    tiles = N // bn
    chunks = 1
    while tiles * chunks < want and K // (chunks * 2) >= 2 * bk and (K // (chunks * 2)) % QBLOCK == 0:
        chunks *= 2
    return Plan(bn=bn, bk=bk, chunks=chunks, chunk=K // chunks, warps=4, stages=4)


def rows_tile(M: int) -> int:
    """Activation rows per program (the MMA's N width): a performance choice only."""
    return 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128


def split_launch(M: int, N: int, K: int, plan: Plan, sms: int = 132) -> bool:
    """Run one program per chunk (float32 partials, then their ordered sum) when whole tiles would
    fill less than half the SMs. Performance only: the bits are the same either way. From the H200
    runs of issue 18 (split forced on and off): 32 tiles of a long K run 2-3x slower unsplit at
    1-128 rows; 112 tiles (gate/up) or 128 (q/o at 512 rows) run faster unsplit."""
    return plan.chunks > 1 and -(-M // rows_tile(M)) * (N // plan.bn) * 2 < sms


# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")), what quant_state.code holds for quant_type nf4.
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


@functools.lru_cache(maxsize=None)
def decode_asm(dtype: torch.dtype, pairs: bool = False) -> str:
    """PTX for the post-scaled plan: one 32-bit word of 4 packed bytes (8 codes; byte j holds element 2j
    in its high nibble, 2j + 1 in its low) -> the 8 NF4 values in `dtype` (bf16/fp16), as two words of
    even elements ($0, $1: bytes 0-1, 2-3) and two of odd ones ($2, $3).

    The table lives in the instruction stream as byte tables, so a code costs no load: prmt looks 4 codes
    up at once in entries 0-7 and in 8-15 (3-bit selectors), lop3 picks by each code's bit 3 (a byte
    mask made by prmt's sign-replicate mode), and prmt interleaves low and high bytes: 22 instructions
    for 8 values, against ~10 an element for the float32 table load, multiply and cast. The absmax
    scale is applied to each 64-element block's float32 sum after the MMA instead of to each weight, so
    the weights are the table rounded to bf16 rather than bitsandbytes' code * absmax rounded to bf16:
    within the same rounding, not bitwise bitsandbytes'. Checked byte by byte in tests/test_nf4.py.

    pairs=True (nf4_mma.cu's MMA registers): $j holds byte j's two values instead, the high nibble's
    (element 2j) in the low half: one byte is one register of two k-adjacent weights."""
    bits = [int(torch.tensor(v, dtype=torch.float32).to(dtype).view(torch.int16)) & 0xFFFF for v in NF4]

    def word(first: int, hi: bool) -> int:
        return sum((((bits[first + j] >> 8) if hi else bits[first + j]) & 0xFF) << (8 * j) for j in range(4))

    lo = [word(4 * g, False) for g in range(4)]
    hi = [word(4 * g, True) for g in range(4)]
    out = ["{", ".reg .b32 w4, s, m, ll, lh, hl, hh, lo, hi;", "shl.b32 w4, $4, 4;"]
    # Group A: codes of bytes 0-1 (nibbles 0-3 of the word); group B: bytes 2-3 (the word's upper half).
    # The last two prmts: the group's high-nibble values and its low-nibble ones (pairs: byte by byte).
    outs = (("$0", "0x4051", "$1", "0x6273"), ("$2", "0x4051", "$3", "0x6273")) if pairs else \
        (("$0", "0x7351", "$2", "0x6240"), ("$1", "0x7351", "$3", "0x6240"))
    for (sel, mask), (o1, s1, o2, s2) in zip((("and.b32 s, $4, 0x7777;", "0xD9C8"),
                                              ("shr.b32 s, $4, 16; and.b32 s, s, 0x7777;", "0xFBEA")), outs):
        out += [sel, f"prmt.b32 m, w4, $4, {mask};",  # 0xFF where the code's bit 3 is set
                f"prmt.b32 ll, {lo[0]:#x}, {lo[1]:#x}, s;", f"prmt.b32 lh, {lo[2]:#x}, {lo[3]:#x}, s;",
                f"prmt.b32 hl, {hi[0]:#x}, {hi[1]:#x}, s;", f"prmt.b32 hh, {hi[2]:#x}, {hi[3]:#x}, s;",
                "lop3.b32 lo, ll, lh, m, 0xD8;", "lop3.b32 hi, hl, hh, m, 0xD8;",  # m ? high half : low half
                f"prmt.b32 {o1}, lo, hi, {s1};", f"prmt.b32 {o2}, lo, hi, {s2};"]
    return "\n".join(out + ["}"])


if triton is not None:

    @triton.jit(do_not_specialize=["M"])
    def _nf4_kernel(X, W, ABS, ABS2, CODE2, OFF, LUT, LUT16, BIAS, Y, P,
                    M, N, KH, s_xm, s_ym, CHUNK,
                    CHUNKS_PER_PROG: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
                    PARTIAL: tl.constexpr, EVEN: tl.constexpr, UPCAST: tl.constexpr, TREE: tl.constexpr,
                    TWO: tl.constexpr, POST: tl.constexpr, ASM: tl.constexpr,
                    BN: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr):
        # Program: rows [pid_b*BB, +BB) x out features [pid_n*BN, +BN) x chunks [pid_c*CPP, +CPP).
        pid_b = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_c = tl.program_id(2)
        G: tl.constexpr = BK // 64  # absmax blocks per step
        n = pid_n * BN + tl.arange(0, BN)  # [BN]
        rows = pid_b * BB + tl.arange(0, BB)  # [BB]
        row_ok = rows < M
        g = tl.arange(0, G)
        kk = tl.arange(0, BK)
        kb = tl.arange(0, BK // 2)
        kb32 = tl.arange(0, 32)  # the bytes of one absmax block
        # Byte b of a step holds elements 2b (high nibble) and 2b + 1 (low nibble) of it; absmax
        # block g covers bytes [32g, 32g + 32). KH = K / 2 bytes a row.
        w_row = W + n.to(tl.int64)[:, None] * KH  # [BN, 1]
        a_row = (n.to(tl.int64) * (KH // 32))[:, None] + g[None, :]  # [BN, G] absmax index at k = 0
        x_row = X + rows.to(tl.int64)[None, :] * s_xm  # [1, BB]
        total = tl.zeros([BN, BB], dtype=tl.float32)
        for c in range(pid_c * CHUNKS_PER_PROG, (pid_c + 1) * CHUNKS_PER_PROG):
            k0 = c * CHUNK
            k_end = tl.minimum(k0 + CHUNK, KH * 2)
            acc = tl.zeros([BN, BB], dtype=tl.float32)
            for k in range(k0, k_end, BK):
                k = tl.multiple_of(k, 64)
                if POST:
                    # One 64-element absmax block at a time: its even k and its odd k as two products over
                    # the table's values, the block's float32 sum then scaled by its absmax.
                    for j in tl.static_range(BK // 64):
                        kj = k + 64 * j
                        kin = (kj + 2 * kb32) < k_end  # [32]: whole blocks in or out (K, chunks: multiples of 64)
                        wp = w_row + (kj // 2 + kb32)[None, :]  # [BN, 32] bytes
                        xp = X + rows.to(tl.int64)[None, :] * s_xm + (kj + 2 * kb32)[:, None]  # [32, BB] even k
                        if EVEN:
                            packed = tl.load(wp)
                            xe = tl.load(xp, mask=row_ok[None, :], other=0.0)
                            xo = tl.load(xp + 1, mask=row_ok[None, :], other=0.0)
                        else:
                            packed = tl.load(wp, mask=kin[None, :], other=0)
                            xe = tl.load(xp, mask=row_ok[None, :] & kin[:, None], other=0.0)
                            xo = tl.load(xp + 1, mask=row_ok[None, :] & kin[:, None], other=0.0)
                        amax = _absmax(ABS, ABS2, CODE2, OFF, n.to(tl.int64) * (KH // 32) + kj // 64,
                                       n * 0 + kj < k_end, NESTED)  # [BN] float32, as bitsandbytes
                        if UPCAST:  # the interpreter runs no PTX: the same values from a table
                            q = packed.to(tl.int32)
                            part = tl.dot(tl.load(LUT16 + (q >> 4)), xe.to(tl.float32))
                            part = tl.dot(tl.load(LUT16 + (q & 15)), xo.to(tl.float32), part)
                        else:
                            even, odd = tl.inline_asm_elementwise(
                                ASM, "=r,=r,=r,=r,r", [packed], dtype=(X.dtype.element_ty, X.dtype.element_ty),
                                is_pure=True, pack=4)
                            part = tl.dot(even, xe)
                            part = tl.dot(odd, xo, part)
                        acc += part * amax[:, None]  # [BN, BB]
                elif TWO:
                    # 2-D throughout: bytes [BN, BK/2]; the high nibbles are the step's even k, the low
                    # nibbles its odd k, multiplied as two products (even k, then odd k): no interleave.
                    wp = w_row + (k // 2 + kb)[None, :]
                    if EVEN:
                        packed = tl.load(wp)
                    else:
                        packed = tl.load(wp, mask=(k + 2 * kb < k_end)[None, :], other=0)
                    first = n.to(tl.int64) * (KH // 32) + k // 64  # [BN] the step's first absmax block
                    a0 = _absmax(ABS, ABS2, CODE2, OFF, first, n >= 0, NESTED)
                    if G == 2:  # the second block of the step, where it is inside the chunk
                        a1 = _absmax(ABS, ABS2, CODE2, OFF, first + 1, n * 0 + k + 64 < k_end, NESTED)
                        amax = tl.where((kb < 32)[None, :], a0[:, None], a1[:, None])  # [BN, BK/2]
                    else:
                        amax = a0[:, None]
                    q = packed.to(tl.int32)
                    v_hi = _table(LUT, q >> 4, TREE, UPCAST) * amax  # float32, as bitsandbytes
                    v_lo = _table(LUT, q & 15, TREE, UPCAST) * amax
                    xp = X + rows.to(tl.int64)[:, None] * s_xm + (k + kk)[None, :]  # [BB, BK]
                    if EVEN:
                        xs = tl.load(xp, mask=row_ok[:, None], other=0.0)
                    else:
                        xs = tl.load(xp, mask=row_ok[:, None] & ((k + kk) < k_end)[None, :], other=0.0)
                    x_even, x_odd = tl.split(tl.reshape(xs, [BB, BK // 2, 2]))  # [BB, BK/2] each
                    if UPCAST:
                        acc = tl.dot(_round_to(v_hi, X.dtype.element_ty), tl.trans(x_even).to(tl.float32), acc)
                        acc = tl.dot(_round_to(v_lo, X.dtype.element_ty), tl.trans(x_odd).to(tl.float32), acc)
                    else:
                        acc = tl.dot(v_hi.to(X.dtype.element_ty), tl.trans(x_even), acc)
                        acc = tl.dot(v_lo.to(X.dtype.element_ty), tl.trans(x_odd), acc)
                else:
                    blk = a_row + k // 64
                    w_ptrs = w_row + (k // 2 + kb)[None, :]  # [BN, BK/2]
                    if EVEN:
                        packed = tl.load(w_ptrs)
                        if NESTED:
                            qa = tl.load(ABS + blk)
                        else:
                            amax = tl.load(ABS + blk)
                    else:
                        kin = (k + 64 * g) < k_end  # [G]: whole absmax blocks in or out
                        packed = tl.load(w_ptrs, mask=(k + 2 * kb < k_end)[None, :], other=0)
                        if NESTED:
                            qa = tl.load(ABS + blk, mask=kin[None, :], other=0)
                        else:
                            amax = tl.load(ABS + blk, mask=kin[None, :], other=0.0)
                    if NESTED:
                        # float32 product, then + offset: two roundings, as dequantize_blockwise then +=.
                        amax = tl.load(CODE2 + qa.to(tl.int32)) * tl.load(ABS2 + blk // 256) + tl.load(OFF)
                    q = tl.reshape(packed, [BN, G, 32]).to(tl.int32)
                    codes = tl.join(q >> 4, q & 15)  # [BN, G, 32, 2]: even element, odd element
                    if TREE:  # the table as selects (a variant the benchmark compares), no loads
                        vals = _nf4_tree(codes) * amax[:, :, None, None]
                    elif UPCAST:  # the interpreter runs no PTX
                        vals = tl.load(LUT + codes) * amax[:, :, None, None]
                    else:
                        # A plain load from the 64-byte table (it stays in L1), kept away from the software
                        # pipeliner, which would turn each 4-byte gather into an async copy through shared
                        # memory (64 KB a stage for a 128 x 128 tile).
                        vals = tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [LUT + codes],
                                                         dtype=tl.float32, is_pure=True, pack=1)
                        vals = vals * amax[:, :, None, None]  # float32, as bitsandbytes
                    if UPCAST:
                        w = tl.reshape(_round_to(vals, X.dtype.element_ty), [BN, BK])
                    else:
                        w = tl.reshape(vals.to(X.dtype.element_ty), [BN, BK])  # [BN, BK], k = 64g + 2j + t
                    x_ptrs = x_row + (k + kk)[:, None]  # [BK, BB]
                    if EVEN:
                        xt = tl.load(x_ptrs, mask=row_ok[None, :], other=0.0)
                    else:
                        xt = tl.load(x_ptrs, mask=row_ok[None, :] & ((k + kk) < k_end)[:, None], other=0.0)
                    if UPCAST:  # Triton's interpreter multiplies bf16 as raw uint16: exact float32 copies
                        acc = tl.dot(w, xt.to(tl.float32), acc)
                    else:
                        acc = tl.dot(w, xt, acc)  # [BN, BB]
            total = total + acc  # chunk sums in chunk order, from 0.0, in either launch
        if PARTIAL:  # one chunk per program: P[chunk, row, n]
            tl.store(P + (pid_c * M + rows[None, :]).to(tl.int64) * N + n[:, None], total, mask=row_ok[None, :])
        else:
            if HAS_BIAS:
                total = total + tl.load(BIAS + n).to(tl.float32)[:, None]
            if UPCAST:
                total = _round_to(total, Y.dtype.element_ty)
            tl.store(Y + rows[None, :].to(tl.int64) * s_ym + n[:, None], total.to(Y.dtype.element_ty),
                     mask=row_ok[None, :])

    @triton.jit
    def _absmax(ABS, ABS2, CODE2, OFF, idx, ok, NESTED: tl.constexpr):
        # float32 absmax of blocks idx [BN]; nested: code * absmax2 + offset, two roundings as
        # dequantize_blockwise then += (the launch turns fused multiply-add off).
        if NESTED:
            qa = tl.load(ABS + idx, mask=ok, other=0)
            return tl.load(CODE2 + qa.to(tl.int32)) * tl.load(ABS2 + idx // 256, mask=ok, other=0.0) + tl.load(OFF)
        else:
            return tl.load(ABS + idx, mask=ok, other=0.0)

    @triton.jit
    def _table(LUT, codes, TREE: tl.constexpr, UPCAST: tl.constexpr):
        # The 16 NF4 values, float32, at int32 codes.
        if TREE:
            return _nf4_tree(codes)
        elif UPCAST:  # the interpreter runs no PTX
            return tl.load(LUT + codes)
        else:  # a plain load from the 64-byte table, out of the pipeliner's reach (see the kernel)
            return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [LUT + codes],
                                             dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _nf4_tree(q):
        # bitsandbytes' NF4 values (functional.get_4bit_type) by the code's bits, high bit first.
        b0, b1, b2, b3 = (q & 8) != 0, (q & 4) != 0, (q & 2) != 0, (q & 1) != 0
        pos = tl.where(b1, tl.where(b2, tl.where(b3, 1.0, 0.7229568362236023),
                                    tl.where(b3, 0.5626170039176941, 0.44070982933044434)),
                       tl.where(b2, tl.where(b3, 0.33791524171829224, 0.24611230194568634),
                                tl.where(b3, 0.16093020141124725, 0.07958029955625534)))
        neg = tl.where(b1, tl.where(b2, tl.where(b3, 0.0, -0.09105003625154495),
                                    tl.where(b3, -0.18477343022823334, -0.28444138169288635)),
                       tl.where(b2, tl.where(b3, -0.39491748809814453, -0.5250730514526367),
                                tl.where(b3, -0.6961928009986877, -1.0)))
        return tl.where(b0, pos, neg)

    @triton.jit
    def _round_to(v, dtype: tl.constexpr):
        # float32 v rounded to bf16/fp16 precision (nearest, ties to even), still float32. Only under
        # the interpreter, whose float32 -> bf16 cast truncates (the GPU's cvt rounds to nearest).
        if dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return v.to(dtype).to(tl.float32)

    @triton.jit(do_not_specialize=["M"])
    def _sum_chunks(P, BIAS, Y, M, N, s_ym, CHUNKS: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK: tl.constexpr):
        # y = ((0 + p0) + p1) + ... (+ bias): the order the one-program path adds its chunks in.
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < M * N
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(CHUNKS):
            total = total + tl.load(P + c * M * N + i, mask=ok, other=0.0)
        n = i % N
        if HAS_BIAS:
            total = total + tl.load(BIAS + n, mask=ok, other=0.0).to(tl.float32)
        if UPCAST:
            total = _round_to(total, Y.dtype.element_ty)
        tl.store(Y + (i // N) * s_ym + n, total.to(Y.dtype.element_ty), mask=ok)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.lru_cache(maxsize=None)
def _sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def storage_ok(weight: torch.Tensor, qs, x: torch.Tensor) -> bool:
    """Whether the weight is bitsandbytes' NF4 storage both our kernels read, with bf16/fp16 activations."""
    if qs is None or x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != torch.uint8:
        return False
    if qs.quant_type != "nf4" or qs.blocksize != QBLOCK or len(qs.shape) != 2:
        return False
    if getattr(qs, "packing_format_for_cpu", False):  # bitsandbytes repacked it for its AVX512 kernel
        return False
    if qs.nested and (qs.state2.blocksize != 256 or qs.absmax.dtype != torch.uint8):
        return False
    return x.shape[-1] == qs.shape[1]


def supported(weight: torch.Tensor, qs, x: torch.Tensor) -> bool:
    """Whether our kernel takes this product; the rest stays with bitsandbytes."""
    if triton is None or (x.device.type != "cuda" and not _interpreting()):
        return False
    return storage_ok(weight, qs, x) and plan_for(*qs.shape) is not None


def matmul(x: torch.Tensor, weight: torch.Tensor, qs, bias: torch.Tensor | None = None,
           plan: Plan | None = None, split: bool | None = None) -> torch.Tensor:
    """x [..., K] (bf16/fp16) @ dequant(weight, qs)^T + bias -> [..., N] in x's dtype.

    weight: the Params4bit data ([N*K/2, 1] uint8), qs its QuantState. plan/split: tests and the
    benchmark force them; the row bits never depend on `split`.
    """
    N, K = qs.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*lead, N)
    sms = _sms(x.device.index or 0) if x.device.type == "cuda" else 132
    plan = plan or plan_for(N, K, sms)
    bb = rows_tile(M)
    split = split_launch(M, N, K, plan, sms) if split is None else (split and plan.chunks > 1)
    nested = bool(qs.nested)
    absmax = qs.absmax
    abs2, code2, off = (qs.state2.absmax, qs.state2.code, qs.offset) if nested else (absmax, absmax, absmax)
    if nested and not torch.is_tensor(off):
        off = torch.tensor(float(off), dtype=torch.float32, device=x.device)
    lut = qs.code
    # The interpreter's stand-in for decode_asm: the table rounded to the compute dtype, as float32.
    lut16 = qs.code.to(x.dtype).float() if plan.post and _interpreting() else lut
    b = bias if bias is not None else y
    even = plan.chunk % plan.bk == 0 and K % plan.chunk == 0
    grid_rows = -(-M // bb)
    common = dict(UPCAST=_interpreting(), TREE=plan.tree or _TREE_ONLY[0], TWO=plan.two, NESTED=nested,
                  POST=plan.post, ASM=decode_asm(x.dtype) if plan.post else "",
                  HAS_BIAS=bias is not None, EVEN=even, BN=plan.bn, BB=bb, BK=plan.bk)
    # No fused multiply-add: double quantization's code * absmax + offset rounds twice in bitsandbytes.
    launch = {} if _interpreting() else dict(num_warps=plan.warps, num_stages=plan.stages, enable_fp_fusion=False)
    args = (x2, weight, absmax, abs2, code2, off, lut, lut16, b, y, M, N, K, plan, -(-K // plan.chunk), split,
            grid_rows)
    try:
        _launch(*args, common, launch, bias is not None)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, triton.CompilationError) as exc:
        if common["TREE"] or plan.post or x.device.type != "cuda":
            raise
        # The table load is inline PTX: a Triton that cannot build it gets the select tree (same values).
        log.warning("NF4 kernel: the table load did not compile (%s); using the select tree", exc)
        _TREE_ONLY[0] = True
        _launch(*args, {**common, "TREE": True}, launch, bias is not None)
    return y.reshape(*lead, N)


_TREE_ONLY = [False]


def _launch(x2, weight, absmax, abs2, code2, off, lut, lut16, b, y, M, N, K, plan, chunks, split, grid_rows, common,
            launch, has_bias) -> None:
    if split:
        part = torch.empty(chunks, M, N, dtype=torch.float32, device=x2.device)
        _nf4_kernel[(grid_rows, N // plan.bn, chunks)](
            x2, weight, absmax, abs2, code2, off, lut, lut16, b, y, part, M, N, K // 2, x2.stride(0), y.stride(0), plan.chunk,
            CHUNKS_PER_PROG=1, PARTIAL=True, **common, **launch)
        block = 1024
        _sum_chunks[(-(-(M * N) // block),)](part, b, y, M, N, y.stride(0), CHUNKS=chunks,
                                             HAS_BIAS=has_bias, UPCAST=_interpreting(), BLOCK=block)
    else:
        _nf4_kernel[(grid_rows, N // plan.bn, 1)](
            x2, weight, absmax, abs2, code2, off, lut, lut16, b, y, y, M, N, K // 2, x2.stride(0), y.stride(0), plan.chunk,
            CHUNKS_PER_PROG=chunks, PARTIAL=False, **common, **launch)


def float32_weights(weight: torch.Tensor, qs) -> torch.Tensor:
    """bitsandbytes' code * absmax in float32, unrounded [N, K]: what both plans' error is measured against."""
    import copy

    import bitsandbytes.functional as bf

    q32 = copy.copy(qs)
    q32.dtype = torch.float32
    return bf.dequantize_4bit(weight, q32)


def reference(x: torch.Tensor, weight: torch.Tensor, qs, bias: torch.Tensor | None = None) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit then F.linear: what the kernel is checked against."""
    import bitsandbytes.functional as bf

    w = bf.dequantize_4bit(weight, qs).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)


# -- the modules ------------------------------------------------------------------


def route(kernel: str, rows: int) -> str:
    """Which implementation multiplies `rows` rows under `kernel`: "cuda", "triton" or "bnb"."""
    if kernel != "auto":
        return kernel
    if rows <= CUDA_ROWS and "cuda" not in _FAILED:
        from . import nf4_mma

        if nf4_mma.available():
            return "cuda"
    if AUTO_ROWS[0] <= rows <= AUTO_ROWS[1] and "triton" not in _FAILED:
        return "triton"
    return "bnb"


def forward(module, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit.forward through our kernels where they apply, bitsandbytes' own elsewhere."""
    weight = module.weight
    qs = getattr(weight, "quant_state", None)
    dtype = module.compute_dtype or x.dtype
    kernel = type(module)._llmbatch_nf4  # "triton", "cuda" or "auto": bnb modules keep bitsandbytes' own forward
    impl = route(kernel, x.numel() // x.shape[-1])
    if not module.training and impl != "bnb" and x.dtype == dtype:
        from . import nf4_mma

        takes, multiply = (nf4_mma.supported, nf4_mma.matmul) if impl == "cuda" else (supported, matmul)
        if takes(weight, qs, x):
            bias = module.bias
            if bias is not None and bias.dtype != x.dtype:
                bias = bias.to(x.dtype)
            try:
                return multiply(x, weight, qs, bias)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # a build or launch failure (nvcc, ptxas, Triton)
                if kernel != "auto":  # asked for by name (A/B runs, invariant mode): no silent substitute
                    raise
                # auto (the default): a GPU or toolchain ours does not build on keeps bitsandbytes.
                log.warning("NF4 kernel: ours (%s) failed (%s); not used from now on", impl, exc)
                _FAILED.add(impl)
    return type(module).__mro__[1].forward(module, x)


_FAILED: set[str] = set()  # our implementations that failed here: auto passes them over


_CLASSES: dict[tuple[type, str], type] = {}


def _ours(cls: type, kernel: str) -> type:
    """A subclass of the module's Linear4bit class whose forward is ours (isinstance still holds,
    so peft and our LoRA hooks, which hook __call__, see the same module); _llmbatch_nf4 names the kernel."""
    if (cls, kernel) not in _CLASSES:
        _CLASSES[cls, kernel] = type(f"{kernel.title()}{cls.__name__}", (cls,), {"forward": forward,
                                                                                  "_llmbatch_nf4": kernel})
    return _CLASSES[cls, kernel]


def use(model, kernel: str) -> int:
    """Switch every Linear4bit of the model to `kernel` (one of KERNELS); returns how many modules
    run ours. Switching back restores bitsandbytes' class. Captured CUDA graphs keep the kernel they
    were captured with: switch before an Engine (and its Runner) is made."""
    check(kernel)
    import bitsandbytes as bnb

    from . import nf4_mma

    if kernel == "cuda" and not nf4_mma.available():
        raise RuntimeError("LLMBATCH_NF4_KERNEL=cuda: the CUDA kernel did not build here (see the log); "
                           "use auto, triton or bnb")
    cuda = kernel in ("cuda", "auto") and nf4_mma.available()  # builds it once, now (False without a GPU)
    n = 0
    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        base = type(m).__mro__[1] if getattr(type(m), "_llmbatch_nf4", False) else type(m)
        m.__class__ = base if kernel == "bnb" else _ours(base, kernel)
        qs = getattr(m.weight, "quant_state", None)
        if cuda and qs is not None and m.weight.device.type == "cuda":
            nf4_mma.offset(qs)  # read now: a read inside a CUDA graph capture would fail
        n += kernel != "bnb"
    return n


def check(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"unknown NF4 kernel {kernel!r} (LLMBATCH_NF4_KERNEL): choose from {', '.join(KERNELS)}")
    return kernel
