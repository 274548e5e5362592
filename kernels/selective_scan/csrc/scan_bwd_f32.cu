// bwd kernels for float inputs (one dtype per file so the build runs in parallel)
#include "scan_bwd.cuh"

namespace gmscan {
cudaError_t launch_bwd_f32(const ScanParams& p, cudaStream_t stream) { return launch_bwd<float>(p, stream); }
}  // namespace gmscan
