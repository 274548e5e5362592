"""The channels-last grid scan of ``kernels.grid_scan``.

On the CPU: the scan orders, the gather-based reference against the per-group
sequence scan, argument errors, and the fused Triton kernels under Triton's CPU
interpreter (forward, every gradient, several chunks and channel tiles, strided
B/C, bf16, ``opcheck`` of both custom ops). On a GPU (skipped without CUDA): the
fused op against the reference at GroupMamba's stage shapes, eager and
compiled, and a GroupMamba layer with and without it.
"""

import pytest
import torch

from kernels import grid_scan
from kernels.selective_scan import BackendUnavailableError, selective_scan_fn
from models.csms6s import SCAN_DIRECTIONS, to_sequence
from gpu_checks import grads_under_bf16_autocast, relative_error
from subprocesses import run_in_triton_interpreter

def _inputs(batch, height, width, per_group, n_state=1, dtype=torch.float64, device="cpu", seed=0):
    """Random scan inputs in the grid layout; B and C are strided views of one projection."""
    gen = torch.Generator().manual_seed(seed)
    groups, length = len(SCAN_DIRECTIONS), height * width
    dim = groups * per_group

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)

    projection = rand(batch, length, 3 * groups * n_state)
    return dict(u=rand(batch, length, dim), delta=rand(batch, length, dim, scale=0.5),
                A=-(0.5 + torch.rand(dim, n_state, generator=gen, dtype=torch.float64)).to(device),
                B=projection[..., groups * n_state:2 * groups * n_state], C=projection[..., 2 * groups * n_state:],
                D=rand(dim).double(), delta_bias=rand(dim, scale=0.3).double(),
                directions=SCAN_DIRECTIONS, height=height, width=width)


def test_step_positions_follow_the_sequence_orders():
    height, width = 3, 5
    grid = torch.arange(height * width).view(1, 1, height, width)
    for direction in SCAN_DIRECTIONS:
        expected = to_sequence(grid, direction).reshape(-1)
        assert torch.equal(grid_scan.step_positions(direction, height, width), expected), direction


def test_reference_is_the_sequence_scan_per_group():
    args = _inputs(2, 3, 4, per_group=3)
    y = grid_scan.reference(**args, backend="torch")
    groups, per_group = 4, 3
    for group, direction in enumerate(SCAN_DIRECTIONS):
        channels = slice(group * per_group, (group + 1) * per_group)

        def sequence(t):  # (batch, L, k) -> (batch, k, L) in the group's order
            return to_sequence(t.transpose(1, 2).reshape(2, -1, 3, 4), direction)

        ys = selective_scan_fn(sequence(args["u"][..., channels]), sequence(args["delta"][..., channels]),
                               args["A"][channels], sequence(args["B"][..., group:group + 1])[:, None],
                               sequence(args["C"][..., group:group + 1])[:, None], args["D"][channels],
                               args["delta_bias"][channels], delta_softplus=True, backend="torch")
        back = ys[..., grid_scan.step_positions(direction, 3, 4).argsort()].transpose(1, 2)
        torch.testing.assert_close(y[..., channels], back, rtol=1e-12, atol=1e-12)


def test_reorder_round_trip_and_gradient():
    order, inverse = grid_scan._build_orders(SCAN_DIRECTIONS, 3, 4, torch.device("cpu"))
    x = torch.randn(2, 4, 3, 12, dtype=torch.float64, requires_grad=True)  # (B, G, K, L)
    in_scan = grid_scan._ReorderSteps.apply(x, order, inverse)
    assert torch.equal(grid_scan._ReorderSteps.apply(in_scan, inverse, order), x)
    assert torch.autograd.gradcheck(lambda t: grid_scan._ReorderSteps.apply(t, order, inverse), (x,))


@pytest.mark.parametrize("change, message", [
    ({"height": 4}, "positions"),
    ({"directions": SCAN_DIRECTIONS[:3]}, "do not split"),
    ({"D": torch.zeros(5, dtype=torch.float64)}, "D and delta_bias"),
    ({"direction_name": "diagonal"}, "unknown scan direction"),
])
def test_bad_arguments_raise_value_error(change, message):
    args = _inputs(1, 3, 4, per_group=2)
    if "direction_name" in change:
        args["directions"] = ("row", "col", "diagonal", "row")
    else:
        args.update(change)
    with pytest.raises(ValueError, match=message):
        grid_scan.reference(**args) if "direction_name" not in change else grid_scan.fused_scan(**args)


def test_fused_scan_rejects_more_than_one_state():
    with pytest.raises(ValueError, match="one state"):
        grid_scan.fused_scan(**_inputs(1, 2, 2, per_group=2, n_state=2))


