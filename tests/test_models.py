"""GroupMamba model: official keys/shapes/counts, reference numerics, timm API, checkpoint loading.

CPU only; images are kept small (32-96 px) because the reference scan runs on the CPU.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

import models
from models import GroupMamba, checkpoint_filter_fn, from_sequence, load_pretrained, ss2d, to_sequence
from models.csms6s import SCAN_DIRECTIONS
from models.ss2d import can_batch
from reference_data import NUMERICS_FILE, SHAPES_FILE, TOLERANCE, gradient_mismatches, rel_error, run_reference

VARIANTS = ("groupmamba_tiny", "groupmamba_small", "groupmamba_base")
PARAM_COUNTS = {"groupmamba_tiny": 23_361_917, "groupmamba_small": 34_781_555, "groupmamba_base": 57_150_838}

# a model small enough to build and run in well under a second
SMALL_CONFIG = dict(stem_hidden_dim=16, embed_dims=[32, 64, 92, 128], mlp_ratios=[2, 2, 2, 2], depths=[1, 1, 2, 1])
LAYER_NORM_1E6 = functools.partial(nn.LayerNorm, eps=1e-6)


def small_model(**kwargs) -> GroupMamba:
    kwargs = {"num_classes": 1000, "norm_layer": LAYER_NORM_1E6, **SMALL_CONFIG, **kwargs}
    return GroupMamba(**kwargs)


@functools.lru_cache(maxsize=None)
def meta_model(name: str) -> nn.Module:
    """A released variant as released (1000 classes, distillation), shapes only: no memory, no init."""
    with torch.device("meta"):
        return timm.create_model(name, num_classes=1000, distillation=True)


def randomize(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))


def assert_same_weights(a: dict, b: dict, skip_prefixes=()) -> None:
    for key, value in a.items():
        if not key.startswith(skip_prefixes):
            assert torch.equal(value, b[key]), key


# ----------------------------------------------------------------- structure vs the release

@pytest.fixture(scope="module")
def official_shapes() -> dict:
    if not SHAPES_FILE.exists():
        pytest.skip(f"official shapes not available: {SHAPES_FILE} is missing")
    return json.loads(SHAPES_FILE.read_text())


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_matches_release(name, official_shapes):
    model = meta_model(name)
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    expected = official_shapes[name]
    assert sorted(set(expected) - set(ours)) == [], "keys missing from our model"
    assert sorted(set(ours) - set(expected)) == [], "keys the release does not have"
    assert ours == expected
    assert list(ours) == list(expected), "same keys, different order"


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_count(name):
    model = meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


# ----------------------------------------------------------------- numerics vs the release

@pytest.fixture(scope="module")
def reference():
    if not NUMERICS_FILE.exists():
        pytest.skip(f"official reference outputs not available: {NUMERICS_FILE} is missing")
    return torch.load(NUMERICS_FILE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference_run(reference):
    return run_reference(reference, "cpu", "torch")


@pytest.mark.parametrize("output", ["eval_logits", "train_head", "train_dist_head"])
def test_logits_match_release(reference, reference_run, output):
    assert reference_run[output].shape == reference[output].shape
    assert rel_error(reference_run[output], reference[output]) < TOLERANCE


def test_every_gradient_matches_release(reference, reference_run):
    failures = gradient_mismatches(reference_run["grads"], reference["grads"])
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------- scan orders

@pytest.mark.parametrize("direction", SCAN_DIRECTIONS)
def test_scan_order_round_trip_on_non_square_map(direction):
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    sequence = to_sequence(x, direction)
    assert sequence.shape == (2, 3, 20)
    assert torch.equal(from_sequence(sequence, direction, 4, 5), x)


def test_scan_orders_read_the_map_as_documented():
    x = torch.arange(6.0).view(1, 1, 2, 3)  # [[0, 1, 2], [3, 4, 5]]
    read = {direction: to_sequence(x, direction).flatten().tolist() for direction in SCAN_DIRECTIONS}
    assert read == {
        "row": [0, 1, 2, 3, 4, 5],
        "col": [0, 3, 1, 4, 2, 5],
        "row_reversed": [5, 4, 3, 2, 1, 0],
        "col_reversed": [5, 2, 4, 1, 3, 0],
    }


def test_unknown_scan_direction_is_a_value_error():
    with pytest.raises(ValueError, match="scan direction"):
        models.SS2D(8, direction="diagonal")


def test_non_square_input_runs_forward_and_backward():
    model = small_model(num_classes=5).train()
    head, dist_head = model(torch.randn(2, 3, 64, 96))
    (head.sum() + dist_head.sum()).backward()
    assert head.shape == dist_head.shape == (2, 5)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("linear", ["batched", "block_diagonal"])
def test_batched_groups_equal_per_group_scans(monkeypatch, linear):
    """The one batched pipeline per layer computes what the four SS2Ds do one by one,
    with either way of running the per-group projections (the GPU's block-diagonal
    GEMM is forced here on the CPU)."""
    monkeypatch.setattr(ss2d, "_grouped_linear", getattr(ss2d, f"_{linear}_linear"))
    model = small_model(num_classes=5).double().train()
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    results = []
    for batched in (False, True):
        for layer in model.modules():
            if isinstance(layer, models.GroupMambaLayer):
                layer.batch_groups = batched
        model.zero_grad()
        head, dist_head = model(images)
        (head.sum() + dist_head.sum()).backward()
        results.append((head.detach(), dist_head.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (head0, dist0, grads0), (head1, dist1, grads1) = results
    assert torch.allclose(head1, head0, rtol=1e-10, atol=1e-12)
    assert torch.allclose(dist1, dist0, rtol=1e-10, atol=1e-12)
    for name, grad in grads0.items():
        assert torch.allclose(grads1[name], grad, rtol=1e-8, atol=1e-12), name


def test_grouped_linear_ways_agree_with_per_group_linears():
    torch.manual_seed(0)
    weights = [torch.randn(7, 5, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    biases = [torch.randn(7, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    x = torch.randn(2, 3, 20, dtype=torch.float64, requires_grad=True)
    per_group = [nn.functional.linear(g, w, b) for g, w, b in zip(x.chunk(4, -1), weights, biases)]
    expected = [torch.cat([out[..., lo:hi] for out in per_group], -1) for lo, hi in ((0, 2), (2, 3), (3, 7))]
    for linear in (ss2d._batched_linear, ss2d._block_diagonal_linear):
        got = linear(x, weights, [2, 1, 4], biases)
        assert [t.shape for t in got] == [(2, 3, 8), (2, 3, 4), (2, 3, 16)]
        for g, e in zip(got, expected):
            assert torch.allclose(g, e, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, *wb: torch.cat(ss2d._block_diagonal_linear(x, wb[:4], [2, 1, 4],
                                                                                          wb[4:]), -1),
                                    (x, *weights, *biases))


def test_grouped_ss2d_falls_back_without_conv():
    scans = [models.SS2D(8, d_conv=1, direction=direction) for direction in SCAN_DIRECTIONS]
    assert not can_batch(scans)
    assert can_batch([models.SS2D(8, direction=direction) for direction in SCAN_DIRECTIONS])


# ----------------------------------------------------------------- timm API

@pytest.fixture(scope="module")
def tiny12():
    torch.manual_seed(0)
    return timm.create_model("groupmamba_tiny", num_classes=12)


def test_variants_are_registered_with_timm():
    assert set(VARIANTS) <= set(timm.list_models("groupmamba_*"))
    assert set(models.list_models()) >= set(VARIANTS)


def test_timm_create_model_with_12_classes(tiny12):
    assert isinstance(tiny12, GroupMamba)
    assert tiny12.num_classes == 12
    assert tiny12.head.out_features == tiny12.dist_head.out_features == 12
    cfg = tiny12.pretrained_cfg
    assert cfg is tiny12.default_cfg
    assert cfg["architecture"] == "groupmamba_tiny" and cfg["input_size"] == (3, 224, 224)
    assert tuple(cfg["classifier"]) == ("head", "dist_head")


def test_forward_shapes(tiny12):
    images = torch.randn(2, 3, 32, 32)
    tiny12.eval()
    with torch.inference_mode():
        features = tiny12.forward_features(images)
        assert features.shape == (2, tiny12.num_features) == (2, 448)
        assert tiny12.forward_head(features, pre_logits=True).shape == (2, 448)
        logits = tiny12(images)
    assert logits.shape == (2, 12)
    tiny12.train()
    with torch.no_grad():
        head, dist_head = tiny12(images)
    assert head.shape == dist_head.shape == (2, 12)


def test_eval_output_is_mean_of_both_heads():
    model = small_model(num_classes=7).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(images)
        expected = (model.head(features) + model.dist_head(features)) / 2
        assert torch.allclose(model(images), expected, atol=1e-6)


def test_models_create_model_wrapper():
    with torch.device("meta"):
        model = models.create_model("groupmamba_tiny", num_classes=3, distillation=False, drop_path_rate=0.1,
                                    scan_backend="torch")
    assert model.num_classes == 3 and not hasattr(model, "dist_head")
    assert all(m.scan_backend == "torch" for m in model.modules() if isinstance(m, models.SS2D))


def test_one_create_model_for_every_timm_name():
    with pytest.raises(models.ModelConfigError, match="similar names: .*groupmamba_tiny"):
        models.create_model("groupmamba_tin")
    with pytest.raises(models.ModelConfigError, match="does not accept"):
        models.create_model("groupmamba_tiny", no_such_argument=1)
    with pytest.raises(ValueError, match="unknown scan backend"):
        models.create_model("groupmamba_tiny", scan_backend="fast")
    with torch.device("meta"):  # GroupMamba's own options are ignored by other models
        resnet = models.create_model("resnet18", num_classes=3, scan_backend="torch", fused_kernels=True)
    assert resnet.fc.out_features == 3


def test_load_pretrained_fits_any_timm_model_and_refuses_other_heads_for_inference(tmp_path):
    source = timm.create_model("resnet18", num_classes=10)
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    model = timm.create_model("resnet18", num_classes=3)
    fresh_fc = model.fc.weight.clone()
    info = load_pretrained(model, path)
    assert info.source == "state_dict" and info.stripped_prefixes == ["module."]
    assert sorted(info.reinitialized) == ["fc.bias", "fc.weight"] and torch.equal(model.fc.weight, fresh_fc)
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    with pytest.raises(models.CheckpointError, match="shape mismatches.*fc.weight"):
        load_pretrained(model, path, reset_head=False)
    with pytest.raises(models.CheckpointError, match="checkpoint not found"):
        load_pretrained(model, tmp_path / "absent.pth")


def test_without_distillation_there_is_one_head():
    model = small_model(num_classes=4, distillation=False)
    assert not hasattr(model, "dist_head")
    assert "dist_head.weight" not in model.state_dict()
    images = torch.randn(2, 3, 32, 32)
    assert model.train()(images).shape == (2, 4)
    with torch.no_grad():
        assert model.eval()(images).shape == (2, 4)


def test_reset_classifier():
    model = small_model(num_classes=1000)
    model.reset_classifier(5)
    assert model.num_classes == 5
    assert model.head.out_features == model.dist_head.out_features == 5
    assert torch.count_nonzero(model.head.bias) == 0  # freshly initialised
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    model.reset_classifier(0)
    assert isinstance(model.head, nn.Identity)
    with pytest.raises(ValueError):
        model.reset_classifier(-1)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        GroupMamba(embed_dims=[30, 64, 92, 128], **{k: v for k, v in SMALL_CONFIG.items() if k != "embed_dims"})
    with pytest.raises(ValueError, match="one entry per stage"):
        GroupMamba(**{**SMALL_CONFIG, "depths": [1, 1, 1]})


def test_no_weight_decay_lists_ssm_parameters():
    names = small_model().no_weight_decay()
    assert "block1.0.attn.mamba_g1.A_logs" in names and "block1.0.attn.mamba_g4.Ds" in names
    assert all(name.endswith(("A_logs", "Ds")) for name in names)


# ----------------------------------------------------------------- loading outside weights

@pytest.fixture(scope="module")
def source_1000():
    """A 1000-class small-config model with every weight randomised (so heads are distinguishable)."""
    model = small_model(num_classes=1000)
    randomize(model, seed=1)
    return model.state_dict()


def test_1000_class_checkpoint_into_12_class_model(tmp_path, source_1000, caplog):
    path = tmp_path / "release.pth"
    torch.save(source_1000, path)
    model = small_model(num_classes=12)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="models.groupmamba"):
        info = load_pretrained(model, path)
    assert "different class count" in caplog.text and "head" in caplog.text
    assert sorted(info.reinitialized) == ["dist_head.bias", "dist_head.weight", "head.bias", "head.weight"]
    assert "re-initialised dist_head, head" in str(info)
    loaded = model.state_dict()
    assert_same_weights(source_1000, loaded, skip_prefixes=("head.", "dist_head."))
    for key in info.reinitialized:
        assert torch.equal(loaded[key], fresh[key])  # the model's own fresh head is kept


def test_same_class_count_loads_everything(source_1000):
    model = small_model(num_classes=1000)
    info = load_pretrained(model, source_1000)
    assert info.reinitialized == [] and info.source == "bare"
    assert_same_weights(source_1000, model.state_dict())


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_prefixes_are_stripped(tmp_path, source_1000, prefix):
    path = tmp_path / "prefixed.pth"
    torch.save({prefix + key: value for key, value in source_1000.items()}, path)
    model = small_model(num_classes=1000)
    info = load_pretrained(model, path)
    assert set(info.stripped_prefixes) == set(p + "." for p in prefix.split(".") if p)
    assert_same_weights(source_1000, model.state_dict())


def test_our_training_checkpoint(tmp_path, source_1000):
    path = tmp_path / "best.pth"
    checkpoint = {"model": source_1000, "epoch": 3, "class_names": ["a", "b"],
                  "args": {"lr": 0.1}, "namespace": argparse.Namespace(lr=0.1)}
    torch.save(checkpoint, path)
    model = small_model(num_classes=1000)
    info = load_pretrained(model, path)
    assert info.source == "model" and info.metadata["class_names"] == ["a", "b"]
    assert_same_weights(source_1000, model.state_dict())


def test_model_is_preferred_over_model_ema(source_1000):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in source_1000.items()}
    model = small_model(num_classes=1000)
    assert load_pretrained(model, {"model": source_1000, "model_ema": ema}).source == "model"
    assert_same_weights(source_1000, model.state_dict())
    assert load_pretrained(model, {"model_ema": ema, "optimizer": {}}).source == "model_ema"
    assert_same_weights(ema, model.state_dict())


def test_dist_head_is_dropped_for_a_model_without_one(source_1000, caplog):
    model = small_model(num_classes=1000, distillation=False)
    with caplog.at_level(logging.WARNING, logger="models.groupmamba"):
        info = load_pretrained(model, source_1000)
    assert sorted(info.dropped) == ["dist_head.bias", "dist_head.weight"]
    assert "dist_head" in caplog.text
    assert_same_weights(model.state_dict(), source_1000)


def test_checkpoint_filter_fn_is_timm_compatible(source_1000):
    model = small_model(num_classes=12)
    filtered = checkpoint_filter_fn({"model": {"module." + k: v for k, v in source_1000.items()}}, model)
    model.load_state_dict(filtered, strict=True)


def test_resnet_checkpoint_is_rejected_with_keys_listed():
    torchvision = pytest.importorskip("torchvision")
    resnet = torchvision.models.resnet18().state_dict()
    model = small_model(num_classes=1000)
    with pytest.raises(ValueError) as error:
        load_pretrained(model, resnet)
    message = str(error.value)
    assert "missing keys" in message and "unexpected keys" in message
    assert "layer1.0.conv1.weight" in message and "patch_embed1.conv.0.weight" in message
    assert "GroupMamba checkpoint" in message


def test_other_variant_is_rejected_with_keys_listed():
    small, tiny = meta_model("groupmamba_small"), meta_model("groupmamba_tiny")
    with pytest.raises(ValueError) as error:
        checkpoint_filter_fn(small.state_dict(), tiny)
    message = str(error.value)
    assert "shape mismatches" in message and "patch_embed1.conv.0.weight" in message
    assert "unexpected keys" in message and "block3.9." in message
    assert "different GroupMamba variant" in message


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": {}, "obj": functools.partial(print)}, path)
    with pytest.raises(models.CheckpointError, match="weights_only=True"):
        load_pretrained(small_model(), path)


def test_strict_false_reports_missing_keys(source_1000):
    partial_state = {k: v for k, v in source_1000.items() if not k.startswith("post_network.")}
    model = small_model(num_classes=1000)
    with pytest.raises(ValueError, match="missing keys"):
        load_pretrained(model, partial_state)
    info = load_pretrained(model, partial_state, strict=False)
    assert info.missing and all(key.startswith("post_network.") for key in info.missing)


def test_stochastic_depth_rate_is_a_buffer_outside_the_state_dict():
    from models.groupmamba import StochasticDepth
    model = small_model(num_classes=3, drop_path_rate=0.2)
    rates = [float(m.rate) for m in model.modules() if isinstance(m, StochasticDepth)]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)
    assert not any(key.endswith("drop_path.rate") for key in model.state_dict())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        StochasticDepth(1.0)


def test_stochastic_depth_drops_whole_samples_and_keeps_the_mean():
    from models.groupmamba import StochasticDepth
    torch.manual_seed(0)
    drop = StochasticDepth(0.25)
    x = torch.ones(20000, 3, 2)
    y = drop(x)
    per_sample = y.flatten(1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1))
    assert (per_sample[:, 0] == 0).float().mean() == pytest.approx(0.25, abs=0.02)
    assert y.mean() == pytest.approx(1.0, abs=0.03)
    assert drop.eval()(x) is x and StochasticDepth(0.0)(x) is x


def test_compile_blocks_compiles_regions_in_place(monkeypatch):
    from utils.accel import compile_blocks
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(kw))
    with torch.device("meta"):
        model = models.create_model("groupmamba_tiny", num_classes=3)
    keys = list(model.state_dict())
    names = compile_blocks(model, dynamic=False)
    assert names[:2] == ["patch_embed1", "block1.0"] and names[-1] == "post_network.0"
    assert len(names) == 4 + sum(model.depths) + 1
    # inductor pads every matmul to multiples of 8
    assert compiled == [{"dynamic": False, "options": {"force_shape_pad": True}}] * len(names)
    assert list(model.state_dict()) == keys
    compiled.clear()
    compile_blocks(model, dynamic=False, mode="max-autotune")  # torch.compile takes a mode or options
    assert {str(kw) for kw in compiled} == {str({"dynamic": False, "mode": "max-autotune"})}
    compiled.clear()
    compile_blocks(model, dynamic=False, backend="aot_eager")  # padding is an inductor option
    assert {str(kw) for kw in compiled} == {str({"dynamic": False, "backend": "aot_eager"})}
    import timm
    with torch.device("meta"):
        convnext = timm.create_model("convnext_atto")
    # stages.N holds blocks.M: the outer region only, never a region inside a region
    assert compile_blocks(convnext) == [f"stages.{i}" for i in range(4)]
    with torch.device("meta"):
        plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert compile_blocks(plain) == [""]  # neither blocks nor stages: the whole model


@pytest.mark.slow
def test_compiled_blocks_train_like_eager():
    """compile_blocks on a small GroupMamba, traced by dynamo (the aot_eager backend runs the
    traced graphs unchanged): the same logits and the same gradients, the stage
    LayerNorms' between the regions included, for the model and for a copy (an EMA)."""
    import copy
    from models.groupmamba import GroupMamba
    from utils.accel import compile_blocks
    torch.manual_seed(0)
    eager = GroupMamba(num_classes=5, embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), stem_hidden_dim=8)
    for norm in (eager.norm1, eager.norm2, eager.norm3):
        torch.nn.init.normal_(norm.weight)
    compiled = copy.deepcopy(eager)
    ema = copy.deepcopy(compiled)
    for module in (compiled, ema):
        assert "block2.0" in compile_blocks(module, dynamic=False, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)

    def run(model):
        model.zero_grad(set_to_none=True)
        logits, dist_logits = model(x)
        (logits.square().mean() + dist_logits.square().mean()).backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    torch._dynamo.reset()
    for copied in (compiled, ema):
        expected_logits, expected = run(eager)
        logits, grads = run(copied)
        torch.testing.assert_close(logits, expected_logits)
        assert grads["norm2.weight"] is not None
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, msg=name)
        with torch.no_grad():  # the EMA's graphs must read its own weights, not the first copy's
            eager.block2[0].mlp.fc2.weight.mul_(2)
            ema.block2[0].mlp.fc2.weight.mul_(2)


