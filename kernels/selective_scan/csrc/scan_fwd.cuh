// Forward selective scan.
//
// A row (one batch, one channel) belongs to one warp (kRowWarps = 1, short rows;
// kFwdWarps rows per block) or to the whole block (kRowWarps = kFwdWarps, long rows).
// The row is walked in chunks of 32 * kRowWarps * ITEMS steps, each thread owning
// ITEMS consecutive steps. Per state n a thread composes its steps into one affine
// map; a warp scan of the maps (plus, across the warps of a row, a pass over their
// totals in shared memory) gives every thread the state entering its steps, and the
// state leaving the chunk is carried to the next chunk (state n's carry lives in lane
// n of every warp, or in every lane when N == 1).
#pragma once

#include "scan_common.cuh"

namespace gmscan {

template <typename T, int ITEMS, bool kSingleState, int kRowWarps>
__global__ void __launch_bounds__(kFwdWarps * 32) scan_fwd_kernel(const ScanParams p) {
  static_assert(kRowWarps == 1 || kRowWarps == kFwdWarps, "a row spans one warp or the block");
  constexpr int kChunk = 32 * kRowWarps * ITEMS;
  __shared__ float2 totals[2][kFwdWarps];  // each warp's composed map, by step parity
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int sub = kRowWarps == 1 ? 0 : warp;  // warp index inside the row
  const int64_t row = kRowWarps == 1 ? int64_t(blockIdx.x) * kFwdWarps + warp  // b * dim + d
                                     : int64_t(blockIdx.x);
  // leaves as a whole warp (one-warp rows) or a whole block (block rows)
  if (row >= int64_t(p.batch) * p.dim) return;
  const int L = p.len;
  const int N = kSingleState ? 1 : p.nstate;
  const int d = int(row % p.dim);
  const int64_t b = row / p.dim;
  const int grp = d / p.per_group;

  const T* u = static_cast<const T*>(p.u) + row * L;
  const T* delta = static_cast<const T*>(p.delta) + row * L;
  float* out = static_cast<float*>(p.out) + row * L;  // y is float32 whatever T is
  const int64_t bc_base = (b * p.groups + grp) * int64_t(p.nstate) * L;
  const T* Bg = static_cast<const T*>(p.B) + bc_base;
  const T* Cg = static_cast<const T*>(p.C) + bc_base;
  const float* A = p.A + int64_t(d) * p.nstate;
  const float bias = p.has_bias ? p.delta_bias[d] : 0.f;
  const float skip = p.has_d ? p.D[d] : 0.f;

  float carry = 0.f;  // state n's carry, held by lane n (by every lane when N == 1)
  int parity = 0;

  for (int c0 = 0; c0 < L; c0 += kChunk) {
    const int t0 = c0 + (sub * 32 + lane) * ITEMS;
    float uv[ITEMS], dt[ITEMS], y[ITEMS];
    load_items<T, ITEMS>(u, t0, L, uv);
    load_items<T, ITEMS>(delta, t0, L, dt);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      float x = dt[i] + bias;
      if (p.softplus) x = softplus_f(x);
      dt[i] = (t0 + i < L) ? x : 0.f;  // padding steps are identity maps
      y[i] = skip * uv[i];
    }
    for (int n = 0; n < N; ++n) {
      const float an = A[n];
      float bv[ITEMS], cv[ITEMS], decay[ITEMS];
      load_items<T, ITEMS>(Bg + int64_t(n) * L, t0, L, bv);
      load_items<T, ITEMS>(Cg + int64_t(n) * L, t0, L, cv);
      float la = 1.f, lb = 0.f;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        decay[i] = expf(dt[i] * an);
        bv[i] = dt[i] * bv[i] * uv[i];  // now the drive of step i
        lb = fmaf(decay[i], lb, bv[i]);
        la *= decay[i];
      }
      warp_scan_fwd(la, lb, lane);
      float ea = __shfl_up_sync(kFullMask, la, 1);
      float eb = __shfl_up_sync(kFullMask, lb, 1);
      if (lane == 0) { ea = 1.f; eb = 0.f; }
      const float h_in = kSingleState ? carry : __shfl_sync(kFullMask, carry, n);
      float ta = __shfl_sync(kFullMask, la, 31);  // this warp's total
      float tb = __shfl_sync(kFullMask, lb, 31);
      float wa = 1.f, wb = 0.f;  // composition of the row's earlier warps
      if (kRowWarps > 1) {
        if (lane == 31) totals[parity][warp] = make_float2(la, lb);
        __syncthreads();  // one barrier a step: the two buffers alternate
        ta = 1.f;
        tb = 0.f;
#pragma unroll
        for (int w = 0; w < kRowWarps; ++w) {
          const float2 m = totals[parity][w];
          if (w == sub) { wa = ta; wb = tb; }
          tb = fmaf(m.x, tb, m.y);
          ta *= m.x;
        }
        parity ^= 1;
      }
      float h = fmaf(ea, fmaf(wa, h_in, wb), eb);
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        h = fmaf(decay[i], h, bv[i]);
        y[i] = fmaf(cv[i], h, y[i]);
      }
      const float h_out = fmaf(ta, h_in, tb);
      if (kSingleState || lane == n) carry = h_out;
    }
    store_items<float, ITEMS>(out, t0, L, y);
  }
}

template <typename T, int ITEMS, bool kSingleState, int kRowWarps>
cudaError_t launch_fwd_t(const ScanParams& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.batch) * p.dim;
  const int64_t blocks = kRowWarps == 1 ? (rows + kFwdWarps - 1) / kFwdWarps : rows;
  scan_fwd_kernel<T, ITEMS, kSingleState, kRowWarps><<<unsigned(blocks), kFwdWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int ITEMS, int kRowWarps>
cudaError_t launch_fwd_n(const ScanParams& p, cudaStream_t stream) {
  return p.nstate == 1 ? launch_fwd_t<T, ITEMS, true, kRowWarps>(p, stream)
                       : launch_fwd_t<T, ITEMS, false, kRowWarps>(p, stream);
}

template <typename T>
cudaError_t launch_fwd(const ScanParams& p, cudaStream_t stream) {
  const bool block_rows = p.row_warps == kFwdWarps;
  if (!block_rows && p.row_warps != 1) return cudaErrorInvalidValue;
  switch (p.items) {
    case 4: return block_rows ? launch_fwd_n<T, 4, kFwdWarps>(p, stream) : launch_fwd_n<T, 4, 1>(p, stream);
    case 8: return block_rows ? launch_fwd_n<T, 8, kFwdWarps>(p, stream) : launch_fwd_n<T, 8, 1>(p, stream);
    case 16: return block_rows ? launch_fwd_n<T, 16, kFwdWarps>(p, stream) : launch_fwd_n<T, 16, 1>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace gmscan
