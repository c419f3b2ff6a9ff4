"""Images -> pixel_values float32 (B, C, H, W), normalised like the model's image processor.

Training augmentation (when `data.augment`): a random resized crop (area fraction
`data.crop_scale`, aspect ratio 3/4..4/3, as torchvision's RandomResizedCrop) and a horizontal flip
(`data.hflip`). Randomness comes from (seed, step, position in the global batch) only, so batches
are the same whatever the worker count, and a resumed run redraws the same crops.
Evaluation resizes to the target size (as HF's ViT image processor does, no crop); a processor
with `crop_pct` and a `shortest_edge` size below 384 (ConvNext's, which ResNet checkpoints use)
resizes the short side to size / crop_pct and centre-crops, as transformers does. The resampling
filter is the processor's `resample` (bilinear when it has none).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from jaxtune.errors import DataError
from jaxtune.models import timm_folder
from jaxtune.models.hf import read_config, resolve_model_dir
from jaxtune.paths import resolve_path


@dataclass(frozen=True)
class ImageSettings:
    size: Optional[tuple[int, int]] = None  # (height, width); None: the images' own size
    mean: Optional[tuple[float, ...]] = None  # per channel, on [0, 1] pixels; None: 0
    std: Optional[tuple[float, ...]] = None  # None: 1
    crop_pct: Optional[float] = None  # ConvNext-style evaluation: short side to size / crop_pct, centre crop
    resample: int = Image.BILINEAR  # PIL filter (HF's `resample`: 2 bilinear, 3 bicubic)

    @classmethod
    def from_any(cls, obj: Any) -> "ImageSettings":
        """From ImageSettings, None, {'size', 'mean', 'std'} or an HF preprocessor_config.json dict
        ({'size': {'height', 'width'} | {'shortest_edge'} | int, 'image_mean', 'image_std'})."""
        if obj is None:
            return cls()
        if isinstance(obj, cls):
            return obj
        if not isinstance(obj, dict):
            raise DataError(f"image processor settings must be a mapping, got {type(obj).__name__}")
        size = obj.get("size", obj.get("crop_size"))
        crop_pct = None
        if isinstance(size, dict):
            if "height" in size:
                size = (size["height"], size["width"])
            elif "shortest_edge" in size:
                size = size["shortest_edge"]
                crop_pct = obj.get("crop_pct") if size < 384 else None  # transformers warps at 384 and up
            else:
                raise DataError(f"image processor size {size} not understood")
        if isinstance(size, int):
            size = (size, size)
        mean = obj.get("mean", obj.get("image_mean"))
        std = obj.get("std", obj.get("image_std"))
        if obj.get("do_normalize") is False:
            mean = std = None
        if isinstance(mean, (int, float)):
            mean = [mean]
        if isinstance(std, (int, float)):
            std = [std]
        resample = obj.get("resample", Image.BILINEAR)
        return cls(tuple(size) if size else None, tuple(mean) if mean else None, tuple(std) if std else None,
                   crop_pct=crop_pct, resample=int(resample) if resample is not None else Image.BILINEAR)

    def with_size(self, size: Optional[int]) -> "ImageSettings":
        return self if size is None else ImageSettings((size, size), self.mean, self.std, self.crop_pct, self.resample)

    def fit(self, im):
        """A PIL image at `size` as evaluation sees it (see the module docstring)."""
        h, w = self.size
        if self.crop_pct and h == w:
            short = int(h / self.crop_pct)  # the short side, the long one scaled as transformers rounds it
            rh, rw = ((short, int(short * im.width / im.height)) if im.height <= im.width
                      else (int(short * im.height / im.width), short))
            im = im.resize((rw, rh), self.resample)
            top, left = (rh - h) // 2, (rw - w) // 2
            return im.crop((left, top, left + w, top + h))
        return im if (im.height, im.width) == (h, w) else im.resize((w, h), self.resample)


def image_settings_from_model(path) -> Optional[dict]:
    """The model folder's preprocessor_config.json as a dict (a timm folder: its config.json's
    `pretrained_cfg`, as `jaxtune.models.timm_folder.image_processor` reads it), or None. `path`
    may also be an HF hub id in the local HF cache (e.g. google/vit-base-patch16-224-in21k)."""
    folder = Path(resolve_path(path))
    if not folder.is_dir():
        folder = resolve_model_dir(path)  # the HF cache, or a one-line error naming the path
    f = folder / "preprocessor_config.json"
    if f.exists():
        return json.loads(f.read_text())
    return timm_folder.image_processor(read_config(folder)) if (folder / "config.json").is_file() else None


def channels_of(image) -> int:
    """1 for grayscale, 3 otherwise (alpha and palettes become RGB)."""
    if isinstance(image, np.ndarray):
        return 1 if image.ndim == 2 or image.shape[-1] == 1 else 3
    with Image.open(io.BytesIO(image)) as im:
        return 1 if im.mode in ("L", "1", "I", "I;16", "F") else 3


def to_pil(image, mode: str, where: str = "image"):
    if isinstance(image, np.ndarray):
        a = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        im = Image.fromarray(a)
    else:
        try:
            im = Image.open(io.BytesIO(image))
            im.load()
        except Exception as e:
            raise DataError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None
    return im if im.mode == mode else im.convert(mode)


def random_resized_crop_box(rng: np.random.Generator, h: int, w: int, scale: Sequence[float],
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision's RandomResizedCrop draws it."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    # Fallback: the central crop with the ratio clamped into range.
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class ImageEncoder:
    """Canonical image examples -> pixel_values (B, C, H, W) float32. Picklable."""

    def __init__(self, settings: ImageSettings, channels: int, *, augment: bool = False,
                 crop_scale: Sequence[float] = (0.08, 1.0), hflip: bool = True):
        self.settings = settings
        self.channels = len(settings.mean) if settings.mean else channels
        if self.channels not in (1, 3):
            raise DataError(f"image processor mean has {self.channels} channels; expected 1 or 3")
        self.mode = "L" if self.channels == 1 else "RGB"
        self.augment = augment
        self.crop_scale = tuple(crop_scale)
        if not (len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise DataError(f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {list(crop_scale)}")
        self.hflip = hflip
        c = self.channels
        self.mean = np.asarray(settings.mean or (0.0,) * c, np.float32).reshape(c, 1, 1)
        self.std = np.asarray(settings.std or (1.0,) * c, np.float32).reshape(c, 1, 1)

    def one(self, image, rng: Optional[np.random.Generator], where: str = "image") -> np.ndarray:
        im = to_pil(image, self.mode, where)
        size = self.settings.size  # (H, W)
        if rng is not None and self.augment:
            top, left, ch, cw = random_resized_crop_box(rng, im.height, im.width, self.crop_scale)
            out_hw = size or (im.height, im.width)
            im = im.resize((out_hw[1], out_hw[0]), Image.BILINEAR, box=(left, top, left + cw, top + ch))
            if self.hflip and rng.random() < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
        elif size:
            im = self.settings.fit(im)
        x = np.asarray(im, np.float32) / 255.0
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        return (x - self.mean) / self.std

    def __call__(self, examples: Sequence[dict], rngs: Optional[Sequence[np.random.Generator]] = None,
                 where: Sequence[str] = ()) -> np.ndarray:
        xs = [self.one(e["image"], rngs[i] if rngs is not None else None, where[i] if where else "image")
              for i, e in enumerate(examples)]
        shapes = {x.shape for x in xs}
        if len(shapes) > 1:
            raise DataError(f"images in a batch differ in size {sorted(shapes)}; set data.image_size (or the model's image size)")
        return np.stack(xs).astype(np.float32, copy=False)
