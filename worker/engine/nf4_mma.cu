// Our NF4 matmul for small batches, in CUDA with mma.sync: y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias).
// Built at first use by nf4_mma.py (torch's load_inline), which fills in the @DECODE_*@ PTX from nf4.decode_asm.
//
// It reads bitsandbytes' storage as is: W is the flat [N*K/2] uint8 (element e = n*K + k in byte e/2, the high
// nibble for even e), one absmax per 64 elements (float32, or uint8 with double quantization).
//
// Swap-AB: the m16n8k16 MMA's 16 rows are out features n, its 8 columns are rows of x. An A register holds two
// k-adjacent values of one n, which is exactly one packed byte. The MMA sums over its 16 k in any order, so a
// thread's bytes need not be the k the MMA layout names: within one 64-element absmax block (32 bytes a row),
// thread t (lane % 4) owns bytes [8t, 8t + 8) of rows g and g + 8 (g = lane / 4), one 8-byte load each, and
// step s (0..3) of the block feeds bytes 2s and 2s + 1 as its A registers. The activations follow the same
// permutation: step s's B registers are x[r, 16t + 4s .. +4), one 8-byte load. No shuffles, no shared memory.
// Each block's four MMAs sum into a zeroed float32 tile, which is then scaled by that block's absmax (the
// weights in the MMA are the NF4 table rounded to bf16/fp16, as in nf4.py's post plan).
//
// Batch invariance: a warp sums its K range (a fixed split of K into `warps` equal chunks, chosen by (N, K)
// alone) block by block in order; the block then adds the warps' sums in warp order, from 0.0. An output
// element's MMA depends only on its own row of A and column of B, so neither the rows tile (MT), the features
// tile (NT) nor the batch mates change its bits. Checked on the GPU (benchmarks/nf4.py --kernels-only).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#ifndef NF4_DEPTH
#define NF4_DEPTH @DEPTH@  // supersteps of weights loaded ahead (nf4_mma.DEPTH)
#endif
// NF4_LUT 1: a byte's two values come from a 256-entry table of pairs in shared memory, one copy per lane (so no
// bank conflicts: 32 KB), 3 instructions a byte instead of decode's 5.5. 0: decode (the table in registers).
#ifndef NF4_LUT
#define NF4_LUT @LUT@
#endif

