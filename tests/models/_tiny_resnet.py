"""Tiny random transformers ResNet checkpoints for tests/models/test_resnet*.py and
tests/test_batchnorm*.py: a PyTorch model with seeded random weights, every parameter and every
BatchNorm running statistic perturbed away from its init (so a wrong layout or a statistic read
in the wrong place shows), saved with `save_pretrained`.

Test files load this module by path (pytest runs with --import-mode=importlib).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# Odd channel counts, 2 input channels, a non-square image; two stages so both a stride-2
# shortcut and an identity block appear.
BASIC = dict(num_channels=2, embedding_size=6, hidden_sizes=[8, 12], depths=[2, 1], layer_type="basic")
BOTTLENECK = dict(num_channels=2, embedding_size=6, hidden_sizes=[8, 12], depths=[1, 2], layer_type="bottleneck")
LAYOUTS = {"basic": BASIC, "bottleneck": BOTTLENECK}
IMAGE_HW = (20, 16)

HF_CLASSES = {"base": "ResNetModel", "image-classification": "ResNetForImageClassification"}


class Tiny(NamedTuple):
    path: Path
    model: Any  # the transformers model, eval mode


def build_hf_model(layout: str, task: str, seed: int = 0, scale: float = 0.1, **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.ResNetConfig(**{**LAYOUTS[layout], **overrides})
    model = getattr(transformers, HF_CLASSES[task])(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(scale * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.mul_(torch.exp(scale * torch.randn_like(b)))
            elif name.endswith("num_batches_tracked"):
                b.fill_(7)
    return model


class Factory:
    """`make(layout, task, **overrides) -> Tiny`, each checkpoint built once per factory."""

    def __init__(self, tmp_path_factory):
        self.tmp = tmp_path_factory
        self.made: dict = {}

    def __call__(self, layout: str, task: str = "base", **overrides) -> Tiny:
        key = (layout, task, tuple(sorted(overrides.items())))
        if key not in self.made:
            model = build_hf_model(layout, task, **overrides)
            path = self.tmp.mktemp(f"resnet-{layout}-{task}")
            model.save_pretrained(path)
            self.made[key] = Tiny(path, model)
        return self.made[key]


def pixel_batch(batch: int = 3, channels: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"pixel_values": rng.normal(size=(batch, channels, *IMAGE_HW)).astype(np.float32)}


def torch_forward(model, batch: dict, **kwargs):
    import torch

    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(batch["pixel_values"]), **kwargs)


def max_diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))))


def image_folder(root: Path, per_class: int = 16) -> Path:
    """Two classes of 12 x 12 grayscale PNGs (an `images:` source): bright squares top-left vs
    bottom-right on noise, so a small convolutional model learns them in a few steps."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, corner in (("tl", (0, 0)), ("br", (6, 6))):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 80, (12, 12)).astype(np.uint8)
            a[corner[0]:corner[0] + 6, corner[1]:corner[1] + 6] += 150
            Image.fromarray(a).save(root / label / f"{i}.png")
    return root
