"""Build the selective-scan CUDA extension ``groupmamba_scan_cuda``.

    pip install --no-build-isolation ./kernels/selective_scan     # from the repo root
    python setup.py install                                         # inside this folder

``--no-build-isolation`` makes pip build against the torch you already have (an
isolated build would fetch another torch, possibly for another CUDA).

Targets: sm_80 and sm_90 machine code plus compute_90 PTX, which newer GPUs
JIT-compile. Override with ``GROUPMAMBA_CUDA_ARCHS="80;86;90"`` (the last one also
gets PTX). Needs nvcc of the same CUDA major version as ``torch.version.cuda``.
"""
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "groupmamba_scan_cuda"


def _fail(msg: str) -> None:
    bar = "=" * 78
    sys.stderr.write(f"\n{bar}\ngroupmamba_scan_cuda cannot be built:\n{msg}\n{bar}\n\n")
    sys.exit(1)


def _guess_cuda_home() -> None:
    """Set CUDA_HOME when torch's guess (two levels above `which nvcc`) has no headers.

    Some images put a wrapper script at /usr/local/bin/nvcc; torch would then look for
    the CUDA headers in /usr/local/include and fail with 'cuda_runtime_api.h: No such
    file or directory'.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [os.path.dirname(os.path.dirname(nvcc)),
                       os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    candidates += ["/usr/local/cuda"]
    for home in candidates:
        if (os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))
                and os.path.exists(os.path.join(home, "bin", "nvcc"))):
            if home != candidates[0]:
                print(f"[groupmamba_scan_cuda] using CUDA_HOME={home}")
                os.environ["CUDA_HOME"] = home
            return


_guess_cuda_home()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
except ImportError as exc:
    _fail(f"PyTorch is not importable ({exc}). Install torch first, then build with\n"
          "  pip install --no-build-isolation ./kernels/selective_scan")


def _nvcc_version(cuda_home: str) -> str:
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        text = subprocess.check_output([nvcc, "--version"], text=True, stderr=subprocess.STDOUT)
    except (OSError, subprocess.CalledProcessError) as exc:
        _fail(f"could not run {nvcc} --version ({exc}). Set CUDA_HOME to a CUDA toolkit.")
    match = re.search(r"release (\d+)\.(\d+)", text)
    if not match:
        _fail(f"could not read the CUDA version from `{nvcc} --version`:\n{text}")
    return f"{match.group(1)}.{match.group(2)}"


def _check_toolchain() -> None:
    if torch.version.cuda is None:
        _fail(f"torch {torch.__version__} is a CPU-only build, so there is no CUDA to build for.\n"
              "Install a CUDA build of torch (https://pytorch.org/get-started/locally/), or use the\n"
              "Triton backend (no build step) or the pure-PyTorch reference instead.")
    if CUDA_HOME is None:
        _fail("no CUDA toolkit found (nvcc). Install one whose major version matches torch's\n"
              f"CUDA {torch.version.cuda} and set CUDA_HOME to it (e.g. CUDA_HOME=/usr/local/cuda).")
    nvcc = _nvcc_version(CUDA_HOME)
    if nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
        want = torch.version.cuda.split(".")[0]
        have = nvcc.split(".")[0]
        _fail(f"torch {torch.__version__} was built with CUDA {torch.version.cuda}, but the nvcc at\n"
              f"{CUDA_HOME} is CUDA {nvcc}; torch refuses to build extensions across CUDA major\n"
              "versions. Either\n"
              f"  - install a torch built for CUDA {have}.x (pip install torch --index-url "
              f"https://download.pytorch.org/whl/cu{have}X, X = your minor version), or\n"
              f"  - point CUDA_HOME at a CUDA {want}.x toolkit: CUDA_HOME=/usr/local/cuda-{want}.x "
              "pip install --no-build-isolation ./kernels/selective_scan\n"
              "(`python kernels/selective_scan/check_nvcc.py` compiles the kernel sources with this\n"
              "nvcc alone, without torch, to check them.)")
    print(f"[groupmamba_scan_cuda] torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"nvcc {nvcc} at {CUDA_HOME}")


def _gencode_flags() -> list:
    archs = [a.strip().replace(".", "") for a in
             os.environ.get("GROUPMAMBA_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        _fail(f"GROUPMAMBA_CUDA_ARCHS={os.environ.get('GROUPMAMBA_CUDA_ARCHS')!r}: expected e.g. '80;90'")
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
    return flags


_NEEDS_BUILD = not any(arg in sys.argv for arg in ("--help", "-h", "--version", "clean", "egg_info",
                                                     "dist_info", "sdist"))
if _NEEDS_BUILD:
    _check_toolchain()

csrc = os.path.join("csrc")
sources = [os.path.join(csrc, name) for name in sorted(os.listdir(os.path.join(HERE, "csrc")))
           if name.endswith((".cu", ".cpp"))]

setup(
    name="groupmamba-scan-cuda",
    version="0.1.0",
    description="Selective-scan CUDA kernels for the GroupMamba toolkit (forward and backward)",
    packages=[],
    py_modules=[],
    ext_modules=[
        CUDAExtension(
            name=EXT_NAME,
            sources=sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={
                "cxx": ["-O3"],  # torch adds the -std= it needs (C++17 or C++20)
                "nvcc": ["-O3", "-lineinfo", "--threads", "2",
                         "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                         "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                         *_gencode_flags()],
            },
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
