"""Our NF4 matmul (worker/engine/nf4.py): the Triton kernel under Triton's interpreter against
bitsandbytes' dequantize_4bit + matmul, its batch invariance, its plan, and the module switch."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from llmbatch.worker.engine import nf4, nf4_mma
from llmbatch.worker.engine.config import EngineConfig

bnb = pytest.importorskip("bitsandbytes")

KERNEL_CHECK = r"""
import torch
import bitsandbytes.functional as bf
from llmbatch.worker.engine import nf4

torch.manual_seed(0)
HALF_ULP = 2.0 ** -8  # half a bf16 ulp, relative


def quantized(N, K, nested, bias):
    w = torch.randn(N, K) * 0.02
    packed, qs = bf.quantize_4bit(w.to(torch.bfloat16), blocksize=64, quant_type="nf4", compress_statistics=nested)
    assert (qs.absmax.dtype == torch.uint8) == nested
    b = torch.randn(N).to(torch.bfloat16) if bias else None
    return packed, qs, b, torch.randn(128, K).to(torch.bfloat16)


def rows_keep_their_bits(x, packed, qs, b, plan, full, tag):
    # Batch invariance: a row's bits at M = 1 and 37 (odd), split over programs or not, equal M = 128's.
    for M in (1, 37):
        for split in (False, True):
            y = nf4.matmul(x[:M], packed, qs, b, plan=plan, split=split)
            assert torch.equal(y, full[:M]), (*tag, M, split)
    perm = torch.randperm(37)
    assert torch.equal(nf4.matmul(x[perm], packed, qs, b, plan=plan), full[perm])  # other order, same bits


def check(N, K, nested, plan, bias):
    packed, qs, b, x = quantized(N, K, nested, bias)
    wq = bf.dequantize_4bit(packed, qs)  # bitsandbytes' own bf16 weights: the reference
    ref = x.float() @ wq.float().t() + (b.float() if bias else 0)  # exact-ish: float32 sums of exact products
    full = nf4.matmul(x, packed, qs, b, plan=plan, split=False)  # all chunks in one program
    err = (full.float() - ref).abs()
    assert (err <= ref.abs() * HALF_ULP + 1e-6).all(), (N, K, nested, (err / ref.abs()).max())
    # bitsandbytes' own product (dequantize_4bit + F.linear in bf16) is no closer than that
    assert (nf4.reference(x, packed, qs, b).float() - ref).abs().max() >= err.max() * 0.5
    rows_keep_their_bits(x, packed, qs, b, plan, full, (N, K, nested))
    return err.max().item()


# K = 320 in 128-wide steps and chunks: K not a multiple of the tile (the last chunk is half a step);
# three and four chunks, so their order of summation shows; double quantization on and off; a bias.
# The exact plans (post=False): bitsandbytes' own bf16 weights, so within half an ulp of their product.
print(check(128, 320, False, nf4.Plan(bn=64, bk=128, chunks=3, chunk=128, post=False), bias=True))
print(check(64, 512, True, nf4.Plan(bn=64, bk=128, chunks=4, chunk=128, post=False), bias=False))
print(check(64, 320, True, nf4.Plan(bn=64, bk=128, chunks=3, chunk=128, two=True, post=False), bias=True))  # 2-D


def check_post(N, K, nested, plan, bias):
    # The default plan: table values in bf16, absmax after the MMA. Against the float32 weights
    # (code * absmax, unrounded) it must be about as close as bitsandbytes' bf16 weights are, and keep
    # a row's bits at any M, split or not, in any order.
    packed, qs, b, x = quantized(N, K, nested, bias)
    ref = x.double() @ nf4.float32_weights(packed, qs).double().t() + (b.double() if bias else 0)
    full = nf4.matmul(x, packed, qs, b, plan=plan, split=False)
    ours = (full.double() - ref).norm() / ref.norm()
    theirs = (nf4.reference(x, packed, qs, b).double() - ref).norm() / ref.norm()
    assert ours <= 1.5 * theirs and ours < 4e-3, (N, K, nested, float(ours), float(theirs))
    rows_keep_their_bits(x, packed, qs, b, plan, full, (N, K, nested))
    return float(ours), float(theirs)


assert nf4.plan_for(128, 320).post  # the default
print(check_post(128, 320, False, nf4.Plan(bn=64, bk=128, chunks=3, chunk=128), bias=True))  # ragged: half a step
print(check_post(64, 512, True, nf4.Plan(bn=64, bk=128, chunks=4, chunk=128), bias=False))
"""


MODULE_CHECK = r"""
import bitsandbytes as bnb
from llmbatch.worker.engine.loading import keep_standard_layout

