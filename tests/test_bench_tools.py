"""The benchmark scripts' bookkeeping (the GPU measurements themselves need a GPU):
time-to-accuracy figures from a metrics.csv, bench_model's options and headline keys."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_metrics(run: Path, rows: list[tuple]) -> None:
    """rows of (epoch, val_acc1, ema_val_acc1 or None, elapsed_s)."""
    run.mkdir(parents=True)
    with open(run / "metrics.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", "val_acc1", "ema_val_acc1", "elapsed_s", "epoch_time_s"])
        before = 0.0
        for epoch, val, ema, elapsed in rows:
            writer.writerow([epoch, val, "" if ema is None else ema, elapsed, elapsed - before])
            before = elapsed
    (run / "args.json").write_text(json.dumps({"run": {"command": "train.py --preset fast",
                                                       "device": "cuda:0"}}))


def test_time_to_accuracy_reads_first_epoch_at_target_and_best_in_budget(tmp_path):
    tta = load("time_to_accuracy")
    run = tmp_path / "run"
    # EMA reaches 95 first (epoch 3); the best within 300 s is epoch 4's 96.0
    write_metrics(run, [(1, 80.0, 70.0, 100.0), (2, 94.0, 94.9, 200.0), (3, 94.5, 95.0, 250.0),
                        (4, 96.0, 95.5, 299.0), (5, 97.0, None, 320.0)])
    out = tmp_path / "h200.json"
    out.write_text(json.dumps({"train_img_s_tiny_224_bs128": 1.0}))
    result = tta.main(["--from-run", str(run), "--json", str(out)])
    assert result["time_to_95_s"] == 250.0
    assert result["best_val_acc1_300s"] == pytest.approx(0.96)
    merged = json.loads(out.read_text())
    assert merged["train_img_s_tiny_224_bs128"] == 1.0  # other keys kept
    assert merged["time_to_accuracy"]["runs"][0]["epoch_reached_target"] == 3
    assert merged["time_to_accuracy"]["runs"][0]["command"] == "train.py --preset fast"
    assert merged["time_to_accuracy"]["first_epoch_overhead_s"] == 100.0 - 49.5  # over the median of the next ones


def test_time_to_accuracy_summarises_several_seeds(tmp_path):
    tta = load("time_to_accuracy")
    for name, at_target in (("a", 200.0), ("b", 260.0), ("c", None)):
        write_metrics(tmp_path / name, [(1, 90.0, None, 100.0), (2, 95.0 if at_target else 94.0, None,
                                                                   at_target or 250.0)])
    result = tta.main(["--from-run", *(str(tmp_path / n) for n in "abc")])
    assert result["time_to_95_s"] == {"values": [200.0, 260.0, None], "runs_without": 1, "mean": 230.0,
                                      "min": 200.0, "max": 260.0}
    assert result["best_val_acc1_300s"]["mean"] == pytest.approx((0.95 + 0.95 + 0.94) / 3, abs=1e-4)
    assert len(result["time_to_accuracy"]["runs"]) == 3


def test_time_to_accuracy_never_reached_and_bad_runs(tmp_path):
    tta = load("time_to_accuracy")
    run = tmp_path / "run"
    write_metrics(run, [(1, 50.0, None, 10.0), (2, 60.0, None, 20.0)])
    result = tta.main(["--from-run", str(run)])
    assert result["time_to_95_s"] is None and result["best_val_acc1_300s"] == pytest.approx(0.6)
    with pytest.raises(SystemExit, match="metrics.csv not found"):
        tta.main(["--from-run", str(tmp_path / "nowhere")])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.csv").write_text("epoch,val_acc1\n1,50\n")
    with pytest.raises(SystemExit, match="no elapsed_s"):
        tta.main(["--from-run", str(tmp_path / "old")])


def test_bench_model_headline_keys_come_from_groupmamba_tiny_rows():
    bench = load("bench_model")

    def row(model, size, batch, train, infer=None):
        r = {"model": model, "mode": "compile+cuda-graph", "img_size": size, "train_batch": batch,
             "train_img_s": train, "peak_train_mem_gib": train / 100, "launches_per_train_step": int(train)}
        return r if infer is None else {**r, "infer_img_s": infer}

    rows = [row("groupmamba_small", 224, 128, 700.0, 1000.0), row("groupmamba_tiny", 224, 128, 900.0, 1500.0),
            row("groupmamba_tiny", 160, 256, 1200.0)]
    keys = bench.headline(rows)
    assert keys["train_img_s_tiny_224_bs128"] == 900.0 and keys["headline_mode"] == "compile+cuda-graph"
    assert keys["peak_mem_gib_tiny_224_bs128"] == 9.0 and keys["launches_per_train_step_tiny"] == 900
    assert keys["infer_img_s_tiny_224_bs256"] == 1500.0 and keys["train_img_s_tiny_160_bs256"] == 1200.0
    assert bench.parse_args(["--extra-train", "128:64"]).extra_train == [(128, 64)]
    with pytest.raises(SystemExit):
        bench.parse_args(["--extra-train", "big"])


def test_bench_model_takes_train_py_speed_options(monkeypatch):
    bench = load("bench_model")
    args = bench.parse_args(["--compile", "--cuda-graph", "--low-memory", "--scan-backend", "grid"])
    assert (args.compile, args.cuda_graph, args.low_memory, args.scan_backend) == ("on", "on", True, "grid")
    assert (bench.parse_args([]).compile, bench.parse_args([]).cuda_graph) == ("off", "off")  # measures what it is asked
    monkeypatch.setenv("GROUPMAMBA_SCAN_BACKEND", "torch")
    assert bench.parse_args([]).scan_backend == "torch"  # flag, else the environment, else auto
    assert bench.parse_args(["--scan-backend", "cuda"]).scan_backend == "cuda"
    assert bench.mode_name(bench.SpeedPlan("grid", True, True, False)) == "compile+cuda-graph"
    assert bench.mode_name(bench.SpeedPlan("grid", False, False, True)) == "eager"


def test_bench_model_reads_inductor_settings():
    bench = load("bench_model")
    args = bench.parse_args(["--inductor-config", "padding_stride_threshold=256", "force_shape_pad=True"])
    assert args.inductor_config == {"padding_stride_threshold": 256, "force_shape_pad": True}
    assert bench.parse_args([]).inductor_config == {}
    for bad in ("no_such_setting=1", "padding_stride_threshold"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--inductor-config", bad])
    args = bench.parse_args(["--low-memory", "--dwconv-config", "rows_per_program=16", "row_warps=8"])
    assert args.dwconv_config == {"rows_per_program": 16, "row_warps": 8}
    with pytest.raises(SystemExit):
        bench.parse_args(["--dwconv-config", "rows_per_program"])


def test_bench_model_writes_every_kernel_and_skips_inference_when_asked(tmp_path, monkeypatch):
    """main()'s bookkeeping with the GPU measurements stubbed out: --kernels-json gets each
    row's kernel tables, --train-only leaves the inference part out."""
    bench = load("bench_model")
    table = [("gemm", 2.5, 3), ("triton_poi_fused_add", 0.5, 7)]
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda: "stub GPU")
    monkeypatch.setattr(bench.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench.torch.nn.Module, "cuda", lambda self: self)
    monkeypatch.setattr(bench, "speed_plan", lambda name, args: bench.SpeedPlan("torch", False, False, False))
    figures = {"train_img_s": 100.0, "peak_train_mem_gib": 1.0, "launches_per_train_step": 10}
    monkeypatch.setattr(bench, "measure_train", lambda *a: (dict(figures), table))
    monkeypatch.setattr(bench, "measure_infer", lambda *a: ({"infer_img_s": 400.0}, table[:1]))
    common = ["--extra-train", "--num-classes", "3"]

    out = tmp_path / "kernels.json"
    result = bench.main(common + ["--kernels-json", str(out)])
    assert result["rows"][0]["infer_img_s"] == 400.0 and result["rows"][0]["mode"] == "eager"
    written = json.loads(out.read_text())["rows"]
    assert [k["name"] for k in written[0]["train"]] == ["gemm", "triton_poi_fused_add"]
    assert written[0]["train"][1] == {"name": "triton_poi_fused_add", "ms": 0.5, "calls": 7}
    assert [k["name"] for k in written[0]["infer"]] == ["gemm"]

    result = bench.main(common + ["--train-only"])
    assert "infer_img_s" not in result["rows"][0] and result["rows"][0]["train_img_s"] == 100.0


