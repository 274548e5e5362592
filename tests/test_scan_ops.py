"""CPU tests of the scan-kernel plumbing: the explicit gradient formulas the kernels
implement, the torch.library custom-op registration (fake kernels, autograd,
opcheck, fullgraph torch.compile), the import guards of the GPU backends, the Triton
kernels under Triton's CPU interpreter (when Triton is installed), and an nvcc-only
compile of the CUDA sources (when nvcc is installed).
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from kernels.selective_scan import available_backends
from kernels.selective_scan._ops import define_scan_op, scan_bwd_explicit, scan_fwd_explicit
from kernels.selective_scan.reference import selective_scan_ref
from subprocesses import run_in_triton_interpreter, run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def make_inputs(batch, dim, length, n_state=1, groups=1, dtype=torch.float64, softplus=True,
                has_d=True, has_bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, length, generator=gen)
    if softplus:
        delta = 0.5 * torch.randn(batch, dim, length, generator=gen)
    else:
        delta = 0.2 * torch.rand(batch, dim, length, generator=gen) + 1e-3
    A = -torch.exp(0.5 * torch.randn(dim, n_state, generator=gen))
    B = torch.randn(batch, groups, n_state, length, generator=gen)
    C = torch.randn(batch, groups, n_state, length, generator=gen)
    D = 1 + 0.1 * torch.randn(dim, generator=gen) if has_d else None
    bias = -2 + 0.5 * torch.randn(dim, generator=gen) if has_bias else None
    u, delta, B, C = (t.to(dtype) for t in (u, delta, B, C))
    if dtype == torch.float64:
        A = A.double()
        D = D.double() if D is not None else None
        bias = bias.double() if bias is not None else None
    return [u, delta, A, B, C, D, bias]


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


CASES = [
    # batch, dim, length, n_state, groups, softplus, has_d, has_bias
    (2, 4, 1, 1, 1, True, True, True),
    (2, 6, 9, 1, 3, True, True, True),
    (1, 4, 13, 3, 2, False, True, False),
    (2, 3, 8, 2, 1, True, False, True),
    (1, 2, 5, 1, 1, False, False, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-d{}-l{}-n{}-g{}".format(*c[:5]))
def test_explicit_gradients_match_reference_autograd(case):
    """The closed-form backward the kernels implement equals autograd of the reference."""
    batch, dim, length, n_state, groups, softplus, has_d, has_bias = case
    args = make_inputs(batch, dim, length, n_state, groups, softplus=softplus, has_d=has_d,
                       has_bias=has_bias)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in args]
    y_ref = selective_scan_ref(*leaves, delta_softplus=softplus)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y = scan_fwd_explicit(*args, delta_softplus=softplus)
    assert rel_err(y, y_ref) < 1e-12
    grads = scan_bwd_explicit(dy, *args, delta_softplus=softplus)
    for name, leaf, grad in zip(GRAD_NAMES, leaves, grads):
        if leaf is None:
            assert grad.numel() == 0, name
            continue
        assert grad.shape == leaf.shape, name
        assert rel_err(grad, leaf.grad) < 1e-10, name


@pytest.fixture(scope="module")
def cpu_op():
    """The shared op machinery, registered once with the explicit CPU implementation."""
    return define_scan_op("cpu_explicit_test", scan_fwd_explicit, scan_bwd_explicit)


@pytest.mark.parametrize("extras", [True, False], ids=["with-D-bias", "without"])
def test_opcheck(cpu_op, extras):
    args = make_inputs(2, 4, 7, 2, 2, dtype=torch.float32, has_d=extras, has_bias=extras)
    args = [t.requires_grad_() if t is not None else None for t in args]
    torch.library.opcheck(cpu_op.fwd_op, (*args, True))


def test_opcheck_half_inputs_give_float32_y(cpu_op):
    """bf16 u, delta, B, C (as under autocast): y and its gradient float32, the
    input gradients bf16; the fake kernel promises the same."""
    args = make_inputs(2, 4, 7, 1, 2, dtype=torch.float32)
    args = [t.bfloat16() if i in (0, 1, 3, 4) else t for i, t in enumerate(args)]
    args = [t.requires_grad_() for t in args]
    torch.library.opcheck(cpu_op.fwd_op, (*args, True))
    y = cpu_op(*args, delta_softplus=True)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert [t.grad.dtype for t in args] == [t.dtype for t in args]


def test_op_gradients_through_autograd(cpu_op):
    args = make_inputs(2, 6, 11, 1, 3)
    leaves = [t.clone().requires_grad_() for t in args]
    ref_leaves = [t.clone().requires_grad_() for t in args]
    cpu_op(*leaves, delta_softplus=True).square().sum().backward()
    selective_scan_ref(*ref_leaves, delta_softplus=True).square().sum().backward()
    for name, a, b in zip(GRAD_NAMES, leaves, ref_leaves):
        assert rel_err(a.grad, b.grad) < 1e-10, name


def test_b_and_c_with_different_groups(cpu_op):
    args = make_inputs(2, 8, 6, 2, 2)
    args[4] = torch.randn(2, 4, 2, 6, dtype=torch.float64)  # C with 4 groups, B with 2
    leaves = [t.clone().requires_grad_() for t in args]
    ref_leaves = [t.clone().requires_grad_() for t in args]
    y = cpu_op(*leaves, delta_softplus=True)
    y_ref = selective_scan_ref(*ref_leaves, delta_softplus=True)
    assert rel_err(y, y_ref) < 1e-12
    y.sum().backward()
    y_ref.sum().backward()
    for name, a, b in zip(GRAD_NAMES, leaves, ref_leaves):
        assert rel_err(a.grad, b.grad) < 1e-10, name


def test_fullgraph_compile_traces_through_op(cpu_op):
    """fullgraph=True: no graph break at the scan, forward and backward, dynamic shapes.

    aot_eager runs the same AOTAutograd tracing inductor would (through the fake
    kernels and the registered backward) without needing a C++ compiler.
    """
    torch._dynamo.reset()
    w = torch.randn(6, 6)

    def block(u, delta, A, B, C, D, bias, w):
        x = torch.einsum("bdl,de->bel", u, w).contiguous()
        return torch.nn.functional.gelu(cpu_op(x, delta, A, B, C, D, bias, True)).mean()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager", dynamic=True)
    for length in (9, 14):  # a second length re-uses the dynamic graph
        args = make_inputs(2, 6, length, 1, 3, dtype=torch.float32)
        eager_in = [t.clone().requires_grad_() for t in (*args, w)]
        comp_in = [t.clone().requires_grad_() for t in (*args, w)]
        block(*eager_in).backward()
        compiled(*comp_in).backward()
        for a, b in zip(comp_in, eager_in):
            assert rel_err(a.grad, b.grad) < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only import guard")
def test_gpu_backends_report_why_they_are_unavailable():
    reasons = available_backends()
    assert reasons["torch"] is None
    for name in ("triton", "cuda"):
        assert reasons[name], f"{name} should be unavailable without CUDA"
    proc = run_python("import kernels.selective_scan.triton_scan")
    assert proc.returncode != 0 and "ImportError" in proc.stderr
    assert ("CUDA GPU" in proc.stderr) or ("needs the 'triton' package" in proc.stderr)


def _has_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_INTERPRETER_CHECK = r"""
import torch
from kernels.selective_scan import triton_scan as ts
from kernels.selective_scan.reference import selective_scan_ref
torch.manual_seed(0)
C = ts.ScanConfig
# (batch, dim, L, N, G, softplus, fwd config, bwd config): several chunks, N > 1, G > 1,
# channel tiles that straddle the end of a group, L = 1
cases = [
    (2, 3, 7, 1, 1, True, None, None),
    (2, 6, 37, 1, 2, True, C(2, 16, 1), C(2, 16, 1)),
    (1, 6, 37, 3, 2, False, C(2, 16, 1), C(1, 16, 1)),
    (2, 5, 1, 2, 1, True, None, None),
    (1, 6, 20, 1, 2, True, C(4, 16, 1), C(2, 16, 1)),
]
worst = 0.0
for b, d, L, N, G, sp, cf, cb in cases:
    u = torch.randn(b, d, L); delta = 0.5 * torch.randn(b, d, L); A = -torch.rand(d, N) - 0.2
    B = torch.randn(b, G, N, L); Cm = torch.randn(b, G, N, L)
    D = torch.randn(d); bias = 0.3 * torch.randn(d)
    args = [u, delta, A, B, Cm, D, bias]
    leaves = [t.double().requires_grad_() for t in args]
    y = selective_scan_ref(*leaves, delta_softplus=sp)
    dy = torch.randn_like(y)
    y.backward(dy)
    y2 = ts._fwd(*args, sp, config=cf)
    grads = ts._bwd(dy.float(), *args, sp, config=cb)
    errs = [((y2.double() - y).norm() / y.norm()).item()]
    errs += [((g.double() - l.grad).norm() / l.grad.norm().clamp_min(1e-30)).item()
             for g, l in zip(grads, leaves)]
    worst = max(worst, max(errs))
print("WORST", worst)
assert worst < 1e-5, worst
"""


@pytest.mark.skipif(not _has_triton(), reason="triton is not installed")
@pytest.mark.slow
def test_triton_kernels_in_interpreter():
    """The Triton forward and backward kernels, run by Triton's CPU interpreter."""
    run_in_triton_interpreter(_INTERPRETER_CHECK)


def _nvcc():
    if shutil.which("nvcc") or os.environ.get("CUDA_HOME"):
        return True
    return os.path.exists("/usr/local/cuda/bin/nvcc")


@pytest.mark.slow
@pytest.mark.skipif(not _nvcc(), reason="nvcc is not installed")
def test_cuda_sources_compile_with_nvcc():
    """The kernel sources build for sm_80 and sm_90 (+ PTX) with the local nvcc alone."""
    script = os.path.join(ROOT, "kernels", "selective_scan", "check_nvcc.py")
    proc = subprocess.run([sys.executable, script, "--archs", "80,90", "--quiet"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all sources compiled" in proc.stdout
