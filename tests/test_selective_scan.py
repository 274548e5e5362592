"""Selective scan: the vectorised reference against a step-by-step oracle, and the dispatcher."""
from __future__ import annotations

import warnings

import pytest
import torch

from kernels.selective_scan import (
    BackendUnavailableError,
    available_backends,
    resolve_backend,
    selective_scan_fn,
)
from kernels.selective_scan._ops import output_dtype
from kernels.selective_scan.reference import selective_scan_ref
from tests.scan_oracle import sequential_scan

NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def make_inputs(batch, dim, length, n_state, groups, *, with_D=True, with_bias=True,
                softplus=False, delta_max=1.0, a_range=(0.1, 2.0), dtype=torch.float64, seed=0):
    """Random scan inputs as a dict keyed by argument name.

    Without softplus, delta (and the bias) are drawn non-negative, as the model
    guarantees; A is drawn in ``-a_range``.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    lo, hi = a_range
    inputs = {
        "u": randn(batch, dim, length),
        "delta": randn(batch, dim, length) if softplus else rand(batch, dim, length) * delta_max,
        "A": -(lo + (hi - lo) * rand(dim, n_state)),
        "B": randn(batch, groups, n_state, length),
        "C": randn(batch, groups, n_state, length),
        "D": randn(dim) if with_D else None,
        "delta_bias": (randn(dim) if softplus else 0.5 * rand(dim)) if with_bias else None,
    }
    return {k: (v.to(dtype) if v is not None else None) for k, v in inputs.items()}


def leaves(inputs):
    """Fresh leaf copies that require grad (None stays None)."""
    return {k: (v.detach().clone().requires_grad_(True) if v is not None else None)
            for k, v in inputs.items()}


def value_and_grads(fn, inputs, softplus, weight):
    """Forward ``fn`` and the gradients of ``sum(weight * y)`` w.r.t. every tensor input."""
    x = leaves(inputs)
    y = fn(*(x[k] for k in NAMES), delta_softplus=softplus)
    names = [k for k in NAMES if x[k] is not None]
    grads = torch.autograd.grad((y * weight).sum(), [x[k] for k in names])
    return y, dict(zip(names, grads))


def torch_backend(*args, delta_softplus):
    return selective_scan_fn(*args, delta_softplus=delta_softplus, backend="torch")


def assert_matches_oracle(inputs, softplus, rtol, atol, fn=torch_backend):
    """Forward and all gradients of ``fn`` against the float64 sequential oracle."""
    u = inputs["u"]
    weight = torch.randn(u.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, grads = value_and_grads(fn, inputs, softplus, weight.to(output_dtype(u)))
    y_ref, grads_ref = value_and_grads(sequential_scan, inputs, softplus, weight)
    assert y.shape == u.shape and y.dtype == output_dtype(u)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y_ref.double(), rtol=rtol, atol=atol)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert torch.isfinite(grads[name]).all(), f"non-finite grad of {name}"
        torch.testing.assert_close(grads[name].double(), grads_ref[name].double(), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


# (batch, D, L, N, G, with_D, with_bias, softplus)
ORACLE_CASES = {
    "L37": (2, 4, 37, 1, 1, True, True, True),
    "L1": (2, 3, 1, 1, 1, True, True, False),
    "L2": (1, 2, 2, 2, 1, True, False, True),
    "L129_oddD": (1, 5, 129, 1, 1, False, True, False),
    "oddD_G3_N2_L67": (2, 9, 67, 2, 3, True, True, True),
    "G2_N4_L50": (2, 6, 50, 4, 2, False, False, False),
    "G_equals_D_L33": (1, 4, 33, 3, 4, True, False, False),
    "bare_L96": (2, 3, 96, 1, 1, False, False, False),
    "L200_N2": (1, 4, 200, 2, 2, True, True, True),
}


@pytest.mark.parametrize("case", list(ORACLE_CASES), ids=list(ORACLE_CASES))
def test_matches_oracle_float64(case):
    batch, dim, length, n_state, groups, with_D, with_bias, softplus = ORACLE_CASES[case]
    inputs = make_inputs(batch, dim, length, n_state, groups, with_D=with_D,
                         with_bias=with_bias, softplus=softplus)
    assert_matches_oracle(inputs, softplus, rtol=1e-10, atol=1e-12)


def test_reference_handles_different_groups_for_B_and_C():
    # the dispatcher rejects this (the kernels share one G), the reference copes
    inputs = make_inputs(2, 6, 21, 2, 3)
    inputs["C"] = make_inputs(2, 6, 21, 2, 2, seed=5)["C"]
    assert_matches_oracle(inputs, False, rtol=1e-10, atol=1e-12, fn=selective_scan_ref)


@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-9, 1e-10),
                                             (torch.float32, 1e-4, 1e-4)])
def test_large_delta_is_finite_and_accurate(dtype, rtol, atol, softplus):
    # delta * A down to -1000 per step: a scan that exponentiates a growing
    # cumulative sum overflows at once
    inputs = make_inputs(2, 4, 151, 2, 2, softplus=softplus, delta_max=50.0,
                         a_range=(0.01, 20.0), dtype=dtype, seed=3)
    if softplus:
        inputs["delta"] = inputs["delta"] * 25.0  # softplus(x) ~ x up to ~50
    assert_matches_oracle(inputs, softplus, rtol=rtol, atol=atol)


def test_long_sequence_with_strong_decay_is_finite():
    # cumulative log-decay reaches -50000; only products of decays <= 1 are safe here
    inputs = make_inputs(1, 2, 5000, 1, 1, delta_max=10.0, a_range=(1.0, 10.0), dtype=torch.float32)
    x = leaves(inputs)
    y = selective_scan_fn(*(x[k] for k in NAMES), backend="torch")
    y.square().sum().backward()
    assert torch.isfinite(y).all()
    for name in NAMES:
        assert torch.isfinite(x[name].grad).all(), name


def test_gradcheck_small():
    inputs = make_inputs(1, 4, 7, 2, 2, softplus=True, seed=7)
    x = leaves(inputs)

    def fn(*args):
        return selective_scan_fn(*args, delta_softplus=True, backend="torch")

    assert torch.autograd.gradcheck(fn, tuple(x[k] for k in NAMES))


def test_empty_sequence():
    x = leaves(make_inputs(2, 3, 0, 1, 1))
    y = selective_scan_fn(*(x[k] for k in NAMES), backend="torch")
    assert y.shape == (2, 3, 0)
    y.sum().backward()
    assert x["A"].grad.abs().sum() == 0


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("a_dtype", ["low", "float32"])
def test_low_precision_inputs_compute_in_float32(low, a_dtype):
    inputs = make_inputs(2, 6, 211, 2, 2, softplus=True, dtype=torch.float32, seed=11)
    cast = {k: (v.to(low) if v is not None else None) for k, v in inputs.items()}
    if a_dtype == "float32":  # A is usually a float32 parameter under autocast
        cast["A"] = inputs["A"]
    x = leaves(cast)
    y = selective_scan_fn(*(x[k] for k in NAMES), delta_softplus=True, backend="torch")
    assert y.dtype == torch.float32  # not rounded to the inputs' dtype
    # exact math on the very same (rounded) inputs: only float32 noise is left
    y_exact = sequential_scan(*(cast[k] for k in NAMES), delta_softplus=True)
    scale = y_exact.abs().max().item()
    torch.testing.assert_close(y.double(), y_exact, rtol=1e-5, atol=1e-6 * scale)
    y.sum().backward()
    for name in NAMES:
        assert x[name].grad.dtype == cast[name].dtype, name
        assert torch.isfinite(x[name].grad.float()).all(), name


# ---------------------------------------------------------------------------------
# dispatcher
# ---------------------------------------------------------------------------------

def small_args(**overrides):
    inputs = make_inputs(2, 4, 9, 2, 2, dtype=torch.float32, seed=13)
    inputs.update(overrides)
    return tuple(inputs[k] for k in NAMES)


def test_torch_backend_equals_reference():
    args = small_args()
    y = selective_scan_fn(*args, delta_softplus=True, backend="torch")
    torch.testing.assert_close(y, selective_scan_ref(*args, True), rtol=0, atol=0)
    torch.testing.assert_close(y.double(), sequential_scan(*args, delta_softplus=True),
                               rtol=1e-5, atol=1e-5)


def test_unknown_backend_is_value_error():
    with pytest.raises(ValueError, match="unknown selective-scan backend 'mamba'"):
        selective_scan_fn(*small_args(), backend="mamba")


def _bad(name, shape):
    return {name: torch.zeros(shape)}


BAD_SHAPES = {
    "u_2d": (_bad("u", (2, 4)), "u must be \\(batch, D, L\\)"),
    "delta_mismatch": (_bad("delta", (2, 4, 8)), "delta must match u"),
    "A_wrong_D": (_bad("A", (3, 2)), "A must be \\(D=4, N\\)"),
    "B_wrong_N": (_bad("B", (2, 2, 3, 9)), "B must be \\(batch=2, G, N=2, L=9\\)"),
    "C_wrong_L": (_bad("C", (2, 2, 2, 8)), "C must be \\(batch=2, G, N=2, L=9\\)"),
    "C_wrong_batch": (_bad("C", (1, 2, 2, 9)), "C must be"),
    "G_not_dividing": (_bad("B", (2, 3, 2, 9)), "G=3 groups, which must divide D=4"),
    "G_zero": (_bad("B", (2, 0, 2, 9)), "must divide D=4"),
    "B_C_groups_differ": ({"B": torch.zeros(2, 1, 2, 9)}, "B and C must have the same number of groups"),
    "D_wrong": (_bad("D", (5,)), "D must be \\(4,\\)"),
    "delta_bias_wrong": (_bad("delta_bias", (4, 1)), "delta_bias must be \\(4,\\)"),
}


@pytest.mark.parametrize("case", list(BAD_SHAPES), ids=list(BAD_SHAPES))
def test_bad_shapes_are_value_errors(case):
    overrides, message = BAD_SHAPES[case]
    with pytest.raises(ValueError, match=message):
        selective_scan_fn(*small_args(**overrides), backend="torch")


FIX_COMMANDS = {
    "triton": "pip install 'triton>=3.0'",
    "cuda": "pip install --no-build-isolation ./kernels/selective_scan",
}


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_explicit_gpu_backend_on_cpu_says_how_to_fix(name):
    with pytest.raises(BackendUnavailableError) as info:
        selective_scan_fn(*small_args(), backend=name)
    message = str(info.value)
    assert f"'{name}'" in message
    if available_backends()[name] is not None:  # not importable: install it
        assert f"Fix: {FIX_COMMANDS[name]}" in message
    else:  # importable, but these are CPU tensors
        assert "Fix: move the tensors to a CUDA device, or pass backend='torch'" in message


def test_the_kernels_never_read_the_environment(monkeypatch):
    """The scripts choose the backend (flag, then GROUPMAMBA_SCAN_BACKEND, then auto:
    utils.config.choose_scan_backend) and pass it down; the kernels take it as given."""
    monkeypatch.setenv("GROUPMAMBA_SCAN_BACKEND", "cuda")
    args = small_args()
    assert resolve_backend("auto", args[0].device) == "torch"
    torch.testing.assert_close(selective_scan_fn(*args), selective_scan_ref(*args, False), rtol=0, atol=0)


def test_auto_on_cpu_is_reference_without_warning():
    args = small_args()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", args[0].device) == "torch"
        y = selective_scan_fn(*args, delta_softplus=True)
    torch.testing.assert_close(y, selective_scan_ref(*args, True), rtol=0, atol=0)


def test_auto_on_cpu_works_in_a_fresh_process():
    """``auto`` must load the reference itself, not rely on an earlier import of it."""
    import subprocess
    import sys
    code = ("import torch; from kernels.selective_scan import selective_scan_fn as f; "
            "u = torch.randn(1, 2, 5); y = f(u, u.abs(), -torch.ones(2, 1), torch.randn(1, 1, 1, 5), "
            "torch.randn(1, 1, 1, 5)); print(tuple(y.shape))")
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 2, 5)"
