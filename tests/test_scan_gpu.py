"""GPU tests of the selective-scan kernels (Triton and CUDA extension) against the
pure-PyTorch reference evaluated in float64.

Skipped without CUDA; a backend that cannot load (Triton missing, extension not
built) is skipped with the reason the dispatcher recorded. Every check draws fresh
random inputs, poisons the allocator with NaN first (so an unwritten output element
shows up as NaN), and compares ``||out - ref|| / ||ref||`` per tensor against a
per-dtype tolerance.
"""
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from kernels.selective_scan import available_backends, selective_scan_fn  # noqa: E402
from kernels.selective_scan.reference import selective_scan_ref  # noqa: E402

GPU_BACKENDS = ("triton", "cuda")
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")

# relative L2 error allowed, (forward, gradients), by input dtype. The reference sees
# the same (already rounded) inputs in float64. y is float32 for every input dtype,
# so its error is float32 accumulation alone; the input gradients of low-precision
# inputs are rounded to their dtype.
TOLERANCE = {
    torch.float32: (2e-5, 1e-4),
    torch.bfloat16: (2e-5, 1e-2),
    torch.float16: (2e-5, 3e-3),
}


def _backend_or_skip(name):
    why = available_backends()[name]
    if why is not None:
        pytest.skip(f"{name} backend unavailable: {why}")
    return name


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    return _backend_or_skip(request.param)


def _inverse_softplus(x):
    return x + torch.log(-torch.expm1(-x))


def make_inputs(batch, dim, length, n_state=1, groups=1, dtype=torch.float32, softplus=True,
                has_d=True, has_bias=True, groups_c=None, seed=None, device="cuda"):
    """Inputs shaped and scaled like GroupMamba's SS2D (dt from a projection plus a bias
    initialised at softplus^-1 of a log-uniform 1e-3..1e-1, A = -exp(A_log))."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else torch.randint(0, 2**31 - 1, ()).item())

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    u = randn(batch, dim, length)
    if softplus:
        delta = 0.5 * randn(batch, dim, length)
    else:  # used as is: keep it a positive step
        delta = 0.2 * torch.rand(batch, dim, length, generator=gen) + 1e-3
    A = -torch.exp(0.5 * randn(dim, n_state))
    B = randn(batch, groups, n_state, length)
    C = randn(batch, groups_c or groups, n_state, length)
    D = 1.0 + 0.1 * randn(dim) if has_d else None
    dt0 = torch.exp(torch.rand(dim, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    bias = _inverse_softplus(dt0) if has_bias else None
    cast = [t.to(device=device, dtype=dtype) for t in (u, delta, B, C)]
    u, delta, B, C = cast
    A = A.to(device)
    D = D.to(device) if D is not None else None
    bias = bias.to(device) if bias is not None else None
    return u, delta, A, B, C, D, bias


def _poison_allocator(nbytes=1 << 28):
    """Leave NaN in the caching allocator's free blocks so unwritten outputs show."""
    torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").fill_(float("nan"))


def rel_err(out, ref):
    """||out - ref|| / ||ref||; the absolute error where ref is exactly zero (e.g. dA
    for L = 1, where h_{t-1} is always 0)."""
    out = out.double()
    ref = ref.double()
    denom = ref.norm()
    diff = (out - ref).norm()
    return (diff / denom).item() if denom > 0 else diff.item()


def run_and_compare(backend_name, args, softplus, dtype=torch.float32):
    u, delta, A, B, C, D, bias = args
    ref_in = [t.detach().double().requires_grad_() if t is not None else None for t in args]
    y_ref = selective_scan_ref(*ref_in, delta_softplus=softplus)
    dy = torch.randn_like(y_ref).float().double()  # the rounded dy feeds both sides
    y_ref.backward(dy)

    test_in = [t.detach().clone().requires_grad_() if t is not None else None for t in args]
    _poison_allocator()
    y = selective_scan_fn(*test_in, delta_softplus=softplus, backend=backend_name)
    assert y.dtype == torch.float32 and y.shape == u.shape  # never rounded to half
    assert torch.isfinite(y).all(), "forward output has NaN/inf (unwritten elements?)"
    _poison_allocator()
    y.backward(dy.to(y.dtype))
    torch.cuda.synchronize()

    tol_fwd, tol_bwd = TOLERANCE[dtype]
    errors = {"y": rel_err(y, y_ref)}
    for name, t, r in zip(GRAD_NAMES, test_in, ref_in):
        if t is None:
            continue
        assert t.grad is not None, f"no gradient for {name}"
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
        assert torch.isfinite(t.grad).all(), f"grad {name} has NaN/inf"
        errors[name] = rel_err(t.grad, r.grad)
    bad = {k: v for k, v in errors.items() if v > (tol_fwd if k == "y" else tol_bwd)}
    assert not bad, f"{backend_name}: errors over tolerance {bad} (all: {errors})"
    return errors


