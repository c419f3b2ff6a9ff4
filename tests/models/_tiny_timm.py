"""Random timm checkpoints for tests/models/test_timm.py: timm's own PyTorch models
(`timm.create_model(name, pretrained=False, num_classes=..., **model_args)`), seeded, saved as timm
saves them (`timm.models.save_for_hf(..., safe_serialization=True)`: config.json with
`architecture` / `pretrained_cfg` / `model_args`, and model.safetensors).

Their values are moved away from timm's init, so that a wrong layout or a statistic read in the
wrong place shows: every BatchNorm gets random affine parameters and running statistics (timm
zero-initialises the last BatchNorm of each residual branch, which would hide the branch), every
bias a random value, and the classifier a scale that makes logits of order one.

Small by model_args where timm allows: ResNets take `channels` (each stage's base width) and
`layers` (blocks per stage); VGG's
widths are fixed, but `mlp_ratio` shrinks fc1 (512 -> 4096 x ratio, a 7x7 convolution: 103M of
vgg11's 133M parameters at ratio 1). Images are 32 x 32 (VGG's five pools leave one pixel, which
its head pools up to 7 x 7).

Test files load this module by path (pytest runs with --import-mode=importlib).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from _torchvision_stand_in import torchvision_stand_in

SMALL_RESNET = {"channels": (8, 16, 24, 32)}  # stage widths: a bottleneck's output is 4x
SMALL_BOTTLENECK = {**SMALL_RESNET, "layers": (1, 2, 1, 1)}  # blocks per stage (resnet50's: 3, 4, 6, 3)
SMALL_VGG = {"mlp_ratio": 1 / 64}  # fc1 512 -> 64
IMAGE_HW = (32, 32)


def import_timm():
    """timm, imported beside a stand-in torchvision when the real one is missing (see
    `_torchvision_stand_in`). transformers comes first: its optional-dependency checks must see the
    real torchvision (absent), never the stand-in."""
    importlib.import_module("transformers")
    with torchvision_stand_in():
        timm = importlib.import_module("timm")
        importlib.import_module("timm.models")
    return timm


class Tiny(NamedTuple):
    path: Path
    model: Any  # the timm model, eval mode
    config: dict  # its config.json


def perturb(model, seed: int) -> None:
    """Move every BatchNorm, bias and the classifier away from timm's init (module docstring)."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def randn(t):
        return torch.randn(t.shape, generator=g)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(1 + 0.3 * randn(module.weight))
                module.bias.copy_(0.1 * randn(module.bias))
                module.running_mean.copy_(0.1 * randn(module.running_mean))
                module.running_var.copy_(torch.exp(0.3 * randn(module.running_var)))
                module.num_batches_tracked.fill_(7)
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
                module.bias.copy_(0.05 * randn(module.bias))
        head = model.get_classifier()
        if isinstance(head, torch.nn.Linear):  # logits of order one, whatever the features' scale
            model.eval()
            x = torch.from_numpy(pixels(channels=head_channels(model), seed=seed + 1))
            features = model.forward_head(model.forward_features(x), pre_logits=True)
            rms = float(features.pow(2).mean().sqrt())
            head.weight.copy_(randn(head.weight) * 2 / (rms * head.in_features ** 0.5))


def head_channels(model) -> int:
    """The input channels of a timm model (its first convolution's)."""
    import torch

    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels


def build(name: str, *, num_classes: int = 3, seed: int = 0, **model_args):
    """A perturbed timm model in eval mode."""
    import torch

    timm = import_timm()
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_args)
    perturb(model, seed)
    return model.eval()


def save(model, folder: Path) -> Path:
    from timm.models import save_for_hf

    save_for_hf(model, str(folder), safe_serialization=True)
    return folder


def load_exported(folder: Path):
    """What timm makes of a folder: `timm.create_model('local-dir:...', pretrained=True)`."""
    timm = import_timm()
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


class Factory:
    """`make(name, **model_args) -> Tiny`, each checkpoint built once per factory."""

    def __init__(self, tmp_path_factory):
        self.tmp = tmp_path_factory
        self.made: dict = {}

    def __call__(self, name: str, **model_args) -> Tiny:
        key = (name, tuple(sorted(model_args.items())))
        if key not in self.made:
            model = build(name, **model_args)
            path = save(model, self.tmp.mktemp(f"timm-{name}"))
            self.made[key] = Tiny(path, model, json.loads((path / "config.json").read_text()))
        return self.made[key]


def pixels(batch: int = 2, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, channels, *IMAGE_HW)).astype(np.float32)


def torch_forward(fn, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return fn(torch.from_numpy(x)).numpy()


def max_diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))))
