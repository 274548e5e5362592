"""train.py and test.py end to end, on CPU, with tiny images.

The scripts run as subprocesses (``sys.executable``, cwd = the repository root), as a
user would run them. The small data set is a few images per class copied from
``data1`` (or drawn here when data1 is absent). Most runs use timm's ``test_vit`` (a
0.3 M-parameter ViT) to stay fast; one end-to-end run uses groupmamba_tiny and is
skipped when the ``models`` package cannot build and train it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA1 = REPO / "data1"
# --stats names a file that does not exist, so runs do not depend on the checkout's
# stats.json (ImageNet's mean/std are used, with a message)
TINY = ["--model", "test_vit", "--img-size", "32", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--stats", str(REPO / "tests" / "absent-stats.json")]


def run(script: str, *args, timeout: int = 300, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    cmd = [sys.executable, script, *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output(proc)[-4000:]}"
    return proc


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------- data fixtures

def _make_source(root: Path, classes: int = 3, per_class: int = 12) -> Path:
    """root/<class>/<image>: copies from data1 when present, else drawn images."""
    root.mkdir(parents=True)
    names = sorted(p.name for p in DATA1.iterdir() if p.is_dir())[:classes] \
        if DATA1.is_dir() else []
    if len(names) == classes:
        for name in names:
            (root / name).mkdir()
            for src in sorted((DATA1 / name).iterdir())[:per_class]:
                shutil.copy(src, root / name / src.name)
        return root
    from PIL import Image, ImageDraw
    import random
    rng = random.Random(0)
    for c in range(classes):
        (root / f"class {c}").mkdir()
        for i in range(per_class):
            img = Image.new("RGB", (48, 48), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(img)
            x = rng.randrange(24)
            draw.ellipse([x, x, x + 16 + 4 * c, x + 16], fill=(40 * c, 255 - 60 * c, 90))
            img.save(root / f"class {c}" / f"img_{i:02d}.png")
    return root


def small_split(root: Path) -> Path:
    """root/data/{train,val}/<class>/: 8 train and 4 val images for each of 3 classes, split by hand."""
    source = _make_source(root / "images")
    data = root / "data"
    for cls in sorted(source.iterdir()):
        files = sorted(cls.iterdir())
        for part, chunk in (("train", files[:8]), ("val", files[8:12])):
            (data / part / cls.name).mkdir(parents=True, exist_ok=True)
            for f in chunk:
                shutil.copy(f, data / part / cls.name / f.name)
    return data


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return _make_source(tmp_path_factory.mktemp("src") / "images")


@pytest.fixture(scope="module")
def split(source, tmp_path_factory) -> Path:
    """data/train and data/val made by makedata.py (a manual split if it fails)."""
    dst = tmp_path_factory.mktemp("split") / "data"
    proc = run("makedata.py", "--src", source, "--dst", dst, "--no-progress")
    if proc.returncode != 0:  # keep train.py's tests independent of makedata.py
        for cls in sorted(p.name for p in source.iterdir()):
            files = sorted((source / cls).iterdir())
            for part, chunk in (("train", files[:8]), ("val", files[8:])):
                (dst / part / cls).mkdir(parents=True, exist_ok=True)
                for f in chunk:
                    shutil.copy(f, dst / part / cls / f.name)
    return dst


def copy_split(split: Path, dst: Path) -> Path:
    shutil.copytree(split, dst)
    return dst


# ----------------------------------------------------------------------- end to end

def _pipeline(tmp_path: Path, source: Path, model_args: list[str]) -> None:
    stats = tmp_path / "stats.json"
    ok(run("mean_std.py", "--root", source, "--out", stats, "--no-progress", "--workers", "0"))
    assert len(json.loads(stats.read_text())["mean"]) == 3
    data = tmp_path / "data"
    ok(run("makedata.py", "--src", source, "--dst", data, "--no-progress"))
    out = tmp_path / "run"
    # mixup on every batch, so the Mixup/SoftTargetCrossEntropy path certainly runs
    proc = ok(run("train.py", "--data", data, "--output", out, "--epochs", "1",
                  "--mixup-prob", "1.0", *TINY, "--stats", stats, *model_args))
    assert f"mean/std from {stats}" in output(proc)
    for name in ("args.json", "train.log", "metrics.csv", "curves.png", "last.pth", "best.pth",
                 "report.txt", "report.json", "confusion_matrix.png"):
        assert (out / name).is_file(), name
    ckpt = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["img_size"] == 32
    assert ckpt["class_names"] == sorted(p.name for p in source.iterdir())
    assert ckpt["model_ema"] is not None and ckpt["optimizer"] is not None
    assert ckpt["mean"] == pytest.approx(json.loads(stats.read_text())["mean"])
    best = torch.load(out / "best.pth", map_location="cpu", weights_only=True)
    assert best["best_source"] in ("model", "ema") and best["optimizer"] is None

    # continue to epoch 2: same folder, history kept
    ok(run("train.py", "--resume", out / "last.pth", "--epochs", "2"))
    rows = read_csv(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert torch.load(out / "last.pth", map_location="cpu", weights_only=True)["epoch"] == 2
    args = json.loads((out / "args.json").read_text())
    assert args["epochs"] == 2 and args["img_size"] == 32 and args["resume"]

    # predictions on the labelled val folder
    csv_path = tmp_path / "pred" / "val.csv"
    proc = ok(run("test.py", "--checkpoint", out / "best.pth", "--images", data / "val",
                  "--output", csv_path, "--workers", "0", "--device", "cpu"))
    rows = read_csv(csv_path)
    val_images = [p for p in (data / "val").rglob("*") if p.is_file()]
    assert len(rows) == len(val_images)
    assert {"file", "label", "correct", "predicted", "confidence", "class_1", "prob_1",
            "class_3", "prob_3", "error"} <= set(rows[0])
    assert "class_4" not in rows[0]  # top-5 of 3 classes is top-3
    assert all(r["predicted"] == r["class_1"] and not r["error"] for r in rows)
    assert "ACC1" in output(proc)
    for name in ("val_report.txt", "val_report.json", "val_confusion_matrix.png"):
        assert (csv_path.parent / name).is_file()
    report = json.loads((csv_path.parent / "val_report.json").read_text())
    assert report["num_samples"] == len(rows)


@pytest.mark.slow
def test_pipeline_tiny_timm_model(tmp_path, source):
    _pipeline(tmp_path, source, [])


def _groupmamba_usable() -> str | None:
    """None when groupmamba_tiny builds and trains one step on the CPU, else why not."""
    try:
        import timm
        import models  # noqa: F401

        model = timm.create_model("groupmamba_tiny", num_classes=3, scan_backend="auto")
        out = model(torch.randn(2, 3, 32, 32))
        loss = sum(o.sum() for o in (out if isinstance(out, tuple) else (out,)))
        loss.backward()
    except Exception as exc:  # the models package is developed alongside
        return f"groupmamba_tiny not usable yet: {type(exc).__name__}: {exc}"
    return None


@pytest.mark.slow
def test_pipeline_groupmamba(tmp_path, source):
    reason = _groupmamba_usable()
    if reason:
        pytest.skip(reason)
    _pipeline(tmp_path, source, ["--model", "groupmamba_tiny", "--scan-backend", "torch"])


@pytest.mark.slow
def test_ddp_torchrun_cpu(tmp_path, split):
    out = tmp_path / "ddp"
    proc = ok(run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  "train.py", "--data", split, "--output", out, "--epochs", "1",
                  *TINY, "--batch-size", "4", timeout=300))
    args = json.loads((out / "args.json").read_text())
    assert args["run"]["world_size"] == 2 and "Distributed" in args["run"]["mode"]
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 1 and float(rows[0]["val_acc1"]) >= 0
    ckpt = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert (out / "report.txt").is_file()
    assert "ImageNet mean/std" in output(proc)
    assert not (out / "run.lock").exists()  # rank 0 held it for both ranks and removed it



def test_ctrl_c_stops_a_cpu_run_within_seconds_and_keeps_last_pth(tmp_path, split):
    """SIGINT in the middle of a resumed run (checkpointed blocks, two DataLoader workers):
    exit code 130 within 5 s, the message, last.pth as it was."""
    out = tmp_path / "run"
    ok(run("train.py", "--data", split, "--output", out, "--epochs", "1", *TINY, timeout=120))
    before = (out / "last.pth").read_bytes()
    proc = subprocess.Popen([sys.executable, "train.py", "--resume", str(out), "--epochs", "1000",
                             "--max-train-batches", "1000", "--save-every", "1000", "--workers", "2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        lines = []
        while not any("steps/epoch" in line for line in lines):  # logged just before the first step
            lines.append(proc.stdout.readline())
            assert lines[-1] or proc.poll() is None, "".join(lines)
        time.sleep(2.0)  # inside the steps now
        assert proc.poll() is None, "".join(lines)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[0]
        seconds = time.monotonic() - start
    finally:
        proc.kill()
    assert proc.returncode == 130, "".join(lines) + rest
    assert seconds < 5.0 and "interrupted; the checkpoints written so far are intact" in rest, (seconds, rest)
    assert (out / "last.pth").read_bytes() == before


# ----------------------------------------------------------------------- train.py errors
# Bad-input checks call the scripts' main() in this process (loaded from their files):
# the same code path as the command line without paying for a fresh interpreter
# (importing torch and timm) each time. One check per script also runs as a
# subprocess to cover the exit code and the message a user sees.

def exits(main, argv, capsys) -> tuple[object, str]:
    """Run main(argv); return its exit code and everything it said."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    code = info.value.code
    return code, f"{code if isinstance(code, str) else ''}\n{captured.out}\n{captured.err}"


