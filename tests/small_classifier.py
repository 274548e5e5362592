"""A small GroupMamba checkpoint and a few images for the prediction and export tests
(not a test module).

The model is groupmamba_tiny's code with a few channels and one block a stage at 32 px:
it builds, runs and exports in seconds on a CPU.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

CLASS_NAMES = ["Black-grass", "Charlock", "Cleavers"]
IMG_SIZE = 32
SMALL_KWARGS = {"num_classes": len(CLASS_NAMES), "stem_hidden_dim": 8, "embed_dims": [16, 32, 48, 64],
                "mlp_ratios": [2, 2, 2, 2], "depths": [1, 1, 1, 1]}


def random_weights(model: torch.nn.Module, seed: int) -> dict:
    """``model``'s state dict with noise on every parameter (fresh heads are near zero, and
    trained weights are not); buffers such as BatchNorm's statistics are kept."""
    generator = torch.Generator().manual_seed(seed)
    parameters = dict(model.named_parameters())
    return {key: (value + 0.3 * torch.randn(value.shape, generator=generator) if key in parameters else value)
            for key, value in model.state_dict().items()}


def write_checkpoint(path: Path, best_source: str = "model") -> Path:
    """A best.pth as train.py writes it (the entries inference needs), raw and EMA weights."""
    import models
    from utils.checkpoint import FORMAT, save_checkpoint

    model = models.create_model("groupmamba_tiny", **SMALL_KWARGS)
    save_checkpoint({"format": FORMAT, "model": random_weights(model, 0), "model_ema": random_weights(model, 1),
                     "best_source": best_source, "model_name": "groupmamba_tiny", "model_kwargs": dict(SMALL_KWARGS),
                     "class_names": list(CLASS_NAMES), "mean": [0.33, 0.29, 0.21], "std": [0.12, 0.11, 0.13],
                     "img_size": IMG_SIZE}, path)
    return path


def draw_images(folder: Path, per_class: int = 2) -> list[Path]:
    """``folder/<class name>/<image>``: drawn images of several sizes and modes (one RGBA)."""
    rng = random.Random(0)
    files = []
    for c, name in enumerate(CLASS_NAMES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (40 + 9 * i + c, 30 + 7 * c)
            image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
            ImageDraw.Draw(image).ellipse([4, 4, 20 + 5 * c, 18], fill=(60 * c, 255 - 70 * c, 90))
            if c == 1 and i == 0:
                image = image.convert("RGBA")
                image.putalpha(180)
            files.append(folder / name / f"img_{i}.png")
            image.save(files[-1])
    return files
