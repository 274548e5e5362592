// fwd kernels for __nv_bfloat16 inputs (one dtype per file so the build runs in parallel)
#include "scan_fwd.cuh"

namespace gmscan {
cudaError_t launch_fwd_bf16(const ScanParams& p, cudaStream_t stream) { return launch_fwd<__nv_bfloat16>(p, stream); }
}  // namespace gmscan