# GroupMamba stage shapes: each SS2D scans a quarter of the stage's channels;
# tiny 64/128/348/448, small 64/128/348/512, base 96/192/424/512 channels per stage
STAGE_SHAPES = [
    (2, 16, 3136), (2, 24, 3136),
    (2, 32, 784), (2, 48, 784),
    (2, 87, 196), (2, 106, 196),
    (2, 112, 49), (2, 128, 49),
]


@pytest.mark.parametrize("batch,dim,length", STAGE_SHAPES)
def test_stage_shapes_fp32(backend, batch, dim, length):
    args = make_inputs(batch, dim, length)
    run_and_compare(backend, args, softplus=True)


# (batch, dim, length, n_state, groups, softplus, has_d, has_bias)
ODD_CASES = [
    (64, 5, 1, 1, 1, True, True, True),      # L = 1 (batch 64: dB/dC are 5-term sums)
    (2, 12, 17, 1, 3, True, True, True),     # L odd, G > 1
    (2, 9, 33, 2, 3, False, False, False),   # no D, no bias, no softplus
    (2, 8, 300, 4, 2, False, True, False),   # N > 1, G > 1
    (1, 16, 3136, 4, 1, True, True, True),   # N > 1 over several chunks
    (2, 10, 77, 16, 5, True, False, True),   # N = 16 (Mamba's d_state)
    (2, 6, 5000, 1, 1, True, True, True),    # long row: several chunks everywhere
    (5, 3, 129, 1, 1, True, True, True),     # odd channel count, one past a power of 2
]


@pytest.mark.parametrize("case", ODD_CASES, ids=lambda c: "b{}-d{}-l{}-n{}-g{}".format(*c[:5]))
def test_odd_shapes_fp32(backend, case):
    batch, dim, length, n_state, groups, softplus, has_d, has_bias = case
    args = make_inputs(batch, dim, length, n_state, groups, softplus=softplus, has_d=has_d,
                       has_bias=has_bias)
    run_and_compare(backend, args, softplus=softplus)


def test_b_and_c_grouped_differently(backend):
    """The backend ops accept B and C with different group counts (the dispatcher may not)."""
    fn = _backend_callable(backend)
    args = make_inputs(2, 8, 50, 2, groups=2, groups_c=4)
    leaves = [t.clone().requires_grad_() for t in args]
    ref = [t.double().requires_grad_() for t in args]
    y = fn(*leaves, delta_softplus=True)
    y_ref = selective_scan_ref(*ref, delta_softplus=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy.double())
    assert rel_err(y, y_ref) < 2e-5
    for name, a, b in zip(GRAD_NAMES, leaves, ref):
        assert rel_err(a.grad, b.grad) < 1e-4, name


def _direct_compare(fwd, bwd, args, fwd_kw=None, bwd_kw=None, tol=(2e-5, 1e-4)):
    """A backend's plain forward/backward functions (no autograd) against the reference."""
    ref = [t.double().requires_grad_() if t is not None else None for t in args]
    y_ref = selective_scan_ref(*ref, delta_softplus=True)
    dy = torch.randn_like(y_ref).float()  # y and its gradient are float32
    y_ref.backward(dy.double())
    _poison_allocator()
    y = fwd(*args, True, **(fwd_kw or {}))
    assert torch.isfinite(y).all()
    errors = {"y": rel_err(y, y_ref)}
    _poison_allocator()
    grads = bwd(dy, *args, True, **(bwd_kw or {}))
    for name, g, r in zip(GRAD_NAMES, grads, ref):
        if r is not None:
            assert torch.isfinite(g).all(), name
            errors[name] = rel_err(g, r.grad)
    bad = {k: v for k, v in errors.items() if v > (tol[0] if k == "y" else tol[1])}
    assert not bad, f"errors over tolerance {bad} (all: {errors})"


VARIANT_SHAPES = [(2, 16, 3136, 1, 1), (2, 32, 784, 1, 1), (2, 87, 196, 1, 1), (2, 112, 49, 1, 1),
                  (2, 12, 17, 1, 3), (1, 8, 300, 4, 2)]


@pytest.mark.parametrize("shape", VARIANT_SHAPES, ids=lambda c: "b{}-d{}-l{}-n{}-g{}".format(*c))
def test_triton_launch_configs(shape):
    """Every launch configuration the benchmark sweeps computes the same scan."""
    _backend_or_skip("triton")
    from kernels.selective_scan import triton_scan as ts
    args = make_inputs(*shape)
    fwd_cfgs = ts.candidate_configs(shape[2], shape[3], "fwd")
    bwd_cfgs = ts.candidate_configs(shape[2], shape[3], "bwd")
    for k in range(max(len(fwd_cfgs), len(bwd_cfgs))):
        cf, cb = fwd_cfgs[k % len(fwd_cfgs)], bwd_cfgs[k % len(bwd_cfgs)]
        _direct_compare(ts._fwd, ts._bwd, args, {"config": cf}, {"config": cb})


