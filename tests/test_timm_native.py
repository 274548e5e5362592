"""GroupMamba through timm's own interfaces: pretrained weights from a local release file,
features_only and forward_intermediates, and checkpoints that carry their preprocessing
as a pretrained_cfg that timm.data reads. CPU only, small images."""
from __future__ import annotations

import logging

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import models
from models import CheckpointError, Classifier, PretrainedWeightsError
from small_classifier import CLASS_NAMES, IMG_SIZE, SMALL_KWARGS, write_checkpoint
from utils.transforms import eval_transform

TINY_CHANNELS = [64, 128, 348, 448]
SMALL = {key: value for key, value in SMALL_KWARGS.items() if key != "num_classes"}


@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
    """A local copy of an official release file, as released: the bare state dict of a
    1000-class groupmamba_tiny (random weights made here)."""
    torch.manual_seed(0)
    model = timm.create_model("groupmamba_tiny")
    path = tmp_path_factory.mktemp("release") / "groupmamba_tiny.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_pretrained_loads_a_local_release_file(release_file):
    path, released = release_file
    model = timm.create_model("groupmamba_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for key, value in model.state_dict().items():
        assert torch.equal(value, released[key]), key
    # the release's preprocessing is left as registered: bicubic, 0.875 centre crop, ImageNet's statistics
    assert resolve_data_config(model=model)["crop_pct"] == 0.875


def test_pretrained_with_other_classes_re_initialises_the_heads(release_file, caplog):
    path, released = release_file
    with caplog.at_level(logging.WARNING):
        model = timm.create_model("groupmamba_tiny", pretrained=True, num_classes=12,
                                  pretrained_cfg_overlay=dict(file=str(path)))
    assert model.head.weight.shape == model.dist_head.weight.shape == (12, 448)
    assert "freshly initialised" in caplog.text
    for key, value in model.state_dict().items():
        if not key.startswith(("head.", "dist_head.")):
            assert torch.equal(value, released[key]), key


def test_pretrained_without_a_file_says_where_the_weights_are():
    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model("groupmamba_small", pretrained=True, **SMALL)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "pretrained_cfg_overlay=dict(file=" in message
    assert "huggingface.co/Abdelrahman-shaker/GroupMamba-Small" in message and "github.com/Amshaker" in message
    cfg = timm.models.get_pretrained_cfg("groupmamba_small")
    assert not (cfg.url or cfg.hf_hub_id or cfg.file)  # nothing guessed to download


def test_pretrained_with_a_missing_file_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*absent.pth"):
        timm.create_model("groupmamba_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "absent.pth")),
                          **SMALL)


# ----------------------------------------------------------------- feature extraction

def test_features_only_gives_the_four_stage_maps():
    model = timm.create_model("groupmamba_tiny", features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert model.feature_info.channels() == TINY_CHANNELS
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert not any(name.startswith(("model.head", "model.dist_head", "model.post_network"))
                   for name, _ in model.named_parameters())
    with torch.no_grad():
        maps = model(torch.randn(2, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(2, c, 64 // r, 96 // r) for c, r in zip(TINY_CHANNELS, (4, 8, 16, 32))]


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(1)
    return models.create_model("groupmamba_tiny", **SMALL_KWARGS).eval()


def test_forward_intermediates_are_the_maps_forward_features_passes_through(small):
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        features, maps = small.forward_intermediates(x)
        assert torch.equal(features, small.forward_features(x))
        assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 12), (2, 32, 8, 6), (2, 48, 4, 3), (2, 64, 2, 2)]
        # a stage's map is the next stage's input: stage 1 from map 0 gives map 1
        tokens, height, width = small._forward_stage(maps[0], 1)
        assert torch.allclose(small.norm2(tokens).view(2, height, width, -1).permute(0, 3, 1, 2), maps[1])
        last_two = small.forward_intermediates(x, indices=2, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(last_two, maps[2:]))
        (first,) = small.forward_intermediates(x, indices=[-4], stop_early=True, output_fmt="NHWC",
                                               intermediates_only=True)
        assert torch.equal(first, maps[0].permute(0, 2, 3, 1))
        normed = small.forward_intermediates(x, norm=True, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(normed[:3], maps[:3]))
        assert torch.allclose(normed[3], small.norm4(maps[3].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_forward_intermediates_refuses_what_it_cannot_give(small):
    x = torch.randn(1, 3, 32, 32)
    for bad in (dict(indices=5), dict(indices=[4]), dict(indices=[-5]), dict(output_fmt="NLC")):
        with pytest.raises(ValueError):
            small.forward_intermediates(x, **bad)


def test_prune_intermediate_layers_keeps_what_the_maps_need():
    torch.manual_seed(1)
    model = models.create_model("groupmamba_tiny", **SMALL_KWARGS).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        wanted = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        assert model.prune_intermediate_layers([0, 2]) == [0, 2]
        assert model.num_stages == 3 and not hasattr(model, "block4") and len(model.post_network) == 0
        assert model.num_classes == 0 and model.num_features == 48
        maps = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(maps, wanted))
        features, _ = model.forward_intermediates(x)
        assert features.shape == (1, 48)


def test_features_only_with_pretrained_weights_from_a_file(small, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(small.state_dict(), path)
    backbone = timm.create_model("groupmamba_tiny", features_only=True, out_indices=(1, 3), pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path)), **SMALL_KWARGS).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = small.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(backbone(x), expected))


# ----------------------------------------------------------------- preprocessing as pretrained_cfg

def _non_square_image() -> Image.Image:
    generator = torch.Generator().manual_seed(3)
    pixels = (torch.rand(37, 61, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def test_a_checkpoint_s_preprocessing_is_timm_s_data_config(tmp_path):
    clf = Classifier.from_checkpoint(write_checkpoint(tmp_path / "best.pth"))
    config = resolve_data_config(model=clf.model)
    assert config == {"input_size": (3, IMG_SIZE, IMG_SIZE), "interpolation": "bilinear", "crop_pct": 1.0,
                      "crop_mode": "squash", "mean": tuple(clf.mean), "std": tuple(clf.std)}
    assert clf.model.pretrained_cfg["num_classes"] == len(CLASS_NAMES)
    assert clf.model.pretrained_cfg["label_names"] == tuple(CLASS_NAMES)
    image = _non_square_image()
    expected = eval_transform(IMG_SIZE, clf.mean, clf.std)(image)
    assert torch.equal(create_transform(**config)(image), expected)
    assert torch.equal(clf.transform(image), expected)


def test_create_model_and_the_pretrained_hook_apply_a_checkpoint_s_cfg(tmp_path):
    path = write_checkpoint(tmp_path / "best.pth")
    saved = torch.load(path, weights_only=True)
    model = models.create_model("groupmamba_tiny", checkpoint_path=path, **SMALL_KWARGS)
    assert resolve_data_config(model=model)["mean"] == tuple(saved["mean"])
    assert model.pretrained_cfg["input_size"] == (3, IMG_SIZE, IMG_SIZE)
    # through timm, with other classes: the preprocessing, not the class names
    model = timm.create_model("groupmamba_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=5, **SMALL)
    assert model.pretrained_cfg["crop_mode"] == "squash" and model.pretrained_cfg["num_classes"] == 1000
    assert "label_names" not in model.pretrained_cfg


def test_the_stored_entry_wins_over_img_size_mean_and_std(tmp_path):
    path = write_checkpoint(tmp_path / "best.pth")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["pretrained_cfg"] = models.preprocessing_cfg(48, checkpoint["mean"], checkpoint["std"])
    assert models.checkpoint_cfg(checkpoint)["input_size"] == (3, 48, 48)
    del checkpoint["pretrained_cfg"]
    assert models.checkpoint_cfg(checkpoint)["input_size"] == (3, IMG_SIZE, IMG_SIZE)
    assert models.checkpoint_cfg({"weights": torch.zeros(1)}) is None
