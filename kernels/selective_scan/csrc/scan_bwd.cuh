// Backward selective scan.
//
// A block is kBwdWarps warps = kBwdWarps channels of one (batch, group); each warp
// owns one channel row, walked in chunks of 32 * ITEMS steps as in the forward.
//
// Pass 1 (only when the row spans several chunks) runs the forward recurrence and
// stores the state entering each chunk to a scratch buffer. Pass 2 visits chunks
// last to first: it rebuilds h inside the chunk from the stored state, runs the
// adjoint g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1} as a right-to-left warp scan
// (carried across chunks like the forward state), and forms the gradients. With
// exp(dt_t A) h_{t-1} = h_t - dt_t B_t u_t, no shifted state is needed.
//
// dB and dC are sums over the channels of a group: the block's warps add theirs in
// shared memory, then one float atomicAdd per step goes to the zeroed fp32 output.
// dA, dD and ddelta_bias are warp sums added atomically at the end.
#pragma once

#include "scan_common.cuh"

namespace gmscan {

template <typename T, int ITEMS, bool kSingleState>
__global__ void __launch_bounds__(kBwdWarps * 32) scan_bwd_kernel(const ScanParams p) {
  constexpr int kChunk = 32 * ITEMS;
  constexpr int kPitch = 32 * (ITEMS + 1);  // one padding word per lane: no bank conflicts
  __shared__ float red[2][kBwdWarps][kPitch];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_tiles = (p.per_group + kBwdWarps - 1) / kBwdWarps;
  const int64_t bg = blockIdx.x / n_tiles;  // b * groups + group
  const int tile = blockIdx.x % n_tiles;
  const int64_t b = bg / p.groups;
  const int grp = int(bg % p.groups);
  const int cl = tile * kBwdWarps + warp;
  const bool active = cl < p.per_group;  // idle warps still join the block barriers
  const int d = grp * p.per_group + (active ? cl : 0);
  const int L = p.len;
  const int valid = active ? L : 0;  // idle warps read zeros and write nothing
  const int N = kSingleState ? 1 : p.nstate;
  const int64_t row = b * p.dim + d;

  const T* u = static_cast<const T*>(p.u) + row * L;
  const T* delta = static_cast<const T*>(p.delta) + row * L;
  const float* dout = static_cast<const float*>(p.dout) + row * L;
  T* du = static_cast<T*>(p.du) + row * L;
  T* ddelta = static_cast<T*>(p.ddelta) + row * L;
  const int64_t bc_base = bg * int64_t(p.nstate) * L;
  const T* Bg = static_cast<const T*>(p.B) + bc_base;
  const T* Cg = static_cast<const T*>(p.C) + bc_base;
  const float* A = p.A + int64_t(d) * p.nstate;
  const float bias = p.has_bias ? p.delta_bias[d] : 0.f;
  const float skip = p.has_d ? p.D[d] : 0.f;
  const int n_chunks = p.n_chunks;
  float* state = p.state + row * int64_t(n_chunks) * p.nstate;

  // ---- pass 1: the state entering chunks 1 .. n_chunks-1 ----
  if (n_chunks > 1) {
    float carry = 0.f;  // lane n holds state n
    for (int k = 0; k + 1 < n_chunks; ++k) {
      const int t0 = k * kChunk + lane * ITEMS;
      float uv[ITEMS], dt[ITEMS];
      load_items<T, ITEMS>(u, t0, valid, uv);
      load_items<T, ITEMS>(delta, t0, valid, dt);
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        float x = dt[i] + bias;
        if (p.softplus) x = softplus_f(x);
        dt[i] = (t0 + i < valid) ? x : 0.f;
      }
      for (int n = 0; n < N; ++n) {
        const float an = A[n];
        float bv[ITEMS];
        load_items<T, ITEMS>(Bg + int64_t(n) * L, t0, valid, bv);
        float la = 1.f, lb = 0.f;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          const float dec = expf(dt[i] * an);
          lb = fmaf(dec, lb, dt[i] * bv[i] * uv[i]);
          la *= dec;
        }
        warp_scan_fwd(la, lb, lane);
        const float ta = __shfl_sync(kFullMask, la, 31);
        const float tb = __shfl_sync(kFullMask, lb, 31);
        const float h_in = kSingleState ? carry : __shfl_sync(kFullMask, carry, n);
        const float h_out = fmaf(ta, h_in, tb);
        if (kSingleState || lane == n) carry = h_out;
      }
      if (active && lane < N) state[int64_t(k + 1) * p.nstate + lane] = carry;
    }
    __syncwarp();  // each warp reads back only what its own lanes wrote
  }

  // ---- pass 2: chunks last to first ----
  float g_carry = 0.f;   // lane n: adjoint of state n at the first step of the chunk to the right
  float dA_acc = 0.f;    // lane n: dA[d, n]
  float dD_part = 0.f, dbias_part = 0.f;
  float dt_right = 0.f;  // dt at the first step of the chunk to the right
  for (int k = n_chunks - 1; k >= 0; --k) {
    const int c0 = k * kChunk;
    const int t0 = c0 + lane * ITEMS;
    float uv[ITEMS], xv[ITEMS], dt[ITEMS], dy[ITEMS], ddt[ITEMS], duv[ITEMS];
    load_items<T, ITEMS>(u, t0, valid, uv);
    load_items<T, ITEMS>(delta, t0, valid, xv);
    load_items<float, ITEMS>(dout, t0, valid, dy);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      xv[i] += bias;
      const float x = p.softplus ? softplus_f(xv[i]) : xv[i];
      dt[i] = (t0 + i < valid) ? x : 0.f;
      ddt[i] = 0.f;
      duv[i] = 0.f;
    }
    // state entering this chunk (lane n: state n; every lane when N == 1)
    const int s_lane = kSingleState ? 0 : lane;
    const float h0_lane =
        (active && k > 0 && s_lane < N) ? state[int64_t(k) * p.nstate + s_lane] : 0.f;

    for (int n = 0; n < N; ++n) {
      const float an = A[n];
      float bv[ITEMS], cv[ITEMS], decay[ITEMS], h[ITEMS];
      load_items<T, ITEMS>(Bg + int64_t(n) * L, t0, valid, bv);
      load_items<T, ITEMS>(Cg + int64_t(n) * L, t0, valid, cv);

      // forward states inside the chunk
      float la = 1.f, lb = 0.f;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        decay[i] = expf(dt[i] * an);
        lb = fmaf(decay[i], lb, dt[i] * bv[i] * uv[i]);
        la *= decay[i];
      }
      warp_scan_fwd(la, lb, lane);
      float ea = __shfl_up_sync(kFullMask, la, 1);
      float eb = __shfl_up_sync(kFullMask, lb, 1);
      if (lane == 0) { ea = 1.f; eb = 0.f; }
      const float h0 = kSingleState ? h0_lane : __shfl_sync(kFullMask, h0_lane, n);
      float hh = fmaf(ea, h0, eb);
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        hh = fmaf(decay[i], hh, dt[i] * bv[i] * uv[i]);
        h[i] = hh;
      }

      // decay from step t to t+1 for this lane's last step: the next lane's first
      // decay, or for lane 31 the first decay of the chunk to the right
      float next_first = __shfl_down_sync(kFullMask, decay[0], 1);
      if (lane == 31) next_first = (k + 1 < n_chunks) ? expf(dt_right * an) : 0.f;

      // adjoint: right-to-left composition of g -> C dy + decay_next * g
      float ra = 1.f, rb = 0.f;
