// bwd kernels for __nv_bfloat16 inputs (one dtype per file so the build runs in parallel)
#include "scan_bwd.cuh"

namespace gmscan {
cudaError_t launch_bwd_bf16(const ScanParams& p, cudaStream_t stream) { return launch_bwd<__nv_bfloat16>(p, stream); }
}  // namespace gmscan