def train_fails(train_script, capsys, data: Path, out: Path, expect: str, *extra) -> str:
    code, text = exits(train_script.main, ["--data", data, "--output", out, "--epochs", "1",
                                           *TINY, *extra], capsys)
    assert code not in (0, None), text
    assert expect in text, text
    return text


def test_train_missing_folder_cli(tmp_path):
    proc = run("train.py", "--data", tmp_path / "nowhere", "--output", tmp_path / "out", *TINY)
    assert proc.returncode == 1, output(proc)
    assert "data folder not found" in proc.stderr and "Traceback" not in output(proc)
    assert not (tmp_path / "out").exists()  # inputs are checked before anything is written


def test_train_missing_split(train_script, capsys, tmp_path):
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    train_fails(train_script, capsys, tmp_path / "d", tmp_path / "out", "val folder not found")
    assert not (tmp_path / "out").exists()


def test_train_empty_class(train_script, capsys, tmp_path, split):
    data = copy_split(split, tmp_path / "data")
    (data / "train" / "Empty one").mkdir()
    (data / "val" / "Empty one").mkdir()
    train_fails(train_script, capsys, data, tmp_path / "out", "'Empty one'")


def test_train_class_mismatch(train_script, capsys, tmp_path, split):
    data = copy_split(split, tmp_path / "data")
    victim = sorted((data / "val").iterdir())[0]
    shutil.rmtree(victim)
    text = train_fails(train_script, capsys, data, tmp_path / "out", "different class folders")
    assert f"only in train: ['{victim.name}']" in text


