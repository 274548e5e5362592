// Device helpers shared by the forward and backward scan kernels.
//
// Only plain CUDA: warp shuffles and __syncthreads, no CUB, so the sources build
// with CUDA 12.x and 13.x alike.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "scan_params.h"

namespace gmscan {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <int BYTES> struct VecOf;
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<16> { using type = uint4; };

// Load the ITEMS consecutive elements row[t0 .. t0+ITEMS) as floats; positions at or
// past `valid` read as 0. Whole, aligned groups use 8- or 16-byte loads.
template <typename T, int ITEMS>
__device__ __forceinline__ void load_items(const T* __restrict__ row, int t0, int valid,
                                           float (&v)[ITEMS]) {
  constexpr int kBytes = ITEMS * int(sizeof(T));
  constexpr int kVec = kBytes >= 16 ? 16 : kBytes;
  static_assert(kBytes % kVec == 0 && (kVec == 8 || kVec == 16), "unsupported vector width");
  using V = typename VecOf<kVec>::type;
  const T* p = row + t0;
  if (t0 + ITEMS <= valid && (reinterpret_cast<uintptr_t>(p) % kVec) == 0) {
    alignas(16) T tmp[ITEMS];
    const V* src = reinterpret_cast<const V*>(p);
    V* dst = reinterpret_cast<V*>(tmp);
#pragma unroll
    for (int k = 0; k < kBytes / kVec; ++k) dst[k] = __ldg(src + k);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) v[i] = to_float(tmp[i]);
  } else {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) v[i] = (t0 + i < valid) ? to_float(p[i]) : 0.f;
  }
}

// Store v[0 .. ITEMS) to row[t0 ..), skipping positions at or past `valid`.
template <typename T, int ITEMS>
__device__ __forceinline__ void store_items(T* __restrict__ row, int t0, int valid,
                                            const float (&v)[ITEMS]) {
  constexpr int kBytes = ITEMS * int(sizeof(T));
  constexpr int kVec = kBytes >= 16 ? 16 : kBytes;
  using V = typename VecOf<kVec>::type;
  T* p = row + t0;
  if (t0 + ITEMS <= valid && (reinterpret_cast<uintptr_t>(p) % kVec) == 0) {
    alignas(16) T tmp[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) tmp[i] = from_float<T>(v[i]);
    const V* src = reinterpret_cast<const V*>(tmp);
    V* dst = reinterpret_cast<V*>(p);
#pragma unroll
    for (int k = 0; k < kBytes / kVec; ++k) dst[k] = src[k];
  } else {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
      if (t0 + i < valid) p[i] = from_float<T>(v[i]);
  }
}

// softplus as torch computes it (threshold 20)
__device__ __forceinline__ float softplus_f(float x) { return x > 20.f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

// Steps are affine maps h -> a*h + b. Inclusive scan over the lanes of a warp,
// left to right: afterwards lane i holds the composition of lanes 0..i.
__device__ __forceinline__ void warp_scan_fwd(float& a, float& b, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float pa = __shfl_up_sync(kFullMask, a, off);
    const float pb = __shfl_up_sync(kFullMask, b, off);
    if (lane >= off) {
      b = fmaf(a, pb, b);  // apply the earlier map first, then ours
      a = a * pa;
    }
  }
}

// The mirror image for the adjoint: maps g_right -> b + a*g_right composed right to
// left; afterwards lane i holds the composition of lanes i..31.
__device__ __forceinline__ void warp_scan_rev(float& a, float& b, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float na = __shfl_down_sync(kFullMask, a, off);
    const float nb = __shfl_down_sync(kFullMask, b, off);
    if (lane + off < 32) {
      b = fmaf(a, nb, b);
      a = a * na;
    }
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

}  // namespace gmscan