def test_bench_dwconv_best_config_weighs_shapes_and_needs_all_of_them():
    bench = load("bench_dwconv")
    spec = {"rows_per_program": (8, 16)}

    def row(shape, rows, ms):
        return {"impl": "fused", "shape": shape, "config": {"rows_per_program": rows, "row_warps": 4},
                "fwd_ms": ms, "bwd_pre_ms": ms}

    # 16 rows: faster at stage 3 (weight 6), slower at stage 1 (weight 3): it wins
    rows = [row("stage1", 8, 1.0), row("stage3", 8, 1.0), row("stage1", 16, 1.5), row("stage3", 16, 0.5)]
    assert bench.best_config(rows, spec, ("fwd_ms", "bwd_pre_ms")) == {"rows_per_program": 16}
    # a configuration timed at one shape only cannot win on its smaller total
    rows = [row("stage1", 8, 1.0), row("stage3", 8, 1.0), row("stage1", 16, 0.1)]
    assert bench.best_config(rows, spec, ("fwd_ms", "bwd_pre_ms")) == {"rows_per_program": 8}
    assert bench.best_config(rows + [{"impl": "cudnn+gelu", "shape": "stage1", "fwd_ms": 0.01}],
                             spec, ("fwd_ms",)) == {"rows_per_program": 8}