def test_train_refuses_non_empty_output(train_script, capsys, tmp_path, split):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    train_fails(train_script, capsys, split, tmp_path / "out", "is not empty")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


def test_train_bad_arguments(train_script, capsys, tmp_path, split):
    out = tmp_path / "out"
    train_fails(train_script, capsys, split, out, "even --batch-size", "--batch-size", "7")
    train_fails(train_script, capsys, split, out, "fewer than --batch-size",
                "--batch-size", "4096")
    train_fails(train_script, capsys, split, out, "unknown model", "--model", "no_such_net")
    (tmp_path / "bad_stats.json").write_text('{"mean": [0.5, 0.5], "std": [0.2, 0.2]}')
    train_fails(train_script, capsys, split, out, "3 values", "--stats",
                tmp_path / "bad_stats.json")
    train_fails(train_script, capsys, split, out, "--pretrained file not found",
                "--pretrained", tmp_path / "nope.pth")
    train_fails(train_script, capsys, split, out, "scale", "--scale", "0.8", "0.2")
    train_fails(train_script, capsys, split, out, "rotate", "--rotate", "200")
    train_fails(train_script, capsys, split, out, "--save-every", "--save-every", "0")
    train_fails(train_script, capsys, split, out, "--time-limit", "--time-limit", "0")
    train_fails(train_script, capsys, split, out, "--fit-time-limit needs --time-limit",
                "--fit-time-limit")
    train_fails(train_script, capsys, split, out, "--transpose", "--transpose", "1.5")
    train_fails(train_script, capsys, split, out, "--val-batch-size", "--val-batch-size", "0")
    assert not out.exists()


