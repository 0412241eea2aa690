"""Batch-invariant mode (issue 22): a row's logits are a function of its own tokens, bitwise.

Whatever its batch mates, its slot and the batch's padded width. The sampler draws from a row's
own logits, seed and position only (sampling.py, its scans included), so a seeded line then repeats
its tokens in any batch. Two paths, one promise:

- Off CUDA (the CPU, CI, the bundled model): each row's forward runs alone, a batch of one
  (forward.Runner with invariant=True): decode row by row, prefill prompt by prompt, so every shape a
  row meets is set by the row itself (M = 1 or its prompt's length, attention over its own length).
  What made rows differ there (matmul blocking by M, attention sums over the padded width) then has
  nothing to vary with. The NF4 weights are dequantized once to float32 (`dequantized`): exact
  float32 products, where bitsandbytes' CPU 4-bit path rounds at bf16 and dequantizes on every
  call. It costs a weight pass per row per step instead of one per step, and 4 bytes a weight:
  fine for the small models run on CPUs.
- On CUDA, batched, through kernels whose reduction order per output element is fixed by the shape's
  N and K (never by M or by which rows share a tile): NF4 projections dequantized by bitsandbytes
  (elementwise), then `matmul` below (or our nf4.py kernel, see NF4_PATH; its plan is per (N, K));
  dense Linear (the LM head) through `matmul` too (a fixed K step, K in chunks fixed by (N, K)); RMSNorm
  through `rms_norm` below (one program a row). forward.py adds one KV split a row in decode
  attention (no merge) and prefill attention prompt by prompt. CUDA-graph buckets pad with rows
  that no other row's output reads.

`use(model)` swaps the modules' classes (isinstance still holds, so LoRA hooks see the same modules).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

try:  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

from . import nf4

if triton is not None:
    from .nf4 import _round_to

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def tiles_for(dtype: torch.dtype, M: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, warps, stages) of `matmul`. An output element's sum is set by BK alone (K in BK steps
    from 0, one dot a step), so BK is fixed by dtype; the tile's height and width only choose which rows
    and columns share a program, so they may follow M. Checked bitwise on an H200 over seven tile shapes
    (64/128 x 128/256, 4/8 warps, 3/4 stages: benchmarks/nf4_lab.py) and on the engine (invariance.py).
    Larger tiles from 129 rows: at 512 rows they ran 1.2-1.5x faster than 64 x 128 (RESULTS.md, issue 22).
    float32 takes smaller tiles (ieee dot)."""
    if dtype == torch.float32:
        return 32, 64, 32, 4, 3
    return (64, 128, 64, 4, 4) if M <= 128 else (128, 128, 64, 8, 4)


