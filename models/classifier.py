"""Predictions from a trained model: its weights, its preprocessing and its class names.

    clf = Classifier.from_checkpoint("runs/mine/best.pth")
    clf.predict("leaf.jpg")                  # [(class name, probability), ...], best first
    clf.predict(["a.jpg", image, ...])       # one such list per image (paths or PIL images)
    clf.predict(batch)                       # a preprocessed float tensor (N, 3, H, W)
    clf.probabilities(batch)                 # the softmax, (N, classes), on the CPU

A checkpoint of train.py describes everything: the timm model name and arguments, the
class names, the image size and the mean/std the images are normalised with
(:func:`utils.transforms.eval_transform`: resized to ``img_size`` x ``img_size``,
bilinear, antialiased). An official release file (a bare ImageNet state dict) needs
``model_name=``; it is read at 224 px with ImageNet's mean/std and class names.
test.py and export.py load their models through this class. The model's ``pretrained_cfg``
describes that preprocessing in timm's terms, so ``timm.data.resolve_data_config(model=clf.model)``
and ``timm.data.create_transform`` reproduce ``clf.transform``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from PIL import Image

from ._helpers import CheckpointError, apply_pretrained_cfg, load_pretrained, preprocessing_cfg, read_checkpoint

__all__ = ["Classifier", "RELEASE_IMG_SIZE"]

RELEASE_IMG_SIZE = 224  # the official models were trained and evaluated at 224 px
ImageInput = Union[str, os.PathLike, Image.Image]


@dataclass
class _Description:
    """What a checkpoint says about its model, and the weights chosen from it."""
    model_name: str
    model_kwargs: dict
    class_names: list
    img_size: int
    mean: list
    std: list
    weights: str  # "raw", "EMA" or "release"
    state: Mapping = field(repr=False)


def _ours(checkpoint: dict, path, weights: str) -> _Description:
    # utils imports models, so these are imported when used rather than with the package
    from utils.checkpoint import INFERENCE_KEYS, check_checkpoint, choose_weights, require_keys

    require_keys(checkpoint, path, INFERENCE_KEYS, "prediction")
    check_checkpoint(checkpoint, path)
    state, which = choose_weights(checkpoint, weights, path)
    return _Description(checkpoint["model_name"], dict(checkpoint["model_kwargs"]),
                        list(checkpoint["class_names"]), int(checkpoint["img_size"]),
                        [float(v) for v in checkpoint["mean"]], [float(v) for v in checkpoint["std"]],
                        which, state)


def _release_class_names(count: int) -> list[str]:
    """ImageNet-1k's names (timm ships them) for 1000 classes, else ``class_<i>``."""
    if count == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(count)]
    return [f"class_{i}" for i in range(count)]


def _release(checkpoint, path, model_name: str, class_names: Optional[Sequence[str]],
             weights: str) -> _Description:
    """A file without metadata: ImageNet's preprocessing; class names filled in once the
    model (and so its class count) is built, unless given."""
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if weights == "ema":
        ema = next((checkpoint[k] for k in ("model_ema", "state_dict_ema")
                    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(k), Mapping)), None)
        if ema is None:
            raise CheckpointError(f"{path} has no EMA weights (model_ema or state_dict_ema)")
        checkpoint = ema
    kwargs = {"num_classes": len(class_names)} if class_names else {}
    return _Description(model_name, kwargs, list(class_names or []), RELEASE_IMG_SIZE, list(IMAGENET_DEFAULT_MEAN),
                        list(IMAGENET_DEFAULT_STD), "release", checkpoint)


def _mean_of_heads(outputs) -> torch.Tensor:
    """Logits of a model that may return several heads (distillation) in eval mode."""
    if isinstance(outputs, (tuple, list)):
        return torch.stack(tuple(outputs)).mean(0)
    return outputs