// Internal linkage: builds with other options load into the same process (benchmarks compare them).
namespace {
constexpr int LUT_WORDS = NF4_LUT ? 256 * 32 : 0;

// The two compute dtypes differ only in the register table's bytes, the MMA's type name and the conversions.
#define NF4_OPS(T, TY, DECODE, TO_FLOAT, FROM_FLOAT)                                                            \
  template <> struct Ops<T> {                                                                                   \
    static __device__ __forceinline__ void decode(uint32_t w, uint32_t& p0, uint32_t& p1, uint32_t& p2,         \
                                                  uint32_t& p3) {                                               \
      asm(DECODE : "=r"(p0), "=r"(p1), "=r"(p2), "=r"(p3) : "r"(w));                                           \
    }                                                                                                           \
    static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {         \
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "    \
                   "{%8,%9}, {%0,%1,%2,%3};"                                                                    \
                   : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                             \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                             \
    }                                                                                                           \
    static __device__ __forceinline__ float to_float(T v) { return TO_FLOAT(v); }                               \
    static __device__ __forceinline__ T from_float(float v) { return FROM_FLOAT(v); }                           \
  };
template <typename T> struct Ops;
NF4_OPS(__nv_bfloat16, "bf16", @DECODE_BF16@, __bfloat162float, __float2bfloat16_rn)
NF4_OPS(__half, "f16", @DECODE_F16@, __half2float, __float2half_rn)
#undef NF4_OPS

// Weights are read once: keep them out of L1, and fetch whole 128-byte lines into L2 (a row's superstep).
__device__ __forceinline__ uint2 load_w(const uint8_t* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

template <int NT, int MT>
__device__ __forceinline__ void zero(float (&a)[NT][MT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) a[nt][mt][i] = 0.f;
}

// The thread's weight bytes of the superstep at k: rows g and g + 8 of each feature tile, 4 blocks each.
template <int NT>
__device__ __forceinline__ void load_superstep(uint2 (&q)[NT][2][4], const uint8_t* const (&wr)[NT][2], int k) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < 4; ++j) q[nt][h][j] = load_w(wr[nt][h] + (k / 64 + j) * 32);
}

// A superstep is 256 k: 4 absmax blocks, 128 bytes of each weight row. A block takes feature tiles blockIdx.x,
// blockIdx.x + gridDim.x, ... (the launch may size the grid to one wave).
template <typename T, int NT, int MT>
__global__ void __launch_bounds__(256) nf4_mma_kernel(
    const T* __restrict__ x, int64_t sx, const uint8_t* __restrict__ w, const uint8_t* __restrict__ aq,
    const float* __restrict__ af, const float* __restrict__ a2, const float* __restrict__ code2, float offset,
    const uint32_t* __restrict__ pairs, const T* __restrict__ bias, T* __restrict__ y, int64_t sy, int M, int K,
    int chunk, int tiles) {
  extern __shared__ float smem[];  // the pair table (NF4_LUT), then [warps][NT * MT * 4][32]: each warp's chunk sums
  float* red = smem + LUT_WORDS;
  __shared__ float code2_s[256];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const bool nested = aq != nullptr;
  if (nested)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code2_s[i] = code2[i];
#if NF4_LUT
  uint32_t* lut = reinterpret_cast<uint32_t*>(smem);
  for (int i = threadIdx.x; i < LUT_WORDS; i += blockDim.x) lut[i] = __ldg(pairs + (i >> 5));
  const uint32_t* my_lut = lut + lane;  // entry b of this lane's copy: my_lut[32 * b]
#endif
  __syncthreads();

  const int64_t KH = K / 2, KB = K / 64;
  const int r0 = blockIdx.y * 8 * MT;
  const int k_lo = warp * chunk, k_hi = k_lo + chunk;
  const T* xr[MT];
  bool rok[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int r = r0 + mt * 8 + g;
    rok[mt] = r < M;
    xr[mt] = x + (rok[mt] ? r : 0) * sx + t * 16;
  }

  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
  const int n0 = tile * 16 * NT;
  const uint8_t* wr[NT][2];
  int64_t ab[NT][2];  // absmax index of the row's first block
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n = n0 + nt * 16 + g + 8 * h;
      wr[nt][h] = w + n * KH + t * 8;
      ab[nt][h] = n * KB;
    }
  float acc[NT][MT][4];
  zero(acc);

  // NF4_DEPTH supersteps of weight bytes are in flight while one multiplies: q[0] is this superstep's,
  // q[d] the one d ahead (clamped to the chunk's last: in bounds, unused).
  uint2 q[NF4_DEPTH + 1][NT][2][4];
#pragma unroll
  for (int d = 0; d < NF4_DEPTH; ++d) load_superstep(q[d], wr, min(k_lo + 256 * d, k_hi - 256));

  for (int k = k_lo; k < k_hi; k += 256) {
    const int b0 = k / 64;
    load_superstep(q[NF4_DEPTH], wr, min(k + 256 * NF4_DEPTH, k_hi - 256));

    float am[NT][2][4];  // absmax of the 4 blocks, as bitsandbytes decodes it
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t i = ab[nt][h] + b0;
        if (nested) {
          const uint32_t q = __ldg(reinterpret_cast<const uint32_t*>(aq + i));
          const float s2 = __ldg(a2 + (i >> 8));  // 256 blocks a nested absmax; i is a multiple of 4
#pragma unroll
          for (int j = 0; j < 4; ++j)  // two roundings, as dequantize_blockwise then +=
            am[nt][h][j] = __fadd_rn(__fmul_rn(code2_s[(q >> (8 * j)) & 255], s2), offset);
        } else {
          const float4 v = __ldg(reinterpret_cast<const float4*>(af + i));
          am[nt][h][0] = v.x, am[nt][h][1] = v.y, am[nt][h][2] = v.z, am[nt][h][3] = v.w;
        }
      }

#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t pr[NT][2][8];  // byte i of the thread's 8 -> (high-nibble value, low-nibble value)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#if NF4_LUT
#pragma unroll
          for (int b = 0; b < 8; ++b)
            pr[nt][h][b] = my_lut[32 * __byte_perm(b < 4 ? q[0][nt][h][j].x : q[0][nt][h][j].y, 0, 0x4440 | (b & 3))];
#else
          Ops<T>::decode(q[0][nt][h][j].x, pr[nt][h][0], pr[nt][h][1], pr[nt][h][2], pr[nt][h][3]);
          Ops<T>::decode(q[0][nt][h][j].y, pr[nt][h][4], pr[nt][h][5], pr[nt][h][6], pr[nt][h][7]);
#endif
        }
      float part[NT][MT][4];
      zero(part);
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        uint2 xv[MT];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          xv[mt] = rok[mt] ? __ldg(reinterpret_cast<const uint2*>(xr[mt] + k + 64 * j + 4 * s)) : make_uint2(0, 0);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint32_t a[4] = {pr[nt][0][2 * s], pr[nt][1][2 * s], pr[nt][0][2 * s + 1], pr[nt][1][2 * s + 1]};
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) Ops<T>::mma(part[nt][mt], a, xv[mt].x, xv[mt].y);
        }
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          // c0, c1: feature g; c2, c3: feature g + 8
          acc[nt][mt][0] = fmaf(part[nt][mt][0], am[nt][0][j], acc[nt][mt][0]);
          acc[nt][mt][1] = fmaf(part[nt][mt][1], am[nt][0][j], acc[nt][mt][1]);
          acc[nt][mt][2] = fmaf(part[nt][mt][2], am[nt][1][j], acc[nt][mt][2]);
          acc[nt][mt][3] = fmaf(part[nt][mt][3], am[nt][1][j], acc[nt][mt][3]);
        }
    }
