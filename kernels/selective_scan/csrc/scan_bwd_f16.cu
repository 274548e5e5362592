// bwd kernels for __half inputs (one dtype per file so the build runs in parallel)
#include "scan_bwd.cuh"

namespace gmscan {
cudaError_t launch_bwd_f16(const ScanParams& p, cudaStream_t stream) { return launch_bwd<__half>(p, stream); }
}  // namespace gmscan