#pragma unroll
      for (int i = ITEMS - 1; i >= 0; --i) {
        float dn = (i + 1 < ITEMS) ? decay[i + 1] : next_first;
        dn = (t0 + i + 1 < valid) ? dn : 0.f;
        rb = fmaf(dn, rb, cv[i] * dy[i]);
        ra *= dn;
      }
      warp_scan_rev(ra, rb, lane);
      float xa = __shfl_down_sync(kFullMask, ra, 1);
      float xb = __shfl_down_sync(kFullMask, rb, 1);
      if (lane == 31) { xa = 1.f; xb = 0.f; }
      const float g_right = kSingleState ? g_carry : __shfl_sync(kFullMask, g_carry, n);
      float g = fmaf(xa, g_right, xb);  // adjoint at step t0 + ITEMS

      float dA_part = 0.f;
#pragma unroll
      for (int i = ITEMS - 1; i >= 0; --i) {
        float dn = (i + 1 < ITEMS) ? decay[i + 1] : next_first;
        dn = (t0 + i + 1 < valid) ? dn : 0.f;
        g = fmaf(dn, g, cv[i] * dy[i]);
        const float drive = dt[i] * bv[i] * uv[i];
        const float h_prev_decayed = h[i] - drive;  // exp(dt A) h_{t-1}
        const float g_dt = g * dt[i];
        dA_part = fmaf(g_dt, h_prev_decayed, dA_part);
        ddt[i] = fmaf(g, fmaf(an, h_prev_decayed, bv[i] * uv[i]), ddt[i]);
        duv[i] = fmaf(g_dt, bv[i], duv[i]);
        red[0][warp][lane * (ITEMS + 1) + i] = g_dt * uv[i];  // dB contribution
        red[1][warp][lane * (ITEMS + 1) + i] = dy[i] * h[i];  // dC contribution
      }
      const float g_first = __shfl_sync(kFullMask, g, 0);  // adjoint at the chunk's first step
      if (kSingleState || lane == n) g_carry = g_first;
      dA_part = warp_sum(dA_part);
      if (kSingleState ? lane == 0 : lane == n) dA_acc += dA_part;

      __syncthreads();
      float* dBn = p.dB + (bg * p.nstate + n) * int64_t(L);
      float* dCn = p.dC + (bg * p.nstate + n) * int64_t(L);
      for (int j = threadIdx.x; j < kChunk; j += kBwdWarps * 32) {
        const int t = c0 + j;
        if (t < L) {
          const int idx = (j / ITEMS) * (ITEMS + 1) + (j % ITEMS);
          float sb = 0.f, sc = 0.f;
#pragma unroll
          for (int w = 0; w < kBwdWarps; ++w) {
            sb += red[0][w][idx];
            sc += red[1][w][idx];
          }
          atomicAdd(dBn + t, sb);
          atomicAdd(dCn + t, sc);
        }
      }
      __syncthreads();
    }

    dt_right = __shfl_sync(kFullMask, dt[0], 0);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      duv[i] = fmaf(skip, dy[i], duv[i]);
      dD_part = fmaf(dy[i], uv[i], dD_part);
      const float dd = p.softplus ? ddt[i] * sigmoid_f(xv[i]) : ddt[i];
      ddt[i] = (t0 + i < valid) ? dd : 0.f;
      dbias_part += ddt[i];
    }
    store_items<T, ITEMS>(du, t0, valid, duv);
    store_items<T, ITEMS>(ddelta, t0, valid, ddt);
  }

  if (active) {
    if (kSingleState ? lane == 0 : lane < N) atomicAdd(p.dA + int64_t(d) * p.nstate + lane, dA_acc);
    dD_part = warp_sum(dD_part);
    dbias_part = warp_sum(dbias_part);
    if (lane == 0 && p.has_d) atomicAdd(p.dD + d, dD_part);
    if (lane == 0 && p.has_bias) atomicAdd(p.ddelta_bias + d, dbias_part);
  }
}

template <typename T, int ITEMS, bool kSingleState>
cudaError_t launch_bwd_t(const ScanParams& p, cudaStream_t stream) {
  const int n_tiles = (p.per_group + kBwdWarps - 1) / kBwdWarps;
  const int64_t blocks = int64_t(p.batch) * p.groups * n_tiles;
  scan_bwd_kernel<T, ITEMS, kSingleState><<<unsigned(blocks), kBwdWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const ScanParams& p, cudaStream_t stream) {
  const bool single = p.nstate == 1;
  switch (p.items) {
    case 4: return single ? launch_bwd_t<T, 4, true>(p, stream) : launch_bwd_t<T, 4, false>(p, stream);
    case 8: return single ? launch_bwd_t<T, 8, true>(p, stream) : launch_bwd_t<T, 8, false>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace gmscan
