"""The official small-config reference reproduced on the GPU with each scan backend.

Skipped without CUDA. TF32 is switched off, as in the reference run, so float32 on
the GPU must match to the same 1e-4 relative error as on the CPU.
"""
from __future__ import annotations

import pytest
import torch

from kernels.selective_scan import available_backends
from reference_data import NUMERICS_FILE, TOLERANCE, gradient_mismatches, rel_error, run_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def reference():
    if not NUMERICS_FILE.exists():
        pytest.skip(f"official reference outputs not available: {NUMERICS_FILE} is missing")
    return torch.load(NUMERICS_FILE, map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_reference_on_gpu(reference, backend):
    why = available_backends()[backend]
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")
    run = run_reference(reference, "cuda", backend)
    errors = {key: rel_error(run[key], reference[key]) for key in ("eval_logits", "train_head", "train_dist_head")}
    print(f"{backend}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert all(v < TOLERANCE for v in errors.values()), errors
    failures = gradient_mismatches(run["grads"], reference["grads"])
    assert not failures, "\n".join(failures)
