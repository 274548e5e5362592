"""The official small-config reference reproduced on the GPU with each scan backend,
and compiled regions against eager code.

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


@pytest.mark.parametrize("backend, fused_kernels", [("torch", False), ("triton", False), ("cuda", False),
                                                 ("grid", False), ("grid", True)])
def test_reference_on_gpu(reference, backend, fused_kernels):
    """Each scan backend; with ``fused_kernels`` the fused conv and norm kernels too."""
    why = available_backends()["triton" if backend == "grid" else backend]
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")
    run = run_reference(reference, "cuda", backend, fused_kernels)
    errors = {key: rel_error(run[key], reference[key]) for key in ("eval_logits", "train_head", "train_dist_head")}
    print(f"{backend}, fused kernels {fused_kernels}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert all(v < TOLERANCE for v in errors.values()), errors
    failures = gradient_mismatches(run["grads"], reference["grads"])
    assert not failures, "\n".join(failures)



def _loss_and_grads(module, inputs, weights):
    """``sum(module(*inputs) * weights)``, its input gradient and every parameter's."""
    module.zero_grad(set_to_none=True)
    x = inputs[0].clone().requires_grad_()
    out = module(x, *inputs[1:])
    (out.float() * weights).sum().backward()
    # torch.compile(module) names its parameters "_orig_mod.<name>"
    return out.float(), x.grad.float(), {n.removeprefix("_orig_mod."): p.grad.float()
                                         for n, p in module.named_parameters()}


def test_padded_matmuls_keep_a_stage3_block_gradients():
    """compile_blocks' matmul padding (force_shape_pad) on groupmamba_tiny's 348-channel
    stage-3 block under bf16 autocast, as in training: output, input and parameter
    gradients no further from eager than compiled without padding."""
    from models.groupmamba import GroupMambaBlock
    torch.manual_seed(0)
    block = GroupMambaBlock(348, 4).cuda()
    inputs = (torch.randn(8, 14 * 14, 348, device="cuda"), 14, 14)
    weights = torch.randn(8, 14 * 14, 348, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = _loss_and_grads(block, inputs, weights)
    errors = {}
    for pad in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(block, dynamic=False, options={"force_shape_pad": pad})
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, dx, grads = _loss_and_grads(compiled, inputs, weights)
        errors[pad] = {"out": rel_error(out, eager[0]), "dx": rel_error(dx, eager[1]),
                       **{n: rel_error(g, eager[2][n]) for n, g in grads.items()}}
    pairs = {k: (round(v, 4), round(errors[False][k], 4)) for k, v in errors[True].items()}
    print(f"relative errors against eager, padded / unpadded: {pairs}")
    worse = {k: pair for k, pair in pairs.items() if pair[0] > 2 * pair[1] + 1e-2}
    # bf16 rounding differs between fused and eager kernels alike; a wrong GEMM is off by O(1)
    assert not worse, worse


def _step_gradients(model, images, labels):
    """One bf16-autocast training step's loss and every parameter's gradient."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16):
        out = model(images)
    heads = out if isinstance(out, tuple) else (out,)  # train mode: class and distillation heads
    loss = sum(torch.nn.functional.cross_entropy(h.float(), labels) for h in heads) / len(heads)
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_groupmamba_step_matches_eager():
    """groupmamba_tiny with its regions compiled as train.py --compile does (matmul
    padding on): one bf16 training step gives eager code's loss and gradients, up to
    bf16 rounding (a broken graph is off by orders of magnitude: gradient norms of
    ~1e6 against ~8 in a diverged run)."""
    from copy import deepcopy

    import models
    from utils.accel import compile_blocks
    torch.manual_seed(0)
    eager = models.create_model("groupmamba_tiny", num_classes=12, drop_path_rate=0.0).cuda()
    compiled = deepcopy(eager)
    torch._dynamo.reset()
    compile_blocks(compiled, dynamic=False)
    images = torch.randn(16, 3, 96, 96, device="cuda")
    labels = torch.randint(0, 12, (16,), device="cuda")
    loss, grads = _step_gradients(eager, images, labels)
    got_loss, got_grads = _step_gradients(compiled, images, labels)
    norm = torch.stack([g.norm() for g in grads.values()]).norm().item()
    got_norm = torch.stack([g.norm() for g in got_grads.values()]).norm().item()
    errors = sorted(((rel_error(got_grads[n], g), n) for n, g in grads.items()
                     if g.norm() > 1e-3 * norm), reverse=True)
    print(f"loss {got_loss:.5f} / eager {loss:.5f}, gradient norm {got_norm:.4g} / {norm:.4g}, "
          f"worst parameters {[(n, round(e, 4)) for e, n in errors[:5]]}")
    assert sorted(got_grads) == sorted(grads)
    assert abs(got_loss - loss) < 2e-2 * abs(loss)
    assert 0.9 < got_norm / norm < 1.1
    assert errors[len(errors) // 2][0] < 5e-2, "median parameter's gradient off"