if triton is not None:

    # M is not specialized: M = 1 would otherwise compile another kernel (with its own instruction order).
    @triton.jit(do_not_specialize=["M"])
    def _matmul_kernel(X, W, BIAS, Y, P, M, N, K, CHUNK, s_xm, s_wn, s_ym,
                       HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # Program: rows [pid_m*BM, +BM) x out features [pid_n*BN, +BN). K is cut into chunks of CHUNK
        # (splits_for: fixed by N and K), each summed in BK steps from 0, and the chunk sums are added in
        # chunk order from 0.0. SPLIT: this program sums chunk program_id(1) alone into the float32
        # partials P [chunks, M, N] and _matmul_reduce adds them in the same order; else it does every
        # chunk in turn. Same bits either way, so the choice may follow M.
        # The row tiles of one column tile are neighbours in launch order: W's tile is reused from L2.
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BM)
        pid_m = pid % tiles_m
        pid_n = pid // tiles_m
        rm = pid_m * BM + tl.arange(0, BM)  # [BM]
        rn = pid_n * BN + tl.arange(0, BN)  # [BN]
        rk = tl.arange(0, BK)
        if SPLIT:
            c_lo = tl.program_id(1)
            c_hi = c_lo + 1
        else:
            c_lo = 0
            c_hi = tl.cdiv(K, CHUNK)
        total = tl.zeros([BM, BN], dtype=tl.float32)
        for c in range(c_lo, c_hi):
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for k in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, K), BK):
                kk = k + rk
                x = tl.load(X + rm.to(tl.int64)[:, None] * s_xm + kk[None, :],
                            mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)  # [BM, BK]
                w = tl.load(W + rn.to(tl.int64)[None, :] * s_wn + kk[:, None],
                            mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)  # [BK, BN]
                if UPCAST:  # Triton's interpreter multiplies bf16 as raw uint16: exact float32 copies
                    acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
                elif IEEE:
                    acc = tl.dot(x, w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, w, acc)
            total += acc
        if SPLIT:
            tl.store(P + (c_lo * M + rm.to(tl.int64))[:, None] * N + rn[None, :], total,
                     mask=(rm[:, None] < M) & (rn[None, :] < N))
        else:
            if HAS_BIAS:
                total += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            if UPCAST:  # the interpreter's cast truncates; the GPU's rounds to nearest
                total = _round_to(total, Y.dtype.element_ty)
            tl.store(Y + rm.to(tl.int64)[:, None] * s_ym + rn[None, :], total.to(Y.dtype.element_ty),
                     mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit(do_not_specialize=["M"])
    def _matmul_reduce(P, BIAS, Y, M, N, CHUNKS, s_ym, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK: tl.constexpr):
        # Y[m, n] = the chunk sums P[0..CHUNKS, m, n] added in chunk order from 0.0 (+ bias): as _matmul_kernel.
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < M * N
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(CHUNKS):
            total += tl.load(P + c * M * N + i, mask=ok, other=0.0)
        n = i % N
        if HAS_BIAS:
            total += tl.load(BIAS + n, mask=ok, other=0.0).to(tl.float32)
        if UPCAST:
            total = _round_to(total, Y.dtype.element_ty)
        tl.store(Y + (i // N) * s_ym + n, total.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _rms_norm_kernel(X, W, Y, N, s_x, s_y, eps, UPCAST: tl.constexpr, BLOCK: tl.constexpr):
        # One program a row, the whole row in one block: the sum's order is the kernel's, not the batch's.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(X + row * s_x + cols, mask=ok, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        # As transformers' LlamaRMSNorm: normalized in float32, cast, then scaled in the input's dtype.
        if UPCAST:
            h = _round_to(x * r, Y.dtype.element_ty)
            y = _round_to(w * h, Y.dtype.element_ty)
        else:
            h = (x * r).to(Y.dtype.element_ty).to(tl.float32)
            y = w * h
        tl.store(Y + row * s_y + cols, y.to(Y.dtype.element_ty), mask=ok)


def splits_for(N: int, K: int, bk: int) -> int:
    """Chunks K is summed in (fixed by N and K, never M): enough programs for a few rows to fill the GPU,
    N / 128 column tiles x chunks >= 256, at most 8, each chunk whole BK steps. With one chunk for
    `down` (N = 4096, K = 14336) 32 programs did its work at 1-128 rows, 2.2x cuBLAS (RESULTS.md, issue 22)."""
    s = 1
    while (N // 128) * s < 256 and s < 8 and K % (2 * s * bk) == 0:
        s *= 2
    return s


# The chunks run as programs of their own (SPLIT) where the tiles alone give fewer programs than this, half
# the H200's 132 SMs; elsewhere one program sums them (the partials' traffic then costs more than the programs
# gain). H200, nf4_lab.py in CUDA graphs (RESULTS.md, issue 22): down at 1-32 rows 1.04-1.07x cuBLAS split
# against 2.5x whole; k/v at 512 rows 2.0x against 3.7x; q/o at 300 rows 1.77x whole against 2.6x split.
SPLIT_PROGRAMS = 66


def matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, split: bool | None = None,
           tiles: tuple | None = None) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T (+ bias [N]) -> [..., N] in x's dtype; each row's bits independent of M.
    split, tiles: benchmarks force them (neither changes the bits)."""
    N, K = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    w = w.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*lead, N)
    bm, bn, bk, warps, stages = tiles or tiles_for(x.dtype, M)
    chunks = splits_for(N, K, bk)
    programs = -(-M // bm) * -(-N // bn)
    split = (programs < SPLIT_PROGRAMS if split is None else split) and chunks > 1
    launch = {} if _interpreting() else dict(num_warps=warps, num_stages=stages)
    p = torch.empty(chunks, M, N, dtype=torch.float32, device=x.device) if split else y
    b = bias if bias is not None else y  # a pointer the kernels never read without HAS_BIAS
    _matmul_kernel[(programs, chunks if split else 1)](
        x2, w, b, y, p, M, N, K, K // chunks, x2.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, UPCAST=_interpreting(), SPLIT=split,
        BM=bm, BN=bn, BK=bk, **launch)
    if split:
        block = 1024
        _matmul_reduce[(-(-M * N // block),)](p, b, y, M, N, chunks, y.stride(0),
                                              HAS_BIAS=bias is not None, UPCAST=_interpreting(), BLOCK=block)
    return y.reshape(*lead, N)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-wise RMSNorm over the last dim of x [..., N], in x's dtype."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N).contiguous()
    y = torch.empty_like(x2)
    if x2.shape[0]:
        block = triton.next_power_of_2(N)
        launch = {} if _interpreting() else dict(num_warps=8 if block >= 4096 else 4)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, N, x2.stride(0), y.stride(0), eps,
                                         UPCAST=_interpreting(), BLOCK=block, **launch)
    return y.reshape(x.shape)


# -- the modules ------------------------------------------------------------------


def _linear(module, x: torch.Tensor) -> torch.Tensor:
    return matmul(x, module.weight, module.bias)


# How NF4 projections run in this mode: "kernel" (ours, nf4.py, dequantizing in registers) or
# "dequant" (bitsandbytes' dequantize_4bit, elementwise, then `matmul`). Both keep a row's bits
# (benchmarks/invariance.py checks both). "dequant" is the default: on an H200 it ran `fixed` at
# 0.76x the default mode against 0.24x for our kernel (benchmarks/RESULTS.md, issue 22).
NF4_PATHS = ("kernel", "dequant")
NF4_PATH = "dequant"


def _linear4bit(module, x: torch.Tensor) -> torch.Tensor:
    """Our NF4 kernel where it applies (NF4_PATH "kernel"); elsewhere (float32 compute, odd shapes, or
    "dequant") bitsandbytes' weights dequantized and multiplied by `matmul`: both keep a row's bits whatever M."""
    weight, qs = module.weight, getattr(module.weight, "quant_state", None)
    bias = module.bias.to(x.dtype) if module.bias is not None else None
    if NF4_PATH == "kernel" and nf4.supported(weight, qs, x):
        return nf4.matmul(x, weight, qs, bias)
    import bitsandbytes.functional as bf

    return matmul(x, bf.dequantize_4bit(weight, qs).to(x.dtype), bias)


def _norm(module, x: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, module.weight, module.variance_epsilon)


_CLASSES: dict[tuple, type] = {}


def _ours(cls: type, forward, name: str = "Invariant") -> type:
    """A subclass of cls with this forward (isinstance still holds: peft and LoRA hooks see the module)."""
    if (cls, name) not in _CLASSES:
        _CLASSES[cls, name] = type(f"{name}{cls.__name__}", (cls,), {"forward": forward, "_llmbatch_invariant": True})
    return _CLASSES[cls, name]


def _base(module) -> type:
    """The module's class before nf4.use or use() swapped it."""
    cls = type(module)
    while getattr(cls, "_llmbatch_invariant", False) or getattr(cls, "_llmbatch_nf4", False):
        cls = cls.__mro__[1]
    return cls


def _dense4bit(module, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' weights dequantized once (float32 products code * absmax, kept on the module) and
    multiplied by F.linear: no 4-bit kernel that rounds to bf16 (bitsandbytes' CPU path), no per-call
    dequantization. The CPU's path in this mode, where every call has M = 1 or one prompt's length."""
    w = module.__dict__.get("_llmbatch_dense")
    if w is None or w.dtype != x.dtype:
        import bitsandbytes.functional as bf

        w = module._llmbatch_dense = bf.dequantize_4bit(module.weight, module.weight.quant_state).to(x.dtype)
    bias = module.bias.to(x.dtype) if module.bias is not None else None
    return torch.nn.functional.linear(x, w, bias)


@contextmanager
def dequantized(model):
    """For the duration, the model's Linear4bit modules multiply by their dequantized weights (_dense4bit);
    their classes are restored after. Off CUDA, for the runner's row-by-row forwards. Reentrant."""
    import bitsandbytes as bnb

    mods = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    before = [type(m) for m in mods]
    for m, cls in zip(mods, before):
        m.__class__ = _ours(_base(m), _dense4bit, "Dense")
    try:
        yield
    finally:
        for m, cls in zip(mods, before):
            m.__class__ = cls


# Row counts at which a layer meets each of matmul's variants: small tiles (split or not, by the layer's
# width), large tiles split (few column tiles), large tiles whole.
WARM_ROWS = (1, 129, 1152)


@torch.inference_mode()
def warm(model, dtype: torch.dtype) -> int:
    """Run each distinct swapped layer (class, shape, bias) once at WARM_ROWS, so that Triton compiles every
    kernel variant now, when the engine is made, and not inside the first job. (The first `fixed` run's
    slowness, 0.32x against 0.7x, was not this but cuDNN's attention plans: forward._attend_each; RESULTS.md,
    issue 22.) Returns the layers run."""
    device = next(model.parameters()).device
    seen = set()
    for m in model.modules():
        if not getattr(type(m), "_llmbatch_invariant", False):
            continue
        width = getattr(m, "in_features", None) or m.weight.shape[-1]
        key = (type(m), width, getattr(m, "out_features", None), getattr(m, "bias", None) is not None)
        if key in seen:
            continue
        seen.add(key)
        for rows in WARM_ROWS:
            m(torch.zeros(rows, width, dtype=dtype, device=device))
    return len(seen)


def plain_rms_norm(module) -> bool:
    """Llama's RMSNorm kind (weight * x / rms): Gemma's 1 + weight and others keep their own forward."""
    return hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), torch.Tensor) \
        and not type(module).__name__.startswith("Gemma")


def use(model, on: bool = True) -> int:
    """Swap every Linear4bit, plain nn.Linear and Llama-style RMSNorm of the model to the invariant
    forwards above (on=False: back to the classes they had before, e.g. nf4.py's kernel choice); returns how many.
    For CUDA (Triton); before an Engine is made (graphs keep what they captured). Idempotent."""
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        base = _base(m)
        if not on:
            if getattr(type(m), "_llmbatch_invariant", False):
                # Back to the class before use() (nf4.py's kernel choice, say), else the module's own.
                m.__class__ = m.__dict__.pop("_llmbatch_before", base)
                n += 1
            continue
        if issubclass(base, bnb.nn.Linear4bit):
            forward = _linear4bit
        elif base is torch.nn.Linear:
            forward = _linear
        elif plain_rms_norm(m):
            forward = _norm
        else:
            continue
        if not getattr(type(m), "_llmbatch_invariant", False):
            m.__dict__["_llmbatch_before"] = type(m)
        m.__class__ = _ours(base, forward)
        n += 1
    return n