class Classifier:
    """A model in eval mode with what predicting needs; build it with :meth:`from_checkpoint`."""

    def __init__(self, model: nn.Module, class_names: Sequence[str], img_size: int, mean: Sequence[float],
                 std: Sequence[float], device: Union[str, torch.device] = "cpu", amp: str = "auto",
                 model_name: str = "", model_kwargs: Optional[dict] = None, weights: str = ""):
        from utils.amp import Precision
        from utils.transforms import eval_transform

        self.device = _device(device)
        self.model = model.to(self.device).eval()
        self.class_names, self.img_size = list(class_names), int(img_size)
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self.model_name, self.model_kwargs, self.weights = model_name, dict(model_kwargs or {}), weights
        self.precision = Precision(amp, self.device)
        self.transform = eval_transform(self.img_size, self.mean, self.std)
        apply_pretrained_cfg(self.model, preprocessing_cfg(self.img_size, self.mean, self.std, self.class_names))

    @classmethod
    def from_checkpoint(cls, checkpoint: Union[str, os.PathLike, Mapping], device: Union[str, torch.device] = "cpu",
                        weights: str = "auto", scan_backend: Optional[str] = None, amp: str = "auto", *,
                        model_name: Optional[str] = None, class_names: Optional[Sequence[str]] = None,
                        img_size: Optional[int] = None, source: Optional[str] = None) -> "Classifier":
        """The model of a train.py checkpoint (or a ``.safetensors`` export of one) with
        its ``weights`` (``auto``: those that were best in training, ``model`` or ``ema``).
        ``checkpoint``: a file, or its contents already read (``source`` then names it in
        error messages).

        A file without that description (an official release) needs ``model_name``; its
        classes are named by ``class_names`` (default: ImageNet's for 1000 classes).
        ``scan_backend``: GroupMamba's selective scan (None: ``$GROUPMAMBA_SCAN_BACKEND``,
        else ``auto``); on a CUDA device a GroupMamba runs its fused kernels (twice the
        inference speed of the unfused ops, ``bench/RESULTS.md``). ``img_size`` overrides
        the size images are resized to.
        """
        from utils.config import choose_scan_backend

        from . import create_model  # noqa: PLC0415 - the package imports this module

        if weights not in ("auto", "model", "ema"):
            raise ValueError(f"weights must be auto, model or ema, not {weights!r}")
        path = source or (os.fspath(checkpoint) if not isinstance(checkpoint, Mapping) else "the checkpoint")
        if not isinstance(checkpoint, Mapping):
            checkpoint = read_checkpoint(checkpoint)
        if isinstance(checkpoint, dict) and "model_name" in checkpoint:
            if model_name and model_name != checkpoint["model_name"]:
                raise CheckpointError(f"{path} holds a {checkpoint['model_name']} model, not {model_name}")
            about = _ours(checkpoint, path, weights)
        elif model_name:
            about = _release(checkpoint, path, model_name, class_names, weights)
        else:  # the error a file without model_name gets, naming what is missing
            about = _ours(checkpoint, path, weights)
        model = create_model(about.model_name, scan_backend=choose_scan_backend(scan_backend),
                             fused_kernels=_device(device).type == "cuda", **about.model_kwargs)
        try:
            load_pretrained(model, about.state, reset_head=False)
        except CheckpointError as exc:
            raise CheckpointError(f"the weights in {path} do not match the model they describe "
                                  f"({about.model_name}): {exc}") from exc
        if not about.class_names:
            about.class_names = _release_class_names(getattr(model, "num_classes", 0))
        return cls(model, about.class_names, img_size or about.img_size, about.mean, about.std, device, amp,
                   about.model_name, about.model_kwargs, about.weights)

    # -- predicting ---------------------------------------------------------------

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes, float32 on the CPU, of a preprocessed batch (N, 3, H, W)."""
        images = images.to(self.device, non_blocking=True)
        with self.precision.autocast():
            logits = _mean_of_heads(self.model(images))
        return logits.float().softmax(dim=1).cpu()

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Image files or PIL images -> the batch the model takes, as test.py makes it."""
        from utils.images import open_rgb, to_rgb

        rgb = [to_rgb(image) if isinstance(image, Image.Image) else open_rgb(image) for image in images]
        return torch.stack([self.transform(image) for image in rgb])

    def predict(self, images: Union[ImageInput, Sequence[ImageInput], torch.Tensor], topk: int = 5,
                batch_size: int = 32) -> list:
        """``[(class name, probability), ...]`` (the ``topk`` best) for one image (a path, a
        PIL image or a preprocessed (3, H, W) tensor); a list of such lists for a list of
        images or an (N, 3, H, W) batch."""
        if topk < 1 or batch_size < 1:
            raise ValueError(f"topk and batch_size must be >= 1, got {topk} and {batch_size}")
        single = isinstance(images, (str, os.PathLike, Image.Image)) or (
            isinstance(images, torch.Tensor) and images.dim() == 3)
        if isinstance(images, torch.Tensor):
            probabilities = self.probabilities(_check_batch(images[None] if single else images))
        else:
            items = [images] if single else list(images)
            chunks = [self.probabilities(self.preprocess(items[start:start + batch_size]))
                      for start in range(0, len(items), batch_size)]
            probabilities = torch.cat(chunks) if chunks else torch.empty(0, len(self.class_names))
        ranked = self.top_k(probabilities, topk)
        return ranked[0] if single else ranked

    def top_k(self, probabilities: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        """The ``k`` most probable ``(class name, probability)`` of each row, best first."""
        values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
        return [[(self.class_names[i], p) for i, p in zip(row_i, row_p)]
                for row_i, row_p in zip(indices.tolist(), values.tolist())]

    def metadata(self) -> dict:
        """What predicting needs besides the weights, as plain JSON values."""
        return {"model_name": self.model_name, "model_kwargs": self.model_kwargs, "class_names": self.class_names,
                "img_size": self.img_size, "mean": self.mean, "std": self.std, "weights": self.weights,
                # eval_transform: the whole image resized to img_size x img_size (no crop)
                "interpolation": "bilinear"}

    def __repr__(self) -> str:
        return (f"Classifier({self.model_name}, {len(self.class_names)} classes, {self.img_size} px, "
                f"{self.weights} weights, {self.device}, {self.precision.mode})")


def _device(device: Union[str, torch.device]) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_batch(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError("a tensor to predict must be a preprocessed float batch (N, 3, H, W) or one "
                         f"image (3, H, W); got {images.dtype} {tuple(images.shape)}")
    return images
