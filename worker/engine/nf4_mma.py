"""Our NF4 matmul for decode-sized batches, in CUDA (nf4_mma.cu): mma.sync over bitsandbytes' own storage.

Why a second implementation of nf4.py's product: Triton chooses where each loaded byte lands, so its kernel
repacks the weights on chip (byte loads, layout conversions), and that skeleton, not the dequantization, capped
it near 1 TB/s (benchmarks/nf4_lab.py, issue 18). Here each thread loads the bytes its MMA registers need
directly (8-byte loads), because the activations are read in the same permuted K order (nf4_mma.cu explains).

Built on first use with torch's `load_inline` (nvcc and ninja must be on the machine: CUDA images have them);
where it does not build, `nf4.py` keeps the Triton kernel and bitsandbytes. Batch-invariant: the reduction
over K is fixed by (N, K) alone (`warps_for`), whatever the rows.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import torch

from . import nf4

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("nf4_mma.cu")
SUPERSTEP = 256  # K a warp takes per loop iteration: 4 absmax blocks
DEPTH = 1  # supersteps of weights in flight ahead of the one multiplying (benchmarks/nf4.py --mma-variants depth=2)
LUT = False  # a byte's value pair from a table in shared memory instead of decode_asm in registers (lut=1)
PERSIST = False  # one wave of blocks looping over feature tiles (persist=1)

_BINDING = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

int @ENTRY@(bool half, int nt, int mt, const void* x, int64_t sx, const void* w, const void* aq,
                   const void* af, const void* a2, const void* code2, float offset, const void* pairs,
                   const void* bias, void* y, int64_t sy, int M, int N, int K, int warps, int persist,
                   cudaStream_t stream);

torch::Tensor mm(torch::Tensor x, torch::Tensor w, torch::Tensor absmax, c10::optional<torch::Tensor> absmax2,
                 c10::optional<torch::Tensor> code2, double offset, torch::Tensor pairs,
                 c10::optional<torch::Tensor> bias, int64_t N, int64_t warps, int64_t nt, int64_t mt, bool persist) {
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const bool nested = absmax.scalar_type() == torch::kUInt8;
  const int rc = @ENTRY@(
      x.scalar_type() == torch::kHalf, nt, mt, x.data_ptr(), x.stride(0), w.data_ptr(),
      nested ? absmax.data_ptr() : nullptr, nested ? nullptr : absmax.data_ptr(),
      nested ? absmax2->data_ptr() : nullptr, nested ? code2->data_ptr() : nullptr, static_cast<float>(offset),
      pairs.data_ptr(), bias.has_value() ? bias->data_ptr() : nullptr, y.data_ptr(), y.stride(0), M, N, K, warps,
      persist ? 1 : 0, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(rc == 0, "nf4_mma: launch failed (", rc, "): ", cudaGetErrorString(cudaGetLastError()));
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("mm", &mm); }
"""


def source(depth: int | None = None, lut: bool | None = None) -> str:
    """nf4_mma.cu with the register table's PTX (nf4.decode_asm, checked by emulation in tests), the
    prefetch depth and the table's place filled in."""
    depth, lut = DEPTH if depth is None else depth, LUT if lut is None else lut
    text = SOURCE.read_text().replace("@DEPTH@", str(int(depth))).replace("@LUT@", str(int(lut)))
    text = text.replace("@ENTRY@", _entry(depth, lut))
    for dtype, tag in ((torch.bfloat16, "@DECODE_BF16@"), (torch.float16, "@DECODE_F16@")):
        ptx = nf4.decode_asm(dtype, pairs=True).replace("$", "%")
        text = text.replace(tag, "\n".join(json.dumps(line + "\n") for line in ptx.splitlines()))
    return text


def _entry(depth: int, lut: bool) -> str:
    return f"nf4_mma_launch_d{int(depth)}_l{int(lut)}"  # one symbol per build: several may share a process


def build(depth: int | None = None, lut: bool | None = None):
    """The compiled extension (cached by torch under a name that hashes the source), or raises."""
    return _build(DEPTH if depth is None else int(depth), LUT if lut is None else bool(lut))


@functools.lru_cache(maxsize=None)
def _build(depth: int, lut: bool):
    from torch.utils.cpp_extension import load_inline

    src = source(depth, lut)
    binding = _BINDING.replace("@ENTRY@", _entry(depth, lut))
    name = "llmbatch_nf4_mma_" + hashlib.sha256((src + binding).encode()).hexdigest()[:12]
    return load_inline(name=name, cpp_sources=[binding], cuda_sources=[src], extra_cuda_cflags=["-O3", "-lineinfo"],
                       verbose=False)