@pytest.mark.parametrize("shape", VARIANT_SHAPES, ids=lambda c: "b{}-d{}-l{}-n{}-g{}".format(*c))
def test_cuda_launch_variants(shape):
    """Every (items, row_warps) forward and items backward variant of the extension."""
    _backend_or_skip("cuda")
    from kernels.selective_scan import cuda_scan as cs
    args = make_inputs(*shape)
    variants = [(items, rw) for items in (4, 8, 16) for rw in (1, 4)]
    for k, (items, rw) in enumerate(variants):
        _direct_compare(cs._fwd, cs._bwd, args, {"items": items, "row_warps": rw},
                        {"items": (4, 8)[k % 2]})
    bf16 = [t.bfloat16() if t.dim() > 2 else t for t in args]  # u, delta, B, C in bf16
    for items, rw in variants:
        _direct_compare(cs._fwd, cs._bwd, bf16, {"items": items, "row_warps": rw},
                        {"items": 8}, tol=TOLERANCE[torch.bfloat16])


LOW_PRECISION_CASES = [
    (2, 16, 3136, 1, 1), (2, 87, 196, 1, 1), (2, 12, 17, 1, 3), (2, 8, 300, 4, 2),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=lambda c: "b{}-d{}-l{}-n{}-g{}".format(*c))
def test_low_precision(backend, dtype, case):
    args = make_inputs(*case, dtype=dtype)
    run_and_compare(backend, args, softplus=True, dtype=dtype)


def test_mixed_input_dtypes(backend):
    """bf16 u/delta with fp32 B/C: math and y in fp32, gradients in each argument's dtype."""
    u, delta, A, B, C, D, bias = make_inputs(2, 16, 100, dtype=torch.float32)
    args = (u.bfloat16(), delta.bfloat16(), A, B, C, D, bias)
    run_and_compare(backend, args, softplus=True, dtype=torch.bfloat16)


def test_against_other_backend_large_batch():
    """Both GPU backends agree on a full-size stage-3 batch (B=128)."""
    names = [n for n in GPU_BACKENDS if available_backends()[n] is None]
    if len(names) < 2:
        pytest.skip("needs both GPU backends")
    args = make_inputs(128, 87, 196)
    ys = []
    for name in names:
        xs = [t.clone().requires_grad_() if t is not None else None for t in args]
        y = selective_scan_fn(*xs, delta_softplus=True, backend=name)
        y.sum().backward()
        ys.append((y.detach(), [x.grad for x in xs if x is not None]))
    (y0, g0), (y1, g1) = ys
    assert rel_err(y1, y0) < 1e-5
    for a, b in zip(g1, g0):
        assert rel_err(a, b) < 1e-4


def test_shape_errors_are_clear(backend):
    u, delta, A, B, C, D, bias = make_inputs(2, 8, 16)
    with pytest.raises((ValueError, RuntimeError), match="A must be"):
        selective_scan_fn(u, delta, A[:4], B, C, D, bias, True, backend=backend)


def _backend_callable(name):
    if name == "triton":
        from kernels.selective_scan.triton_scan import selective_scan_triton as fn
    else:
        from kernels.selective_scan.cuda_scan import selective_scan_cuda as fn
    return fn


def test_opcheck(backend):
    """torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch."""
    fn = _backend_callable(backend)
    for has_extras in (True, False):
        u, delta, A, B, C, D, bias = make_inputs(2, 8, 40, 2, 2, has_d=has_extras,
                                                 has_bias=has_extras)
        args = [t.requires_grad_() if t is not None else None for t in (u, delta, A, B, C, D, bias)]
        torch.library.opcheck(fn.fwd_op, (*args, True))


def test_torch_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces through the scan (forward and backward) and
    matches eager; compiled with inductor around the custom op."""
    torch._dynamo.reset()
    u, delta, A, B, C, D, bias = make_inputs(2, 16, 196)
    w = torch.randn(16, 16, device="cuda")

    def block(u, delta, A, B, C, D, bias, w):
        x = torch.einsum("bdl,de->bel", u, w).contiguous()  # something around the scan
        y = selective_scan_fn(x, delta, A, B, C, D, bias, True, backend=backend)
        return torch.nn.functional.gelu(y).square().mean()

    compiled = torch.compile(block, fullgraph=True)
    results = []
    for fn in (block, compiled):
        xs = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D, bias, w)]
        loss = fn(*xs)
        loss.backward()
        results.append((loss.detach(), [x.grad for x in xs]))
    (l0, g0), (l1, g1) = results
    assert rel_err(l1, l0) < 1e-5
    for a, b in zip(g1, g0):
        assert rel_err(a, b) < 1e-4