def test_bench_fused_norm_times_what_the_model_computes():
    """The unfused side of the benchmark is the model's own computation (the fused ops'
    references, rounded as autocast rounds), and a machine without CUDA gets a message."""
    import torch
    from kernels import fused_norm

    bench = load("bench_fused_norm")
    torch.manual_seed(0)
    mixed, grid, gate = torch.randn(2, 9, 8).bfloat16(), torch.randn(2, 9, 8), torch.rand(2, 1, 8).bfloat16()
    scale, weight, bias = torch.tensor([0.9]), torch.randn(8), torch.randn(8)
    torch.testing.assert_close(
        bench.modulated_unfused(mixed, scale, grid, gate, weight, bias),
        fused_norm.modulated_layer_norm_reference(mixed, scale, grid, gate, weight, bias, 1e-5, torch.bfloat16))
    ys, z = torch.randn(2, 9, 4, 2), torch.randn(2, 9, 8).bfloat16()
    weight, bias = torch.randn(4, 2), torch.randn(4, 2)
    # the model rounds to bf16 twice more than the fused op (the affine result and the SiLU)
    torch.testing.assert_close(bench.gated_unfused(ys, z, weight, bias).float(),
                               fused_norm.gated_group_norm_reference(ys, z, weight, bias).float(),
                               rtol=2e-2, atol=2e-2)
    x, weight, bias = torch.randn(2, 9, 8), torch.randn(8), torch.randn(8)
    for got, expected in zip(bench.pooled_unfused(x, weight, bias),
                             fused_norm.pooled_layer_norm_reference(x, weight, bias)):
        torch.testing.assert_close(got, expected)
    x, branch, keep = torch.randn(2, 9, 8), torch.randn(2, 9, 8).bfloat16(), torch.tensor([0.0, 2.0])
    weight, bias = torch.randn(8), torch.randn(8)
    for got, expected in zip(bench.residual_unfused(x, branch, keep, weight, bias),
                             fused_norm.residual_layer_norm_reference(x, branch, keep, weight, bias, 1e-5,
                                                                      torch.bfloat16)):
        torch.testing.assert_close(got, expected)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            bench.main([])


def test_time_to_accuracy_cold_trains_with_an_empty_cache_it_removes_afterwards(tmp_path, monkeypatch):
    bench = load("time_to_accuracy")
    seen = {}

    def fake_run(command, check):
        cache = Path(command[command.index("--compile-cache") + 1])
        seen["empty"] = cache.is_dir() and not any(cache.iterdir())
        seen["cache"] = cache
        (cache / "graph.bin").write_bytes(b"0")  # what a compiling run leaves there
        write_metrics(Path(command[command.index("--output") + 1]), [(1, 96.0, None, 50.0)])

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    result = bench.main(["--cold", "--seed", "3", "--output", str(tmp_path / "run")])
    assert seen["empty"] and not seen["cache"].exists()
    assert result["time_to_accuracy"]["time_to_95_s"] == 50.0
