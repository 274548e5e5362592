// fwd kernels for __half inputs (one dtype per file so the build runs in parallel)
#include "scan_fwd.cuh"

namespace gmscan {
cudaError_t launch_fwd_f16(const ScanParams& p, cudaStream_t stream) { return launch_fwd<__half>(p, stream); }
}  // namespace gmscan