#pragma unroll
    for (int d = 0; d < NF4_DEPTH; ++d)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int j = 0; j < 4; ++j) q[d][nt][h][j] = q[d + 1][nt][h][j];
  }

  constexpr int E = NT * MT * 4;
  __syncthreads();  // every warp is done with the last tile's sums
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[(warp * E + (nt * MT + mt) * 4 + i) * 32 + lane] = acc[nt][mt][i];
  __syncthreads();
  for (int e = threadIdx.x; e < E * 32; e += blockDim.x) {
    float total = 0.f;
    for (int v = 0; v < warps; ++v) total += red[v * E * 32 + e];  // chunk sums in chunk order, from 0.0
    const int ln = e & 31, i = (e >> 5) & 3, mt = (e >> 7) % MT, nt = (e >> 7) / MT;
    const int n = n0 + nt * 16 + (ln >> 2) + 8 * (i >> 1);
    const int r = r0 + mt * 8 + 2 * (ln & 3) + (i & 1);
    if (r < M) {
      if (bias != nullptr) total += Ops<T>::to_float(bias[n]);
      y[r * sy + n] = Ops<T>::from_float(total);
    }
  }
  }  // tiles
}

template <typename T, int NT, int MT>
static int launch_one(const void* x, int64_t sx, const void* w, const void* aq, const void* af, const void* a2,
                      const void* code2, float offset, const void* pairs, const void* bias, void* y, int64_t sy, int M,
                      int N, int K, int warps, int persist, cudaStream_t stream) {
  auto kernel = nf4_mma_kernel<T, NT, MT>;
  const int smem = (LUT_WORDS + warps * NT * MT * 4 * 32) * 4;
  // The dynamic shared memory limit, raised once per instance and always set: dynamic plus static memory can
  // pass 48 KB when the dynamic part alone does not.
  static int raised = -1;
  if (smem > raised) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) return 1;
    raised = smem;
  }
  const int tiles = N / (16 * NT);
  int blocks = tiles;
  if (persist) {  // one wave: as many blocks as fit on the GPU at once, each looping over tiles
    int per_sm = 0, dev = 0, sms = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, warps * 32, smem);
    blocks = min(tiles, max(1, per_sm) * sms);
  }
  dim3 grid(blocks, (M + 8 * MT - 1) / (8 * MT));
  kernel<<<grid, warps * 32, smem, stream>>>(
      static_cast<const T*>(x), sx, static_cast<const uint8_t*>(w), static_cast<const uint8_t*>(aq),
      static_cast<const float*>(af), static_cast<const float*>(a2), static_cast<const float*>(code2), offset,
      static_cast<const uint32_t*>(pairs), static_cast<const T*>(bias), static_cast<T*>(y), sy, M, K, K / warps,
      tiles);
  return cudaGetLastError() == cudaSuccess ? 0 : 2;
}

template <typename T, int NT>
static int launch_rows(int mt, const void* x, int64_t sx, const void* w, const void* aq, const void* af,
                       const void* a2, const void* code2, float offset, const void* pairs, const void* bias, void* y,
                       int64_t sy, int M, int N, int K, int warps, int persist, cudaStream_t stream) {
#define NF4_ROWS(V)                                                                                            \
  case V:                                                                                                      \
    return launch_one<T, NT, V>(x, sx, w, aq, af, a2, code2, offset, pairs, bias, y, sy, M, N, K, warps, persist, \
                                stream);
  switch (mt) { NF4_ROWS(1) NF4_ROWS(2) NF4_ROWS(4) NF4_ROWS(8) }
#undef NF4_ROWS
  return 3;
}

}  // namespace

// Entry point for nf4_mma.py's binding, named per build. half: fp16 (else bf16); nt: 1 or 2 feature tiles of 16;
// mt: 1, 2, 4 or 8 row tiles of 8. aq (nested, uint8) or af (float32) is null. pairs: the 256 byte -> value-pair words (NF4_LUT).
// persist: one wave of blocks. Returns 0, or a code the binding reports.
int @ENTRY@(bool half, int nt, int mt, const void* x, int64_t sx, const void* w, const void* aq,
                   const void* af, const void* a2, const void* code2, float offset, const void* pairs,
                   const void* bias, void* y, int64_t sy, int M, int N, int K, int warps, int persist,
                   cudaStream_t stream) {
  if (half) {
    return nt == 2 ? launch_rows<__half, 2>(mt, x, sx, w, aq, af, a2, code2, offset, pairs, bias, y, sy, M, N, K,
                                            warps, persist, stream)
                   : launch_rows<__half, 1>(mt, x, sx, w, aq, af, a2, code2, offset, pairs, bias, y, sy, M, N, K,
                                            warps, persist, stream);
  }
  return nt == 2 ? launch_rows<__nv_bfloat16, 2>(mt, x, sx, w, aq, af, a2, code2, offset, pairs, bias, y, sy, M, N, K,
                                                 warps, persist, stream)
                 : launch_rows<__nv_bfloat16, 1>(mt, x, sx, w, aq, af, a2, code2, offset, pairs, bias, y, sy, M, N, K,
                                                 warps, persist, stream);
}
