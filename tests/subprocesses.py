"""Running the scripts and snippets of Python from the tests (not a test module).

Used where a test needs its own process: Triton's CPU interpreter is switched on
by an environment variable read at import, and the GPU import guards of the
kernel modules are checked or patched before anything imports them.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
    """The repository's ``<name>.py`` loaded as a module (its ``main`` called in-process)."""
    spec = importlib.util.spec_from_file_location(f"_{name}_script", Path(ROOT) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_python(code: str, env_extra: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -c code`` in the repository root, the repository and ``tests`` on ``PYTHONPATH``."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def run_in_triton_interpreter(code: str) -> str:
    """``code`` under ``TRITON_INTERPRET=1``; it must exit 0 and print ``WORST`` (its largest error)."""
    proc = run_python(code, {"TRITON_INTERPRET": "1"})
    if proc.returncode != 0 and "only 0-dimensional arrays can be converted" in proc.stderr:
        # seen with triton 3.6 + numpy 2.5: the interpreter turns a runtime int into a
        # 1-element array that newer NumPy refuses to convert to a Python int in range()
        pytest.skip("this Triton's CPU interpreter is incompatible with this NumPy")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WORST" in proc.stdout
    return proc.stdout
