// Torch binding of the selective-scan CUDA kernels: shape/dtype checks, allocation,
// launch on the current stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "scan_params.h"

namespace {

using torch::Tensor;

void check_cuda_contig(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "selective scan: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), "selective scan: ", name, " must be contiguous");
}

// Validates shapes and dtypes and fills everything but the outputs.
gmscan::ScanParams make_params(const Tensor& u, const Tensor& delta, const Tensor& A,
                               const Tensor& B, const Tensor& C, const std::optional<Tensor>& D,
                               const std::optional<Tensor>& delta_bias, bool softplus) {
  check_cuda_contig(u, "u");
  check_cuda_contig(delta, "delta");
  check_cuda_contig(A, "A");
  check_cuda_contig(B, "B");
  check_cuda_contig(C, "C");
  TORCH_CHECK(u.dim() == 3, "selective scan: u must be (batch, D, L), got ", u.sizes());
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2);
  TORCH_CHECK(delta.sizes() == u.sizes(), "selective scan: delta must match u ", u.sizes(),
              ", got ", delta.sizes());
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, "selective scan: A must be (D=", dim,
              ", N), got ", A.sizes());
  const int64_t nstate = A.size(1);
  TORCH_CHECK(nstate >= 1 && nstate <= gmscan::kMaxState, "selective scan (cuda): N must be in 1..",
              gmscan::kMaxState, ", got ", nstate, " (the triton backend takes any N)");
  TORCH_CHECK(B.dim() == 4 && B.size(0) == batch && B.size(2) == nstate && B.size(3) == len,
              "selective scan: B must be (batch=", batch, ", G, N=", nstate, ", L=", len, "), got ",
              B.sizes());
  TORCH_CHECK(C.sizes() == B.sizes(), "selective scan (cuda): C must match B ", B.sizes(), ", got ",
              C.sizes());
  const int64_t groups = B.size(1);
  TORCH_CHECK(groups >= 1 && dim % groups == 0, "selective scan: G=", groups,
              " groups must divide D=", dim);
  const auto io = u.scalar_type();
  TORCH_CHECK(io == at::kFloat || io == at::kHalf || io == at::kBFloat16,
              "selective scan (cuda): u must be float32, float16 or bfloat16, got ", io);
  TORCH_CHECK(delta.scalar_type() == io && B.scalar_type() == io && C.scalar_type() == io,
              "selective scan (cuda): u, delta, B, C must share one dtype");
  TORCH_CHECK(A.scalar_type() == at::kFloat, "selective scan (cuda): A must be float32");
  TORCH_CHECK(batch * dim * len < (int64_t(1) << 40), "selective scan: input too large");
  TORCH_CHECK(len < (int64_t(1) << 30), "selective scan: L too large");

  gmscan::ScanParams p;
  p.batch = int(batch);
  p.dim = int(dim);
  p.len = int(len);
  p.nstate = int(nstate);
  p.groups = int(groups);
  p.per_group = int(dim / groups);
  p.softplus = softplus;
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.A = A.data_ptr<float>();
  p.B = B.data_ptr();
  p.C = C.data_ptr();
  for (auto [opt, name, has, ptr] :
       {std::tuple{&D, "D", &p.has_d, &p.D}, std::tuple{&delta_bias, "delta_bias", &p.has_bias, &p.delta_bias}}) {
    if (opt->has_value()) {
      const Tensor& t = opt->value();
      check_cuda_contig(t, name);
      TORCH_CHECK(t.scalar_type() == at::kFloat, "selective scan (cuda): ", name, " must be float32");
      TORCH_CHECK(t.dim() == 1 && t.size(0) == dim, "selective scan: ", name, " must be (", dim,
                  ",), got ", t.sizes());
      *has = true;
      *ptr = t.data_ptr<float>();
    }
  }
  return p;
}

cudaError_t dispatch(bool forward, const gmscan::ScanParams& p, at::ScalarType io, cudaStream_t s) {
  switch (io) {
    case at::kFloat: return forward ? gmscan::launch_fwd_f32(p, s) : gmscan::launch_bwd_f32(p, s);
    case at::kHalf: return forward ? gmscan::launch_fwd_f16(p, s) : gmscan::launch_bwd_f16(p, s);
    case at::kBFloat16: return forward ? gmscan::launch_fwd_bf16(p, s) : gmscan::launch_bwd_bf16(p, s);
    default: TORCH_CHECK(false, "unreachable dtype");
  }
}