def test_compile_seconds_grow_with_a_compile():
    from utils.accel import compile_seconds, describe_compile_seconds
    before = compile_seconds()
    layer = torch.compile(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()), backend="aot_eager")
    layer(torch.randn(2, 4, requires_grad=True)).sum().backward()
    after = compile_seconds()
    assert after["frames"] > before.get("frames", 0.0) and after["backward"] >= 0.0
    assert describe_compile_seconds(after).endswith("Triton kernel builds)")
    assert describe_compile_seconds({}) == "no compile times reported"


def test_stem_runs_its_convolutions_channels_last():
    from models.groupmamba import Stem
    stem = Stem(3, 8, 16)
    seen = []
    stem.conv[1].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    tokens, height, width = stem(torch.randn(2, 3, 32, 32))  # an NCHW batch, as loaders give
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert tokens.shape == (2, 64, 16) and (height, width) == (8, 8)


def test_grad_checkpointing_recomputes_each_block_with_the_same_gradients():
    """timm's set_grad_checkpointing: each GroupMambaBlock runs again in the backward (its
    stochastic depth draw replayed), and the logits and every gradient are those of the
    plain model; evaluation and no_grad forwards run each block once."""
    from models.groupmamba import GroupMambaBlock
    model = small_model(num_classes=5, drop_path_rate=0.3).train()
    calls = []
    for block in model.modules():
        if isinstance(block, GroupMambaBlock):
            # a pre-hook: the recomputation stops once it has the tensors the backward needs
            block.register_forward_pre_hook(lambda module, inputs: calls.append(module))
    images = torch.randn(4, 3, 64, 64)
    results = {}
    for on in (False, True):
        model.set_grad_checkpointing(on)
        model.zero_grad(set_to_none=True)
        calls.clear()
        torch.manual_seed(0)
        head, dist_head = model(images)
        (head.square().mean() + dist_head.logsumexp(1).mean()).backward()
        results[on] = (head.detach(), len(calls), {n: p.grad for n, p in model.named_parameters()})
    blocks = sum(model.depths)
    assert model.grad_checkpointing and results[False][1] == blocks and results[True][1] == 2 * blocks
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[False][2].items():
        torch.testing.assert_close(results[True][2][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    calls.clear()
    with torch.no_grad():
        model(images)
    model.eval()(images)
    assert len(calls) == 2 * blocks
