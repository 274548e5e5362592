"""Every Triton kernel of the project compiles for A100 (sm_80) and H100/H200 (sm_90), on any machine.

Triton's CPU interpreter (the other CPU tests) runs the kernels' Python, not
Triton's compiler, so it misses what only the compiler rejects (types, layouts,
constexpr use). Here each kernel goes through the real pipeline down to PTX for
``GPUTarget("cuda", 80 and 90, 32)`` with the launch settings the project ships; that
needs the ``triton`` package, not a GPU. Runs in a subprocess because the kernel
modules check for a GPU at import (patched there).
"""
import importlib.util

import pytest

from subprocesses import run_python

_COMPILE_ALL = r"""
import torch
torch.cuda.is_available = lambda: True  # the kernel modules refuse to import without a GPU
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.depthwise_conv import triton_dwconv
from kernels.grid_scan import triton_grid_scan
from kernels.selective_scan import triton_scan

TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
HALF = ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "du_ptr", "ddelta_ptr", "x_ptr", "dy_ptr", "out_ptr", "h_ptr",
        "g_ptr", "dx_ptr")


def compile_ptx(kernel, constexprs, warps, float32_ptrs=()):
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if name in HALF and name not in float32_ptrs else "*fp32"
        else:
            signature[name] = "i32"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    for target in TARGETS:
        compiled = triton.compile(source, target=target, options={"num_warps": warps})
        assert ".entry " + kernel.__name__ in compiled.asm["ptx"], kernel.__name__
        print("compiled", kernel.__name__, constexprs, "for sm", target.arch)


grid = triton_grid_scan.CONFIG
for save in (True, False):
    compile_ptx(triton_grid_scan._grid_fwd_kernel, dict(BLOCK_T=grid["fwd_block_t"], BLOCK_C=grid["fwd_block_c"],
                                                       SAVE_STATES=save), grid["fwd_warps"])
for atomic in (True, False):
    compile_ptx(triton_grid_scan._grid_bwd_kernel,
                dict(BLOCK_T=grid["bwd_block_t"], BLOCK_C=grid["bwd_block_c"], ATOMIC_BC=atomic), grid["bwd_warps"],
                float32_ptrs=("dB_ptr", "dC_ptr") if atomic else ())

flags = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True)
for length in (3136, 196):
    for kind, kernel, config in (("fwd", triton_scan._scan_fwd_kernel, triton_scan.fwd_config(length, 1, 64)),
                                 ("bwd", triton_scan._scan_bwd_kernel, triton_scan.bwd_config(length, 1, 16))):
        compile_ptx(kernel, dict(flags, CPB=config.cpb, NP=1, BLOCK_L=config.block_l), config.num_warps)

dw = triton_dwconv.CONFIG
for backward, store_h in ((False, False), (True, False), (True, True)):
    compile_ptx(triton_dwconv._conv_rows_kernel,
                dict(HAS_BIAS=True, ACT=triton_dwconv.ACTIVATIONS["gelu"], BACKWARD=backward, STORE_H=store_h,
                     ROWS=dw["rows_per_program"], BLOCK_W=dw["row_block_w"], BLOCK_C=dw["row_block_c"]),
                dw["row_warps"])
compile_ptx(triton_dwconv._bwd_input_weight_kernel,
            dict(BLOCK_W=dw["reduction_block_w"], BLOCK_C=dw["reduction_block_c"]), dw["reduction_warps"])
print("ALL COMPILED")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_every_triton_kernel_compiles_for_sm80_and_sm90():
    proc = run_python(_COMPILE_ALL)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr.lower()):
        pytest.skip("this Triton has no ptxas to compile with")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "ALL COMPILED" in proc.stdout