def test_presets_set_defaults_and_flags_win(train_script):
    args, _ = train_script.parse_config(["--preset", "fast"])
    assert (args.img_size, args.batch_size, args.gpu_data, args.transpose) == (192, 64, "auto",
                                                                             0.5)
    assert args.val_batch_size == 256
    assert train_script.parse_config([])[0].val_batch_size == 64  # --batch-size
    args, _ = train_script.parse_config(["--preset", "fast", "--img-size", "128", "--compile"])
    assert args.img_size == 128 and args.compile == "on" and args.lr == 5e-4
    defaults = train_script.parse_config([])[0]
    assert (defaults.compile, defaults.cuda_graph, defaults.compile_cache) == ("auto", "auto", None)
    assert train_script.parse_config(["--compile", "off", "--cuda-graph"])[0].cuda_graph == "on"


def test_the_configuration_is_resolved_once_and_read_only(train_script):
    config, _ = train_script.parse_config(["--epochs", "3"])
    with pytest.raises(AttributeError, match="read-only"):
        config.epochs = 4
    assert config.epochs == 3 and vars(config)["epochs"] == 3


def test_scan_backend_flag_then_environment_then_auto(train_script, monkeypatch, capsys):
    from utils.config import choose_scan_backend
    monkeypatch.delenv("GROUPMAMBA_SCAN_BACKEND", raising=False)
    assert train_script.parse_config([])[0].scan_backend == "auto"
    monkeypatch.setenv("GROUPMAMBA_SCAN_BACKEND", "torch")
    assert train_script.parse_config([])[0].scan_backend == "torch"
    assert train_script.parse_config(["--scan-backend", "grid"])[0].scan_backend == "grid"
    assert choose_scan_backend(None, {"GROUPMAMBA_SCAN_BACKEND": " CUDA "}) == "cuda"
    assert choose_scan_backend("triton", {"GROUPMAMBA_SCAN_BACKEND": "cuda"}) == "triton"
    assert choose_scan_backend(None, {}) == "auto"
    monkeypatch.setenv("GROUPMAMBA_SCAN_BACKEND", "fast")
    with pytest.raises(SystemExit):
        train_script.parse_config([])
    assert "GROUPMAMBA_SCAN_BACKEND='fast'" in capsys.readouterr().err