Tensor scan_fwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                const Tensor& C, const std::optional<Tensor>& D,
                const std::optional<Tensor>& delta_bias, bool softplus, int64_t items,
                int64_t row_warps) {
  gmscan::ScanParams p = make_params(u, delta, A, B, C, D, delta_bias, softplus);
  TORCH_CHECK(items == 0 || items == 4 || items == 8 || items == 16,
              "selective scan (cuda): forward items must be 0 (auto), 4, 8 or 16");
  TORCH_CHECK(row_warps == 0 || row_warps == 1 || row_warps == gmscan::kFwdWarps,
              "selective scan (cuda): forward row_warps must be 0 (auto), 1 or ", gmscan::kFwdWarps);
  p.row_warps = row_warps ? int(row_warps) : gmscan::pick_fwd_row_warps(p.len);
  p.items = items ? int(items) : gmscan::pick_fwd_items(p.len, p.row_warps);
  const c10::cuda::CUDAGuard guard(u.device());
  Tensor out = torch::empty(u.sizes(), u.options().dtype(at::kFloat));  // float32 y for every io dtype
  if (u.numel() == 0) return out;
  p.out = out.data_ptr();
  const cudaError_t err = dispatch(true, p, u.scalar_type(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "selective scan forward launch failed: ", cudaGetErrorString(err));
  return out;
}

std::vector<Tensor> scan_bwd(const Tensor& dout, const Tensor& u, const Tensor& delta,
                             const Tensor& A, const Tensor& B, const Tensor& C,
                             const std::optional<Tensor>& D,
                             const std::optional<Tensor>& delta_bias, bool softplus,
                             int64_t items) {
  gmscan::ScanParams p = make_params(u, delta, A, B, C, D, delta_bias, softplus);
  check_cuda_contig(dout, "dout");
  TORCH_CHECK(dout.sizes() == u.sizes() && dout.scalar_type() == at::kFloat,
              "selective scan (cuda): dout must be float32 (as y is) and match u in shape");
  TORCH_CHECK(items == 0 || items == 4 || items == 8,
              "selective scan (cuda): backward items must be 0 (auto), 4 or 8");
  p.items = items ? int(items) : gmscan::pick_bwd_items(p.len);
  const c10::cuda::CUDAGuard guard(u.device());
  const auto f32 = u.options().dtype(at::kFloat);
  Tensor du = torch::empty_like(u);
  Tensor ddelta = torch::empty_like(delta);
  Tensor dA = torch::zeros_like(A);
  Tensor dB = torch::zeros(B.sizes(), f32);
  Tensor dC = torch::zeros(C.sizes(), f32);
  Tensor dD = torch::zeros({p.has_d ? p.dim : 0}, f32);
  Tensor dbias = torch::zeros({p.has_bias ? p.dim : 0}, f32);
  if (u.numel() == 0) return {du, ddelta, dA, dB, dC, dD, dbias};
  const int chunk = 32 * p.items;
  p.n_chunks = (p.len + chunk - 1) / chunk;
  Tensor state;
  if (p.n_chunks > 1) {
    state = torch::empty({int64_t(p.batch) * p.dim * p.n_chunks * p.nstate}, f32);
    p.state = state.data_ptr<float>();
  }
  p.dout = dout.data_ptr();
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dA = dA.data_ptr<float>();
  p.dB = dB.data_ptr<float>();
  p.dC = dC.data_ptr<float>();
  p.dD = p.has_d ? dD.data_ptr<float>() : nullptr;
  p.ddelta_bias = p.has_bias ? dbias.data_ptr<float>() : nullptr;
  const cudaError_t err = dispatch(false, p, u.scalar_type(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "selective scan backward launch failed: ", cudaGetErrorString(err));
  return {du, ddelta, dA, dB, dC, dD, dbias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "GroupMamba selective-scan CUDA kernels (forward and backward)";
  m.def("fwd", &scan_fwd, "selective scan forward", py::arg("u"), py::arg("delta"), py::arg("A"),
        py::arg("B"), py::arg("C"), py::arg("D"), py::arg("delta_bias"), py::arg("delta_softplus"),
        py::arg("items") = 0, py::arg("row_warps") = 0);
  m.def("bwd", &scan_bwd, "selective scan backward: du, ddelta, dA, dB, dC, dD, ddelta_bias (fp32 reductions)",
        py::arg("dout"), py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"),
        py::arg("D"), py::arg("delta_bias"), py::arg("delta_softplus"), py::arg("items") = 0);
}