def test_cpu_tensors_take_the_reference_path():
    args = _inputs(1, 3, 3, per_group=2)
    assert grid_scan.resolve_backend("auto", args["u"].device) == "torch"
    torch.testing.assert_close(grid_scan.selective_scan_grid(**args), grid_scan.reference(**args))


def test_backend_requests_resolve_in_one_place(monkeypatch):
    """auto is the grid scan on CUDA with Triton (one state, not float64), else the sequence
    scans' auto; an explicit grid that cannot run says why and what to use instead. The
    device is never touched, so this runs without a GPU."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(grid_scan, "HAS_TRITON", True)
    assert grid_scan.resolve_backend("auto", cuda) == "grid"
    assert grid_scan.resolve_backend("grid", cuda) == "grid"
    assert grid_scan.resolve_backend("auto", cuda, n_state=2) != "grid"
    assert grid_scan.resolve_backend("auto", cuda, dtype=torch.float64) != "grid"
    assert grid_scan.resolve_backend("torch", cuda) == "torch"
    assert grid_scan.resolve_backend("auto", cpu) == "torch"
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU.*--scan-backend auto"):
        grid_scan.resolve_backend("grid", cpu)
    with pytest.raises(ValueError, match="one state"):
        grid_scan.resolve_backend("grid", cuda, n_state=2)
    with pytest.raises(ValueError, match="unknown scan backend 'fast'"):
        grid_scan.resolve_backend("fast", cpu)
    monkeypatch.setattr(grid_scan, "HAS_TRITON", False)
    assert grid_scan.resolve_backend("auto", cuda) != "grid"
    with pytest.raises(BackendUnavailableError, match="triton"):
        grid_scan.resolve_backend("grid", cuda)


_INTERPRETER_CHECK = r"""
import torch
from kernels import grid_scan
from kernels.grid_scan import triton_grid_scan
from tests.test_grid_scan import _inputs

def grads(fn, args, dy):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items() if torch.is_tensor(v)}
    y = fn(**{**args, **leaves})
    return [y.detach()] + list(torch.autograd.grad(y, list(leaves.values()), dy))

worst = {}
# (batch, H, W, channels a group, dtype, launch settings): one chunk and one tile; several
# chunks (L = 35 in chunks of 16, the forward's chunks twice as long as the backward's, whose
# entering states it stores) and several channel tiles (5 channels in tiles of 4, whose
# dB/dC add atomically); bf16 and fp16 inputs
cases = [(2, 5, 7, 3, torch.float32, dict(fwd_block_t=64, bwd_block_t=64, fwd_block_c=4, bwd_block_c=4)),
         (2, 5, 7, 5, torch.float32, dict(fwd_block_t=32, bwd_block_t=16, fwd_block_c=4, bwd_block_c=4)),
         (1, 6, 6, 8, torch.bfloat16, dict(fwd_block_t=16, bwd_block_t=16, fwd_block_c=8, bwd_block_c=8)),
         (1, 9, 9, 8, torch.bfloat16, dict(fwd_block_t=16, bwd_block_t=16, fwd_block_c=8, bwd_block_c=8)),
         (1, 4, 5, 4, torch.float16, dict(fwd_block_t=16, bwd_block_t=16, fwd_block_c=4, bwd_block_c=4))]