model = torch.nn.Sequential(bnb.nn.Linear4bit(256, 128, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4"),
                            torch.nn.ReLU(),
                            bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"))
model = model.to("cpu").eval()
keep_standard_layout(model)  # as the engine's loader: no AVX512 repacking of the weights at the first forward
x = torch.randn(2, 5, 256).to(torch.bfloat16)  # [B, T, in], as the runner calls the projections
with torch.no_grad():
    ours = model[0](x)  # still bitsandbytes
    assert nf4.use(model, "triton") == 2
    seen = []
    model[2].register_forward_hook(lambda m, a, out: seen.append(out.shape))  # as lora.py's hooks
    got = model(x)
    assert seen == [torch.Size([2, 5, 64])]
    first = model[0](x)
    qs = model[0].weight.quant_state
    assert torch.equal(first, nf4.matmul(x, model[0].weight, qs, model[0].bias))  # it ran our kernel
    err = (first.float() - ours.float()).abs().max().item()
    assert err <= ours.float().abs().max().item() * 2 ** -7, err  # within bf16 rounding of bitsandbytes
    assert got.shape == (2, 5, 64)
    # auto: ours at 2-64 rows, bitsandbytes' own forward at 1 row (its GEMV was faster there)
    assert nf4.use(model, "auto") == 2
    assert torch.equal(model[0](x), first)  # 10 rows: ours
    one = x[:1, :1]
    assert torch.equal(model[0](one), type(model[0]).__mro__[1].forward(model[0], one))
    assert not torch.equal(model[0](one), nf4.matmul(one, model[0].weight, qs, model[0].bias))  # it was not ours
print("ok")
"""


def test_kernel_matches_bitsandbytes_is_batch_invariant_and_serves_the_modules():
    """One interpreter process (its imports are most of the time): the kernel, then the modules."""
    pytest.importorskip("triton", reason="the dev extras install triton; the kernel is checked under its interpreter")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", KERNEL_CHECK + MODULE_CHECK], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def _layer(n_in=128, n_out=64):
    lin = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    return lin.to("cpu").eval()


def test_switching_kernels_keeps_the_module_and_restores_bitsandbytes():
    model = torch.nn.Sequential(_layer(), torch.nn.ReLU(), _layer(64, 32))
    base = type(model[0])
    assert nf4.use(model, "triton") == 2
    assert isinstance(model[0], bnb.nn.Linear4bit) and type(model[0]) is not base  # peft still sees a Linear4bit
    assert nf4.use(model, "triton") == 2 and type(model[0]).__mro__[1] is base  # idempotent: no subclass of ours
    x = torch.randn(3, 128).to(torch.bfloat16)
    with torch.no_grad():
        on_cpu = model(x)  # no CUDA, no interpreter: bitsandbytes' own forward
    assert nf4.use(model, "bnb") == 0 and type(model[0]) is base
    with torch.no_grad():
        assert torch.equal(model(x), on_cpu)
    with pytest.raises(ValueError, match="unknown NF4 kernel 'cutlass'"):
        nf4.use(model, "cutlass")


def _emulate_ptx(asm: str, word: int) -> list[int]:
    """The four output registers of decode_asm on one input word, instruction by instruction (prmt in its
    default and sign-replicate modes, lop3 by its truth table)."""
    import re

    def prmt(a, b, c):
        src, out = a | (b << 32), 0
        for i in range(4):
            sel = (c >> (4 * i)) & 15
            byte = (src >> (8 * (sel & 7))) & 0xFF
            out |= ((0xFF if byte & 0x80 else 0) if sel & 8 else byte) << (8 * i)
        return out

    def lop3(a, b, c, lut):
        return sum(((lut >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1))) & 1) << i
                   for i in range(32))

    regs = {"$4": word}
    val = lambda t: regs[t] if t in regs else int(t, 0)  # noqa: E731
    for ins in re.split(r";\s*", asm):
        ins = ins.strip().strip("{}").strip()
        if not ins or ins.startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        a = [t.strip() for t in rest.split(",")]
        regs[a[0]] = {"shl.b32": lambda: (val(a[1]) << val(a[2])) & 0xFFFFFFFF,
                      "shr.b32": lambda: val(a[1]) >> val(a[2]),
                      "and.b32": lambda: val(a[1]) & val(a[2]),
                      "prmt.b32": lambda: prmt(val(a[1]), val(a[2]), val(a[3])),
                      "lop3.b32": lambda: lop3(val(a[1]), val(a[2]), val(a[3]), val(a[4]))}[op]()
    return [regs[f"${i}"] for i in range(4)]


@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_asm_gives_the_table_for_every_byte_in_every_position(dtype, pairs):
    """The GPU's register lookup (no interpreter runs PTX), emulated: bytes 0..255 in each of the 4 positions."""
    import bitsandbytes.functional as bf

    assert torch.equal(torch.tensor(nf4.NF4), bf.get_4bit_type("nf4", device="cpu"))  # what quant_state.code holds
    bits = [int(v) & 0xFFFF for v in torch.tensor(nf4.NF4).to(dtype).view(torch.int16)]
    asm = nf4.decode_asm(dtype, pairs)
    for pos in range(4):
        for byte in range(256):
            word = (byte << (8 * pos)) | (0x5A << (8 * ((pos + 1) % 4)))  # a neighbour byte, to catch mixing
            got = _emulate_ptx(asm, word)
            bs = [(word >> (8 * j)) & 0xFF for j in range(4)]
            even, odd = [bits[b >> 4] for b in bs], [bits[b & 15] for b in bs]  # high nibble: element 2j
            if pairs:  # nf4_mma.cu's MMA registers: byte j's two values, element 2j in the low half
                assert got == [even[j] | odd[j] << 16 for j in range(4)], (pos, byte)
            else:
                assert got == [even[0] | even[1] << 16, even[2] | even[3] << 16, odd[0] | odd[1] << 16,
                               odd[2] | odd[3] << 16], (pos, byte)


def test_plan_depends_on_the_shape_only():
    # Llama-3.1-8B's projections: K cut into a fixed number of chunks, whole 64-element absmax blocks each.
    for N, K in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
        plan = nf4.plan_for(N, K)
        assert N % plan.bn == 0 and plan.chunk * plan.chunks == K and plan.chunk % 64 == 0
        assert (N // plan.bn) * plan.chunks >= 132  # enough programs for one row to fill the GPU
    assert nf4.plan_for(4096, 4096) == nf4.plan_for(4096, 4096, sms=132)
    assert nf4.plan_for(100, 4096) is None and nf4.plan_for(4096, 100) is None  # bitsandbytes takes those
    plan = nf4.plan_for(4096, 4096)
    assert nf4.split_launch(1, 4096, 4096, plan) and not nf4.split_launch(512, 4096, 4096, plan)
    assert [nf4.rows_tile(m) for m in (1, 16, 17, 33, 65, 512)] == [16, 16, 32, 64, 128, 128]


def test_supported_only_where_the_kernel_applies(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lin = _layer()
    qs = lin.weight.quant_state
    x = torch.randn(2, 128).to(torch.bfloat16)
    assert not nf4.supported(lin.weight, qs, x)  # a CPU tensor: bitsandbytes
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if nf4.triton is not None:
        assert nf4.supported(lin.weight, qs, x)
    assert not nf4.supported(lin.weight, qs, x.float())  # float32 compute stays exact through bitsandbytes
    assert not nf4.supported(lin.weight, qs, torch.randn(2, 64).to(torch.bfloat16))  # wrong K
    assert not nf4.supported(lin.weight, None, x)


def test_config_reads_the_kernel_from_the_environment(monkeypatch):
    monkeypatch.setenv("LLMBATCH_NF4_KERNEL", "bnb")
    assert EngineConfig(model="m").nf4_kernel == "bnb"
    monkeypatch.delenv("LLMBATCH_NF4_KERNEL")
    assert EngineConfig(model="m").nf4_kernel == "auto"  # ours at 2-64 rows on CUDA (measured: RESULTS.md)
    assert nf4.check("triton") == "triton" and nf4.check("auto") == "auto"
    with pytest.raises(ValueError, match="unknown NF4 kernel 'fast'"):
        nf4.check("fast")


def test_auto_falls_back_to_bitsandbytes_when_ours_fails_but_triton_does_not(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # supported() then takes CPU tensors; matmul itself is stubbed
    if nf4.triton is None:
        pytest.skip("the dev extras install triton")
    monkeypatch.setattr(nf4, "_FAILED", set())

    def broken(*a, **k):
        raise RuntimeError("ptxas: unsupported instruction")  # as a GPU the inline PTX does not build on

    monkeypatch.setattr(nf4, "matmul", broken)
    model = torch.nn.Sequential(_layer())
    x = torch.randn(4, 128).to(torch.bfloat16)
    with torch.no_grad():
        # bitsandbytes, on a copy: its first CPU forward may repack the weight for AVX-512, which ours declines
        want = copy.deepcopy(model)[0](x)
        nf4.use(model, "triton")
        with pytest.raises(RuntimeError, match="ptxas"):
            model[0](x)  # named explicitly: the error shows
        nf4.use(model, "auto")
        assert torch.equal(model[0](x), want) and nf4._FAILED == {"triton"}  # auto keeps serving, via bitsandbytes
        assert torch.equal(model[0](x), want)


def test_auto_routes_rows_to_cuda_then_triton_then_bitsandbytes(monkeypatch):
    monkeypatch.setattr(nf4, "_FAILED", set())
    monkeypatch.setattr(nf4_mma, "available", lambda: True)
    assert [nf4.route("auto", m) for m in (1, 32, 33, 64, 65)] == ["cuda", "cuda", "cuda", "cuda", "bnb"]
    assert nf4.route("cuda", 512) == "cuda" and nf4.route("triton", 1) == "triton" and nf4.route("bnb", 8) == "bnb"
    nf4._FAILED.add("cuda")  # failed to build or launch here: auto passes it over
    assert [nf4.route("auto", m) for m in (1, 8, 65)] == ["bnb", "triton", "bnb"]
    monkeypatch.setattr(nf4, "_FAILED", set())
    monkeypatch.setattr(nf4_mma, "available", lambda: False)  # no nvcc, no GPU
    assert [nf4.route("auto", m) for m in (1, 8)] == ["bnb", "triton"]


def test_cuda_kernel_named_without_a_build_is_an_error_and_auto_is_not():
    model = torch.nn.Sequential(_layer())
    assert not nf4_mma.available()  # CI has no GPU
    with pytest.raises(RuntimeError, match="LLMBATCH_NF4_KERNEL=cuda"):
        nf4.use(model, "cuda")
    assert nf4.use(model, "auto") == 1
    x = torch.randn(3, 128).to(torch.bfloat16)
    with torch.no_grad():
        assert not nf4_mma.supported(model[0].weight, model[0].weight.quant_state, x)  # CPU tensors
        assert model[0](x).shape == (3, 64)  # bitsandbytes serves


def test_cuda_kernel_plan_depends_on_the_shape_only_and_its_source_is_complete():
    # Llama-3.1-8B's projections: K split into equal whole supersteps, enough warps for one row.
    for N, K in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
        warps = nf4_mma.warps_for(N, K)
        assert warps in (1, 2, 4, 8) and (K // warps) % nf4_mma.SUPERSTEP == 0
        assert (N // 16) * warps >= 512
    assert nf4_mma.warps_for(4096, 4160) is None and nf4_mma.warps_for(4104, 4096) is None
    assert [nf4_mma.tiles(m, 4096) for m in (1, 8, 9, 16, 17, 32, 33, 64, 512)] == \
        [(1, 1), (1, 1), (1, 2), (1, 2), (2, 4), (2, 4), (2, 4), (2, 4), (2, 4)]
    assert [nf4_mma.tiles(m, 1024) for m in (1, 16, 32, 64)] == [(1, 1), (1, 2), (1, 2), (1, 2)]
    for depth, lut in ((1, False), (2, True)):
        src = nf4_mma.source(depth, lut)
        assert not any(f"@{tag}@" in src for tag in ("DECODE_BF16", "DECODE_F16", "DEPTH", "LUT", "ENTRY"))
        assert src.count("prmt.b32") == 2 * 2 * 7  # both dtypes' register tables, filled in
        assert f"#define NF4_DEPTH {depth} " in src and f"#define NF4_LUT {int(lut)}\n" in src


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernel_pair_table_is_what_the_register_decode_gives(dtype):
    """NF4_LUT's shared-memory table, entry by entry, against decode_asm(pairs=True) emulated."""
    table = nf4_mma.pairs(dtype, torch.device("cpu")).tolist()
    asm = nf4.decode_asm(dtype, pairs=True)
    for byte in range(256):
        assert _emulate_ptx(asm, byte | 0x5A5A5A00)[0] == table[byte] & 0xFFFFFFFF, byte