def prebuild(options: list[tuple[int, bool]]) -> None:
    """Compile several (depth, lut) variants at once, one process each (nvcc runs one file at a time), into
    torch's cache; build() loads each from there at first use."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(len(options), mp_context=multiprocessing.get_context("spawn")) as ex:
        list(ex.map(_build_only, options))


def _build_only(option: tuple[int, bool]) -> None:
    build(*option)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the extension builds here (logged once when it does not); False without a GPU."""
    if not torch.cuda.is_available():
        return False
    try:
        build()
        return True
    except Exception as exc:  # no nvcc, no ninja, an unsupported GPU: nf4.py falls back
        log.warning("NF4 CUDA kernel unavailable (%s: %s); using the Triton kernel or bitsandbytes",
                    type(exc).__name__, str(exc).splitlines()[-1][:300] if str(exc) else "")
        return False


def warps_for(N: int, K: int) -> int | None:
    """Warps a block splits K into (so chunks of K summed in a fixed order): fixed by (N, K), never by M.

    Enough warps for one row to keep the GPU busy: N / 16 feature tiles x warps >= 2048 (about 16 warps on
    each of 132 SMs), each warp's chunk whole supersteps. None where the kernel does not apply."""
    if N % 16 or K % SUPERSTEP:
        return None
    warps = 1
    while (N // 16) * warps < 2048 and warps < 8 and (K // (2 * warps)) % SUPERSTEP == 0:
        warps *= 2
    return warps


def tiles(M: int, N: int) -> tuple[int, int]:
    """(feature tiles of 16, row tiles of 8) a block covers: a performance choice only (the bits do not
    depend on it). Wider feature tiles reuse each activation load; more than 4 row tiles run out of
    registers (255 at 8, spilling). Few features (N < 4096: k/v) take small tiles so that the rows give
    the blocks the features do not. H200, benchmarks/nf4.py --mma-variants (RESULTS.md, issue 18): at 33-64
    rows 4 row tiles beat 8 by 4-9% on q/o, gate/up, down; k/v at 32 and 64 rows took 11.6 and 14.3 us with
    (1, 2) against 21.1 and 28.5 with (2, 4) and (2, 8)."""
    mt = 1 if M <= 8 else 2 if M <= 16 else 4
    if N < 4096:
        return 1, min(mt, 2)
    return (2 if mt >= 4 and N % 32 == 0 else 1), mt


def supported(weight: torch.Tensor, qs, x: torch.Tensor) -> bool:
    """Whether this kernel takes the product (bitsandbytes' NF4 storage on CUDA, whole supersteps)."""
    if x.device.type != "cuda" or not nf4.storage_ok(weight, qs, x):
        return False
    if not qs.nested and qs.absmax.dtype != torch.float32:
        return False
    if weight.data_ptr() % 16 or qs.absmax.data_ptr() % 16:  # 8-byte weight, 4- and 16-byte absmax loads
        return False
    return warps_for(*qs.shape) is not None


@functools.lru_cache(maxsize=None)
def pairs(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256] int32: byte b -> the NF4 values of its high and low nibble in `dtype`, as one register (the high
    nibble's, element 2j, in the low half): what decode_asm(dtype, pairs=True) computes, as a table."""
    bits = torch.tensor(nf4.NF4, dtype=torch.float32).to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    b = torch.arange(256)
    word = bits[b >> 4] | (bits[b & 15] << 16)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32).to(device)


def offset(qs) -> float:
    """Double quantization's offset as a Python float, read once per weight (a read is a device sync,
    which a CUDA graph capture forbids): nf4.use reads it for every module before any capture."""
    cached = getattr(qs, "_llmbatch_offset", None)
    if cached is None:
        cached = float(qs.offset) if qs.nested else 0.0
        qs._llmbatch_offset = cached
    return cached


def matmul(x: torch.Tensor, weight: torch.Tensor, qs, bias: torch.Tensor | None = None,
           nt: int | None = None, mt: int | None = None, warps: int | None = None,
           depth: int | None = None, lut: bool | None = None, persist: bool | None = None) -> torch.Tensor:
    """x [..., K] (bf16/fp16, CUDA) @ dequant(weight, qs)^T + bias -> [..., N].

    nt/mt/warps: benchmarks force them (warps changes the reduction, so the bits; nt and mt do not)."""
    N, K = qs.shape
    plan = warps_for(N, K)
    if x.shape[-1] != K or plan is None:
        raise ValueError(f"nf4_mma: x [..., {x.shape[-1]}] against an NF4 weight [{N}, {K}] (N % 16, K % 256 needed)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1 or x2.stride(0) % 8:  # rows start on 16 bytes: the kernel's 8-byte loads
        x2 = x2.contiguous()
    if x2.data_ptr() % 16:
        x2 = x2.clone()
    auto_nt, auto_mt = tiles(x2.shape[0], N)
    nt, mt = nt or auto_nt, mt or auto_mt
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    nested = bool(qs.nested)
    persist = PERSIST if persist is None else persist
    y = build(depth, lut).mm(x2, weight, qs.absmax, qs.state2.absmax if nested else None,
                             qs.state2.code if nested else None, offset(qs), pairs(x.dtype, x.device), bias, N,
                             warps or plan, nt, mt, bool(persist))
    return y.reshape(*lead, N)