for batch, height, width, per_group, dtype, config in cases:
    triton_grid_scan.CONFIG.update(config)
    args = _inputs(batch, height, width, per_group, dtype=dtype)
    args.update(A=args["A"].float(), D=args["D"].float(), delta_bias=args["delta_bias"].float())
    dy = torch.randn(batch, height * width, 4 * per_group)
    got = grads(grid_scan.fused_scan, args, dy)
    ref = grads(lambda **a: grid_scan.reference(**a, backend="torch"), args, dy)
    for name, a, b in zip(["y", "u", "delta", "A", "B", "C", "D", "delta_bias"], got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
        key = (dtype, name)
        worst[key] = max(worst.get(key, 0.0), err)

# inference (no states kept for a backward), in several chunks
triton_grid_scan.CONFIG.update(fwd_block_t=16)
args = _inputs(2, 5, 7, 3, dtype=torch.float32)
args.update(A=args["A"].float(), D=args["D"].float(), delta_bias=args["delta_bias"].float())
with torch.no_grad():
    err = (grid_scan.fused_scan(**args) - grid_scan.reference(**args, backend="torch")).abs().max().item()
worst[(torch.float32, "y without grad")] = err

args = _inputs(2, 3, 4, 2, dtype=torch.float32)
tensors = [args[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
tensors = [t.float().requires_grad_() for t in tensors]
triton_grid_scan.CONFIG.update(fwd_block_t=16, bwd_block_t=16)
extra = (grid_scan._packed_codes(args["directions"]), 3, 4)
torch.library.opcheck(torch.ops.groupmamba_grid_scan.scan.default, (*tensors, *extra, 16))
torch.library.opcheck(torch.ops.groupmamba_grid_scan.scan.default, (*[t.detach() for t in tensors], *extra, 0))
# the fake kernels promise contiguous gradients: the real ones must deliver them
_, states = torch.ops.groupmamba_grid_scan.scan(*[t.detach() for t in tensors], *extra, 16)
torch.library.opcheck(torch.ops.groupmamba_grid_scan.scan_backward.default,
                      (torch.randn(2, 12, 8), *[t.detach() for t in tensors], states, *extra, 16))
print("WORST", worst)
for (dtype, name), err in worst.items():
    # half precision: du, ddelta, dB and dC are rounded like their inputs
    limit = 1e-5 if dtype == torch.float32 or name in ("y", "A", "D", "delta_bias") else 1e-2
    assert err < limit, (dtype, name, err)
"""


@pytest.mark.skipif(not grid_scan.HAS_TRITON, reason="triton is not installed")
@pytest.mark.slow
def test_triton_kernels_in_interpreter():
    run_in_triton_interpreter(_INTERPRETER_CHECK)


_LAYER_CHECK = r"""
import torch
from kernels import grid_scan
from models.groupmamba import GroupMambaLayer

# the interpreter runs the kernels on CPU tensors; let "grid" resolve there as on a GPU
resolve = grid_scan.resolve_backend
grid_scan.resolve_backend = lambda backend, device, *rest: "grid" if backend == "grid" else resolve(backend, device, *rest)
fused, calls = grid_scan.fused_scan, []
grid_scan.fused_scan = lambda *a, **k: calls.append(1) or fused(*a, **k)
x = torch.randn(2, 5 * 6, 32)
results = []
for backend in ("grid", "torch"):
    torch.manual_seed(0)
    layer = GroupMambaLayer(32, 32, scan_backend=backend)
    xx = x.clone().requires_grad_()
    out = layer(xx, 5, 6)
    out.square().mean().backward()
    results.append([out.detach(), xx.grad] + [p.grad for p in layer.parameters()])
worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() for a, b in zip(*results))
print("WORST", worst)
assert calls == [1], calls  # the grid layer ran the fused op once, the torch one never
assert worst < 1e-4, worst
"""


@pytest.mark.skipif(not grid_scan.HAS_TRITON, reason="triton is not installed")
@pytest.mark.slow
def test_layer_with_the_grid_backend_in_interpreter():
    """GroupMambaLayer(scan_backend="grid") runs the fused grid scan and matches the
    pure-PyTorch backend, forward and every gradient (the wiring the GPU runs)."""
    run_in_triton_interpreter(_LAYER_CHECK)


# --------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and grid_scan.HAS_TRITON),
                                reason="needs a CUDA GPU and Triton")


def _all_grads(fn, args, dy):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items() if torch.is_tensor(v)}
    y = fn(**{**args, **leaves})
    return [y] + list(torch.autograd.grad(y, list(leaves.values()), dy))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, size, per_group", [(4, 56, 16), (3, 28, 32), (2, 14, 87), (2, 7, 112), (1, 9, 5)])
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_matches_reference_on_gpu(dtype, batch, size, per_group, compiled):
    args = _inputs(batch, size, size, per_group, dtype=dtype, device="cuda")
    args.update(A=args["A"].float(), D=args["D"].float().cuda(), delta_bias=args["delta_bias"].float().cuda())
    dy = torch.randn(batch, size * size, 4 * per_group, device="cuda")
    if compiled:
        torch._dynamo.reset()  # one compile per case, not recompiles of one function up to the limit
    fused = torch.compile(grid_scan.fused_scan, fullgraph=True) if compiled else grid_scan.fused_scan
    got = _all_grads(fused, args, dy)
    ref = _all_grads(lambda **a: grid_scan.reference(**a, backend="torch"), args, dy)
    for name, a, b in zip(["y", "u", "delta", "A", "B", "C", "D", "delta_bias"], got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        # float32 math on both sides; bf16 gradients are rounded to bf16
        assert relative_error(a, b) < (1e-5 if dtype == torch.float32 else 1e-2), (name, relative_error(a, b))


@needs_cuda
def test_layer_with_the_grid_scan_and_the_sequence_scan():
    from models.groupmamba import GroupMambaLayer
    x = torch.randn(2, 14 * 14, 128, device="cuda")
    results = []
    for backend in ("grid", "triton"):
        torch.manual_seed(0)
        layer = GroupMambaLayer(128, 128, scan_backend=backend).cuda()
        results.append(grads_under_bf16_autocast(layer, x, compiled=backend == "grid"))
    (out_f, dx_f, g_f), (out_s, dx_s, g_s) = results
    assert relative_error(out_f, out_s) < 1e-2 and relative_error(dx_f, dx_s) < 2e-2
    for name in g_s:
        assert relative_error(g_f[name], g_s[name]) < 3e-2, name
