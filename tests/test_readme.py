"""The README's commands and its Python example, as a user would copy them.

Every ``python <script>`` command in a fenced ``bash`` block names a script of the
repository and only options that script's ``--help`` lists; the Python example runs
against a small checkpoint made here. Also the layout rules: the README and train.py stay
short, no function outside the kernels grows past 80 lines, and nothing speaks of the
project's development history.
"""
from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def script_commands() -> list[tuple[str, list[str]]]:
    """``(script, its arguments)`` for every python/torchrun command of the bash blocks."""
    commands = []
    for block in fenced_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0]
            for part in re.split(r"&&|\|\||;", line):
                words = shlex.split(part)
                scripts = [i for i, w in enumerate(words) if w.endswith((".py", ".sh"))]
                if words and words[0] in ("python", "python3", "torchrun", "bash") and scripts:
                    commands.append((words[scripts[0]], words[scripts[0] + 1:]))
    return commands


@lru_cache(maxsize=None)
def help_text(script: str) -> str:
    proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_readme_shows_the_commands_a_user_needs():
    scripts = {script for script, _ in script_commands()}
    assert {"mean_std.py", "makedata.py", "train.py", "test.py"} <= scripts
    text = README.read_text(encoding="utf-8")
    quick_start = fenced_blocks("bash")[:2]
    assert quick_start[0].strip().startswith("pip install -r requirements.txt")
    assert quick_start[1].strip() == "python -m pytest -q"
    for link in ("arxiv.org/abs/2407.13772", "github.com/Amshaker/GroupMamba", "blog.csdn.net"):
        assert link in text


@pytest.mark.parametrize("script, args", script_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_readme_command_names_a_script_and_its_options(script, args):
    assert (REPO / script).is_file(), script
    if script.endswith(".sh"):
        return
    listed = help_text(script)
    for word in args:
        option = word.split("=")[0]
        if option.startswith("--"):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", listed), f"{script} has no {option}"


def test_the_python_example_runs(tmp_path, monkeypatch):
    import timm
    from PIL import Image

    from utils.checkpoint import save_checkpoint
    (code,) = fenced_blocks("python")
    run = tmp_path / "runs" / "mine"
    run.mkdir(parents=True)
    model = timm.create_model("test_vit", num_classes=3)
    save_checkpoint({"model": model.state_dict(), "model_name": "test_vit", "model_kwargs": {"num_classes": 3},
                     "class_names": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.25] * 3, "img_size": 32},
                    run / "best.pth")
    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    printed = []
    exec(compile(code, "README.md", "exec"), {"print": lambda *a: printed.append(a)})
    (name, probability), = printed
    assert name in ("a", "b", "c") and 1 / 3 <= probability <= 1


# ----------------------------------------------------------------- layout rules

def tracked_python_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                           capture_output=True, text=True).stdout.split()
    return [REPO / n for n in names if (REPO / n).is_file()]


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the git checkout")
def test_short_files_and_functions():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250
    assert len((REPO / "train.py").read_text(encoding="utf-8").splitlines()) <= 350
    long = []
    for path in tracked_python_files():
        if path.relative_to(REPO).parts[0] == "kernels":
            continue  # Triton and CUDA kernels are long by nature
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not long, long


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the git checkout")
def test_the_product_speaks_of_the_product_only():
    # "[ ]" keeps this line itself from matching
    pattern = r"(first|second|third|fourth|fifth|[0-9]+(st|nd|rd|th)) session|issue [0-9]|device[ ]machine"
    proc = subprocess.run(["git", "grep", "--untracked", "-n", "-i", "-E", pattern, "--", "."], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.stdout == "", proc.stdout
