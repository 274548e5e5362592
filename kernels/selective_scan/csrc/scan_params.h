// Parameters and launchers of the selective-scan CUDA kernels.
//
// Plain C++ (no torch headers) so the .cu files compile with nvcc alone; the torch
// binding (scan_api.cpp) fills ScanParams from tensors and picks the launcher.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace gmscan {

// warps per block; every warp owns one (batch, channel) row
constexpr int kFwdWarps = 4;
constexpr int kBwdWarps = 4;
// largest state size the kernels accept (state n of a row lives in lane n)
constexpr int kMaxState = 32;

struct ScanParams {
  int batch = 0, dim = 0, len = 0, nstate = 0, groups = 0, per_group = 0;
  bool has_d = false, has_bias = false, softplus = false;
  int items = 0;      // elements per thread per chunk
  int row_warps = 1;  // forward only: warps sharing one row (1 or kFwdWarps)

  // inputs: u, delta, B, C share one dtype (the io dtype); A, D, delta_bias are float32
  const void* u = nullptr;
  const void* delta = nullptr;
  const float* A = nullptr;
  const void* B = nullptr;
  const void* C = nullptr;
  const float* D = nullptr;
  const float* delta_bias = nullptr;

  // forward output, float32 whatever the io dtype (callers normalise it in float32)
  void* out = nullptr;

  // backward: dout (the gradient of y) in float32; du, ddelta in the io dtype; the
  // reductions in float32 (zeroed)
  const void* dout = nullptr;
  void* du = nullptr;
  void* ddelta = nullptr;
  float* dA = nullptr;
  float* dB = nullptr;
  float* dC = nullptr;
  float* dD = nullptr;
  float* ddelta_bias = nullptr;
  float* state = nullptr;  // (batch * dim, n_chunks, nstate) scratch, when n_chunks > 1
  int n_chunks = 1;
};

// launchers, one per io dtype; they return the launch status
cudaError_t launch_fwd_f32(const ScanParams& p, cudaStream_t stream);
cudaError_t launch_fwd_f16(const ScanParams& p, cudaStream_t stream);
cudaError_t launch_fwd_bf16(const ScanParams& p, cudaStream_t stream);
cudaError_t launch_bwd_f32(const ScanParams& p, cudaStream_t stream);
cudaError_t launch_bwd_f16(const ScanParams& p, cudaStream_t stream);
cudaError_t launch_bwd_bf16(const ScanParams& p, cudaStream_t stream);

// launch choices (measured on an H200 at the GroupMamba stage shapes, bench/bench_scan.py)
// forward: a block per row from L = 512 on, 8 steps a thread; short rows a warp each
inline int pick_fwd_row_warps(int len) { return len >= 512 ? kFwdWarps : 1; }
inline int pick_fwd_items(int len, int row_warps) {
  if (row_warps > 1) return 8;
  return len <= 128 ? 4 : 8;
}
inline int pick_bwd_items(int len) { return len <= 128 ? 4 : 8; }

}  // namespace gmscan