def test_scan_backend_that_cannot_run_here_is_one_line(tmp_path, split):
    proc = run("train.py", "--data", split, "--output", tmp_path / "out", "--scan-backend", "grid", *TINY,
               "--model", "groupmamba_tiny")
    assert proc.returncode == 1 and "Traceback" not in output(proc), output(proc)
    assert "scan backend 'grid' needs a CUDA GPU" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_help_puts_what_a_user_needs_first():
    from utils.config import build_parser
    text = build_parser().format_help()
    groups = [line.rstrip(":") for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert groups[:5] == ["options", "data", "model", "schedule", "output"]
    assert groups.index("speed") > groups.index("augmentation") and groups[-2:] == ["expert", "examples"]
    assert text.index("--preset") < text.index("--epochs")
    for example in ("--preset quick", "--preset fast", "makedata.py --src my_images"):
        assert example in text.split("examples:")[1]
    assert not any(word in text for word in ("H100", "H200", "img/s", "GiB", "session"))


def test_save_every_and_time_limit(train_script, tmp_path, split, monkeypatch):
    """--save-every 2 writes last.pth at epochs 2 and 3 (the end) and the best weights
    with them; --time-limit stops after the first epoch that passes it."""
    saved = []
    real_save = train_script.save_checkpoint

    def recording_save(state, path):
        saved.append((Path(path).name, state["epoch"]))
        return real_save(state, path)

    import utils.checkpoint
    monkeypatch.setattr(train_script, "save_checkpoint", recording_save)
    monkeypatch.setattr(utils.checkpoint, "save_checkpoint", recording_save)  # best.pth: through save_best
    out = tmp_path / "every2"
    train_script.main([str(a) for a in ("--data", split, "--output", out, "--epochs", "3",
                                        "--save-every", "2", *TINY)])
    assert [e for name, e in saved if name == "last.pth"] == [2, 3]
    # best weights (a snapshot of their epoch) go to disk only just before a last.pth
    names = [name for name, _ in saved]
    assert names[-1] == "last.pth" and "best.pth" in names
    assert all(names[i + 1] == "last.pth" for i, n in enumerate(names) if n == "best.pth")
    rows = read_csv(out / "metrics.csv")
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert len(rows) == 3 and elapsed == sorted(elapsed) and elapsed[0] > 0
    best = torch.load(out / "best.pth", map_location="cpu", weights_only=True)
    assert best["epoch"] == int(rows[-1]["best_epoch"])

    saved.clear()
    out = tmp_path / "limited"
    train_script.main([str(a) for a in ("--data", split, "--output", out, "--epochs", "3",
                                        "--save-every", "5", "--time-limit", "1e-6", *TINY)])
    assert len(read_csv(out / "metrics.csv")) == 1
    assert ("last.pth", 1) in saved and ("best.pth", 1) in saved
    assert (out / "report.txt").is_file()


@pytest.mark.slow
def test_train_skips_corrupt_images_and_stops_on_nan(train_script, capsys, tmp_path, split):
    data = copy_split(split, tmp_path / "data")
    cls = sorted((data / "train").iterdir())[0]
    (cls / "garbage.jpg").write_bytes(b"this is not a jpeg")
    good = next(p for p in sorted(cls.iterdir()) if p.name != "garbage.jpg")
    (cls / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    out = tmp_path / "run"
    train_script.main([str(a) for a in ("--data", data, "--output", out, "--epochs", "1",
                                        "--ema-decay", "0", *TINY)])
    assert "skipped 2 file(s)" in capsys.readouterr().out
    listed = (out / "skipped_images.txt").read_text()
    assert "garbage.jpg" in listed and "truncated.jpg" in listed

    # a NaN loss stops with a message naming epoch and step; last.pth stays as it was
    before = (out / "last.pth").read_bytes()
    code, text = exits(train_script.main, ["--resume", out, "--epochs", "2", "--lr", "1e30",
                                           "--warmup-epochs", "0"], capsys)
    assert code == 1, text
    assert "at epoch 2, step" in text and "last good checkpoint" in text, text
    assert (out / "last.pth").read_bytes() == before
    # resuming a run that is already complete says so
    code, text = exits(train_script.main, ["--resume", out / "last.pth", "--epochs", "1"],
                       capsys)
    assert code and "already trained 1 epochs" in text


# ----------------------------------------------------------------------- test.py

@pytest.fixture(scope="module")
def trained(split, tmp_path_factory, train_script) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    train_script.main([str(a) for a in ("--data", split, "--output", out, "--epochs", "1",
                                        "--ema-decay", "0", *TINY)])
    return out / "best.pth"


def test_predict_unlabelled_with_unreadable(test_script, capsys, tmp_path, trained, split):
    folder = tmp_path / "imgs"
    folder.mkdir()
    some = sorted(p for p in (split / "val").rglob("*") if p.is_file())[:3]
    for i, f in enumerate(some):
        shutil.copy(f, folder / f"{i}{f.suffix}")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    csv_path = tmp_path / "p.csv"
    base = ["--checkpoint", trained, "--workers", "0", "--device", "cpu"]
    code, text = exits(test_script.main, base + ["--images", folder, "--output", csv_path],
                       capsys)
    assert code == 0, text
    rows = read_csv(csv_path)
    assert len(rows) == 4 and "label" not in rows[0]
    broken = [r for r in rows if r["file"].endswith("broken.png")][0]
    assert broken["error"] and not broken["predicted"]
    assert "could not be read" in text
    assert not (tmp_path / "p_report.txt").exists()
    # an existing CSV is not overwritten without --force
    code, text = exits(test_script.main, base + ["--images", folder, "--output", csv_path],
                       capsys)
    assert code == 2 and "--force" in text
    # one file, and a glob
    code, text = exits(test_script.main, base + ["--images", some[0], "--output",
                                                 tmp_path / "one.csv"], capsys)
    assert code == 0 and len(read_csv(tmp_path / "one.csv")) == 1
    code, text = exits(test_script.main, base + [
        "--images", folder / "[0-9].*", "--output", tmp_path / "glob.csv",
        "--weights", "model"], capsys)
    assert code == 0 and len(read_csv(tmp_path / "glob.csv")) == 3
    # only unreadable images: exit 1
    code, text = exits(test_script.main, base + ["--images", folder / "broken.png",
                                                 "--output", tmp_path / "bad.csv"], capsys)
    assert code == 1


def test_predict_bad_checkpoint_cli(tmp_path, split):
    bare = tmp_path / "bare.pth"
    torch.save({"model": {"w": torch.zeros(2)}}, bare)
    proc = run("test.py", "--checkpoint", bare, "--images", split / "val",
               "--output", tmp_path / "x.csv")
    assert proc.returncode == 2, output(proc)
    assert "does not look like a checkpoint written by train.py" in proc.stderr
    assert "Traceback" not in output(proc)


def test_predict_bad_checkpoints(test_script, capsys, tmp_path, trained, split):
    def fails(ckpt, expect, *extra):
        code, text = exits(test_script.main, ["--checkpoint", ckpt, "--images", split / "val",
                                              "--output", tmp_path / "x.csv", *extra], capsys)
        assert code == 2, text
        assert expect in text, text
        assert not (tmp_path / "x.csv").exists()

    fails(tmp_path / "missing.pth", "checkpoint not found")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    fails(tmp_path / "junk.pth", "cannot load")
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    torch.save(dict(ckpt, model_name="test_resnet"), tmp_path / "other.pth")
    fails(tmp_path / "other.pth", "do not match")
    torch.save(dict(ckpt, class_names=ckpt["class_names"][:-1]), tmp_path / "classes.pth")
    fails(tmp_path / "classes.pth", "class names but the model has")
    fails(trained, "no EMA weights", "--ema")  # trained with --ema-decay 0
    fails(trained, "--images not found", "--images", tmp_path / "nope")


# ----------------------------------------------------------------------- units

def test_topk_with_few_classes():
    from utils.metrics import topk_hits

    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert topk_hits(logits, torch.tensor([1, 2]), (1, 5)).tolist() == [1.0, 2.0]


def reference_rate(step: int, total: int, warmup: int, lr: float, min_lr: float, ratio: float = 0.01) -> float:
    """The schedule in closed form: linear warm-up from ratio * lr, then cosine to min_lr."""
    if step < warmup:
        return lr * (ratio + (1.0 - ratio) * step / warmup)
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def _rates(sched, opt, steps: int, first: int = 0) -> list[float]:
    rates = []
    for step in range(first, first + steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step_update(step + 1)
    return rates


@pytest.mark.parametrize("total, warmup, lr, min_lr", [(100, 10, 1.0, 0.0), (1000, 50, 5e-4, 1e-6),
                                                        (37, 18, 2e-3, 1e-6), (20, 0, 1e-3, 1e-5)])
def test_schedule_is_timms_cosine_with_warmup_as_written(total, warmup, lr, min_lr):
    """timm's CosineLRScheduler, stepped per update, gives the closed form at every step."""
    from utils.optim import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(opt, total_steps=total, warmup_steps=warmup, lr=lr, min_lr=min_lr)
    rates = _rates(sched, opt, total + 3)
    for step, rate in enumerate(rates):
        assert abs(rate - reference_rate(step, total, warmup, lr, min_lr)) <= 1e-9, step
    if total == 100:
        assert rates[0] == pytest.approx(0.01) and rates[10] == pytest.approx(1.0)
        assert rates[55] == pytest.approx(0.5) and rates[100] == pytest.approx(0.0, abs=1e-9)
        assert all(rates[i] >= rates[i + 1] for i in range(10, 100))


def test_set_schedule_length_shortens_a_running_cosine():
    from utils.optim import build_scheduler, set_schedule_length

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, total_steps=100, warmup_steps=10, lr=1.0, min_lr=0.0)
    _rates(sched, opt, 40)
    before = opt.param_groups[0]["lr"]
    set_schedule_length(sched, total_steps=50, warmup_steps=10, lr=1.0, min_lr=0.0, step=40)
    assert opt.param_groups[0]["lr"] == pytest.approx(reference_rate(40, 50, 10, 1.0, 0.0), abs=1e-9)
    rates = _rates(sched, opt, 10, first=40)  # steps 41.. of 50: late in the new cosine, well below the old curve
    assert rates[1] < 0.2 < 0.7 < before
    assert all(abs(r - reference_rate(40 + i, 50, 10, 1.0, 0.0)) <= 1e-9 for i, r in enumerate(rates))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_epochs_within_limit():
    from utils.optim import epochs_within_limit
    rows = [{"epoch": 1, "epoch_time_s": 100.0, "elapsed_s": 100.0}]
    assert epochs_within_limit(rows, 300) is None  # only the compiling epoch
    rows += [{"epoch": 2, "epoch_time_s": 2.0, "elapsed_s": 102.0},
             {"epoch": 3, "epoch_time_s": 3.0, "elapsed_s": 105.0},
             {"epoch": 4, "epoch_time_s": 2.0, "elapsed_s": 107.0}]
    # median 2 s an epoch, 193 s left: 96 more epochs
    assert epochs_within_limit(rows, 300) == 4 + 96
    assert epochs_within_limit(rows, 100) == 4  # past the limit: none more


def test_fit_time_limit_ends_the_run_and_schedule_early(train_script, tmp_path, split,
                                                        monkeypatch):
    """--fit-time-limit lowers --epochs to what fits and the lr reaches --min-lr there."""
    fits = lambda history, limit: 3 if len(history) >= 2 else None  # noqa: E731
    monkeypatch.setattr(train_script, "epochs_within_limit", fits)
    out = tmp_path / "fit"
    train_script.main([str(a) for a in ("--data", split, "--output", out, "--epochs", "8",
                                        "--time-limit", "1000", "--fit-time-limit",
                                        "--warmup-epochs", "0", "--min-lr", "0", *TINY)])
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["lr"]) == pytest.approx(0.0, abs=1e-9)
    assert "3 epochs fit into 1000 s" in (out / "train.log").read_text()
    ckpt = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["args"]["epochs"] == 3


def test_to_cpu_snapshot_is_not_aliased():
    from utils.checkpoint import to_cpu

    weights = torch.zeros(3)
    snap = to_cpu({"model": {"w": weights}, "epoch": 4, "names": ["a"]})
    weights += 1
    assert torch.equal(snap["model"]["w"], torch.zeros(3))
    assert snap["epoch"] == 4 and snap["names"] == ["a"]


def test_checkpoint_atomic_and_weights_only(tmp_path):
    from utils.checkpoint import load_checkpoint, save_checkpoint, to_plain
    import argparse

    state = {"model": {"w": torch.ones(3)}, "args": to_plain(argparse.Namespace(
        p=Path("x"), t=(1, 2)))}
    save_checkpoint(state, tmp_path / "c.pth")
    assert list(tmp_path.iterdir()) == [tmp_path / "c.pth"]  # no temp file left
    loaded = load_checkpoint(tmp_path / "c.pth", ("model",))
    assert loaded["args"] == {"p": "x", "t": [1, 2]}


def test_resume_is_exact(train_script, capsys, tmp_path, split, monkeypatch):
    """Stopped after epoch 1 and resumed == trained 2 epochs without a break."""
    common = ["--data", split, "--epochs", "2", "--warmup-epochs", "0.5", "--mixup-prob", "0.5",
              "--ema-decay", "0.99", *TINY]
    train_script.main([str(a) for a in common + ["--output", tmp_path / "straight"]])

    real = train_script.train_one_epoch

    def stop_at_epoch_2(*args, **kwargs):
        if args[7] == 2:  # the epoch argument
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_script, "train_one_epoch", stop_at_epoch_2)
    code, text = exits(train_script.main,
                       common + ["--output", tmp_path / "broken"], capsys)
    assert code == 130 and "interrupted; the checkpoints written so far are intact" in text
    monkeypatch.setattr(train_script, "train_one_epoch", real)
    train_script.main([str(a) for a in ["--resume", tmp_path / "broken" / "last.pth"]])

    a = torch.load(tmp_path / "straight" / "last.pth", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "broken" / "last.pth", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"]
    for key in ("model", "model_ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    assert read_csv(tmp_path / "straight" / "metrics.csv")[1]["train_loss"] == \
        read_csv(tmp_path / "broken" / "metrics.csv")[1]["train_loss"]


def test_compile_flag_compiles_regions_of_model_and_ema(train_script, tmp_path, split,
                                                        monkeypatch):
    """--compile compiles the blocks of the model and of its EMA in place (recorded by a
    stand-in for nn.Module.compile), validation runs at one static batch size, and the
    checkpoint keys stay plain."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kwargs: compiled.append((self, kwargs)))
    static_batches = []
    real_validate = train_script.validate

    def spy_validate(*args, **kwargs):
        static_batches.append(args[7] if len(args) > 7 else kwargs.get("static_batch"))
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(train_script, "validate", spy_validate)
    out = tmp_path / "compiled"
    train_script.main([str(a) for a in ("--data", split, "--output", out, "--epochs", "1",
                                        "--compile", *TINY)])
    # test_vit has 6 blocks; model and EMA each get theirs compiled, static shapes
    padded = {"dynamic": False, "options": {"force_shape_pad": True}}  # the default
    assert len(compiled) == 12 and all(kw == padded for _, kw in compiled)
    assert len({id(module) for module, _ in compiled}) == 12
    assert static_batches == [8, 8]  # raw and EMA validation, padded to --batch-size
    ckpt = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])


def test_validate_pads_the_last_batch_to_a_static_size():
    from utils.amp import Precision
    from utils.distributed import DistEnv
    from utils.engine import pad_batch, validate
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return x.flatten(1)[:, :3] * torch.tensor([1.0, 2.0, 3.0])

    images = torch.rand(5, 1, 2, 2)
    labels = torch.tensor([0, 1, 2, 2, 1])
    loader = [(images[:2], labels[:2]), (images[2:4], labels[2:4]), (images[4:], labels[4:])]
    env = DistEnv(device=torch.device("cpu"))
    precision = Precision("off", torch.device("cpu"))
    plain = validate(Probe(), loader, precision, env, 3)
    assert seen == [2, 2, 1]
    seen.clear()
    padded = validate(Probe(), loader, precision, env, 3, static_batch=2)
    assert seen == [2, 2, 2] and padded == plain  # the padding's outputs are dropped
    assert pad_batch(images, 7).shape == (7, 1, 2, 2) and pad_batch(images, 7)[5:].abs().sum() == 0
    assert pad_batch(images, None) is images and pad_batch(images, 3) is images


def test_low_memory_needs_a_groupmamba_model(train_script, capsys):
    assert train_script.parse_config(["--low-memory"])[0].low_memory
    with pytest.raises(SystemExit):
        train_script.parse_config(["--model", "resnet18", "--low-memory"])
    assert "GroupMamba models only" in capsys.readouterr().err
