// fwd kernels for float inputs (one dtype per file so the build runs in parallel)
#include "scan_fwd.cuh"

namespace gmscan {
cudaError_t launch_fwd_f32(const ScanParams& p, cudaStream_t stream) { return launch_fwd<float>(p, stream); }
}  // namespace gmscan
