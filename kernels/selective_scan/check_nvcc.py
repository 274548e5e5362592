"""Compile the CUDA kernel sources with nvcc alone (no torch, no GPU needed).

    python kernels/selective_scan/check_nvcc.py [--archs 80,90] [--jobs 2]

Proves the ``csrc/*.cu`` files build for the given targets with the nvcc on PATH
(or ``$CUDA_HOME/bin/nvcc``), e.g. on a machine whose torch was built for another
CUDA major version, where ``pip install`` refuses. Prints ptxas's register, spill
and shared-memory report per kernel; exits non-zero if any file fails.
(The torch binding ``csrc/scan_api.cpp`` needs torch's headers and is only built by
setup.py.)
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def find_nvcc() -> str:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        nvcc = "/usr/local/cuda/bin/nvcc"
    if nvcc is None:
        raise FileNotFoundError("nvcc not found: put it on PATH or set CUDA_HOME")
    return nvcc


def nvcc_version(nvcc: str) -> str:
    text = subprocess.check_output([nvcc, "--version"], text=True)
    match = re.search(r"release (\d+\.\d+)", text)
    return match.group(1) if match else "unknown"


def compile_one(nvcc: str, source: str, archs, outdir: str):
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    obj = os.path.join(outdir, os.path.basename(source) + ".o")
    cmd = [nvcc, "-c", source, "-o", obj, "-O3", "-std=c++17", "-I", CSRC, "-Xptxas", "-v",
           "--compiler-options", "-fPIC", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return source, proc.returncode, proc.stdout + proc.stderr


def summarize(log: str):
    """(kernel, arch, registers, spill bytes, smem bytes) rows from ptxas -v output."""
    rows, kernel, arch = [], None, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            kernel, arch = m.group(1), m.group(2)
            spill = 0
            continue
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and kernel:
            spill = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m and kernel:
            smem = re.search(r"(\d+) bytes smem", line)
            rows.append((kernel, arch, int(m.group(1)), spill, int(smem.group(1)) if smem else 0))
            kernel = None
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--archs", default="80,90", help="compute capabilities, comma separated")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc runs")
    parser.add_argument("--quiet", action="store_true", help="no per-kernel report")
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    nvcc = find_nvcc()
    sources = sorted(os.path.join(CSRC, f) for f in os.listdir(CSRC) if f.endswith(".cu"))
    print(f"nvcc {nvcc_version(nvcc)} ({nvcc}); targets sm_{', sm_'.join(archs)} "
          f"+ compute_{archs[-1]} PTX; {len(sources)} files")
    failed = 0
    with tempfile.TemporaryDirectory() as outdir, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for source, rc, log in pool.map(lambda s: compile_one(nvcc, s, archs, outdir), sources):
            name = os.path.basename(source)
            if rc != 0:
                failed += 1
                print(f"FAIL {name}\n{log}")
                continue
            print(f"ok   {name}")
            if not args.quiet:
                for kernel, arch, regs, spill, smem in summarize(log):
                    short = re.sub(r"_ZN6gmscan\d+(\w+?)I.*", r"\1", kernel)
                    tmpl = re.search(r"I(\w+?)Li(\d+)ELb(\d)E", kernel)
                    desc = f"{short}<{tmpl.group(1)},{tmpl.group(2)},{tmpl.group(3)}>" if tmpl else short
                    print(f"       {arch} {desc:<40} regs {regs:3d} spill {spill:4d} B smem {smem:5d} B")
    print("all sources compiled" if not failed else f"{failed} file(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
