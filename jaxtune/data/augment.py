"""Image augmentation on the device, inside the jitted train step (recipe `data.augment: {...}`).

    augment = Augment.from_config(recipe.data.augment, num_labels)   # None when nothing is on
    loss_fn = with_augmentation(loss_fn, augment)                     # batch augmented first

Every random number comes from the train step's key (`fold_in(state.rng, step)`, folded once more
with `AUGMENT_STREAM` so dropout draws what it drew before): a run is reproducible from its seed,
a resumed run redraws exactly what the uninterrupted one drew, and the draws do not depend on the
device count (JAX's partitionable threefry). In order:

- random resized crop (`crop_scale` [low, high] of the area, aspect ratio in `crop_ratio`, boxes
  drawn as torchvision's RandomResizedCrop: 10 tries, then the central crop), resampled back to
  the batch's size bilinearly (half-pixel centres, edges clamped; no antialiasing);
- horizontal flip with probability 1/2 (`hflip`);
- mixup (`mixup`: Beta(a, a)) or cutmix (`cutmix`: Beta(a, a), a box of area 1 - lam, lam then set
  to the box actually kept), one lam per batch and each image mixed with the batch reversed, as
  timm's Mixup in 'batch' mode; with both on, cutmix with probability `switch_prob`; a batch is
  mixed with probability `mix_prob`. Labels become `batch['label_probs']` (B, K), rows summing
  to one (with `label_smoothing` spread over the K classes), which the image-classification loss
  reads instead of the integer labels.

The host pipeline has already resized and normalised the images as the checkpoint's
preprocessor config says (`jaxtune.data.image`); every step here is a convex combination of
pixels, so it commutes with that per-channel normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import jax
import jax.numpy as jnp

AUGMENT_STREAM = 0x617567  # folded into the step's key: augmentation draws apart from dropout's
CROP_TRIES = 10  # torchvision's RandomResizedCrop tries this many boxes before the central crop


@dataclass(frozen=True)
class Augment:
    """What to draw; see the module docstring. `num_classes` sizes the soft labels."""

    num_classes: int
    crop_scale: Optional[tuple[float, float]] = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, cfg, num_classes: int) -> Optional["Augment"]:
        """From the recipe's `data.augment` mapping (config.AugmentConfig); None for a bool
        (host-side augmentation or none) or when nothing is switched on."""
        if cfg is None or isinstance(cfg, bool):
            return None
        aug = cls(num_classes=num_classes, crop_scale=tuple(cfg.crop_scale) if cfg.crop_scale else None,
                  crop_ratio=tuple(cfg.crop_ratio), hflip=cfg.hflip, mixup=cfg.mixup, cutmix=cfg.cutmix,
                  mix_prob=cfg.mix_prob, switch_prob=cfg.switch_prob, label_smoothing=cfg.label_smoothing)
        return aug if (aug.crop_scale or aug.hflip or aug.mixes or aug.label_smoothing) else None

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def __call__(self, batch: dict, key: jax.Array) -> dict:
        """The batch with `pixel_values` (B, C, H, W) augmented and, when mixing or smoothing,
        `label_probs` (B, K) added."""
        k_crop, k_flip, k_mix = jax.random.split(key, 3)
        x = batch["pixel_values"]
        if self.crop_scale:
            x = random_resized_crop(x, k_crop, self.crop_scale, self.crop_ratio)
        if self.hflip:
            x = random_hflip(x, k_flip)
        out = {**batch, "pixel_values": x}
        if self.mixes or self.label_smoothing:
            probs = smoothed_one_hot(batch["labels"], self.num_classes, self.label_smoothing)
            if self.mixes:
                out["pixel_values"], lam = mix(x, k_mix, mixup=self.mixup, cutmix=self.cutmix,
                                               mix_prob=self.mix_prob, switch_prob=self.switch_prob)
                probs = lam * probs + (1 - lam) * probs[::-1]
            out["label_probs"] = probs
        return out


def with_augmentation(loss_fn: Callable, augment: Optional[Augment], *, has_model_state: bool = False) -> Callable:
    """`loss_fn` (either form of `jaxtune.train.make_train_step`) on augmented batches; itself
    when `augment` is None. The rng it passes on is the step's, unchanged."""
    if augment is None:
        return loss_fn

    def key_of(rng):
        return jax.random.fold_in(rng, AUGMENT_STREAM)

    if has_model_state:
        def augmented_with_state(params, model_state, batch, rng):
            return loss_fn(params, model_state, augment(batch, key_of(rng)), rng)
        return augmented_with_state

    def augmented(params, batch, rng):
        return loss_fn(params, augment(batch, key_of(rng)), rng)

    return augmented


def smoothed_one_hot(labels, num_classes: int, smoothing: float = 0.0):
    """(B,) int -> (B, K) float32 rows summing to one."""
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return one_hot * (1 - smoothing) + smoothing / num_classes


def crop_boxes(key, batch: int, h: int, w: int, scale, ratio):
    """(top, left, height, width), each (B,) int32, drawn as torchvision's RandomResizedCrop."""
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (batch, CROP_TRIES), minval=scale[0], maxval=scale[1]) * (h * w)
    log_ratio = jax.random.uniform(k_ratio, (batch, CROP_TRIES), minval=math.log(ratio[0]),
                                   maxval=math.log(ratio[1]))
    aspect = jnp.exp(log_ratio)
    cw = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    ch = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = jnp.argmax(fits, axis=1)[:, None]  # the first box that fits, as the tries run in order
    cw, ch = jnp.take_along_axis(cw, first, 1)[:, 0], jnp.take_along_axis(ch, first, 1)[:, 0]
    # none fits: the central crop with the image's ratio clamped into range (static numbers)
    in_ratio = w / h
    if in_ratio < ratio[0]:
        fw, fh = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(h * ratio[1])), h
    else:
        fw, fh = w, h
    found = jnp.any(fits, axis=1)
    cw, ch = jnp.where(found, cw, fw), jnp.where(found, ch, fh)
    top = jnp.floor(jax.random.uniform(k_top, (batch,)) * (h - ch + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_left, (batch,)) * (w - cw + 1)).astype(jnp.int32)
    top = jnp.where(found, jnp.minimum(top, h - ch), (h - ch) // 2)
    left = jnp.where(found, jnp.minimum(left, w - cw), (w - cw) // 2)
    return top, left, ch, cw


def resample_weights(start, length, n_in: int, n_out: int):
    """(B, n_out, n_in) bilinear weights sampling [start, start + length) at n_out half-pixel
    centres; rows sum to one (sources clamped into the image)."""
    pos = (jnp.arange(n_out, dtype=jnp.float32) + 0.5)[None] * (length[:, None] / n_out) - 0.5
    src = jnp.clip(start[:, None].astype(jnp.float32) + pos, 0.0, n_in - 1.0)
    return jnp.maximum(0.0, 1.0 - jnp.abs(src[..., None] - jnp.arange(n_in, dtype=jnp.float32)))


def random_resized_crop(x_BCHW, key, scale, ratio=(3 / 4, 4 / 3)):
    """Each image's random box, resized back to (H, W): two small matmuls per image."""
    B, _, H, W = x_BCHW.shape
    top, left, ch, cw = crop_boxes(key, B, H, W, scale, ratio)
    rows = resample_weights(top, ch, H, H)
    cols = resample_weights(left, cw, W, W)
    out = jnp.einsum("bih,bchw,bjw->bcij", rows, x_BCHW.astype(jnp.float32), cols)
    return out.astype(x_BCHW.dtype)


def random_hflip(x_BCHW, key):
    flip = jax.random.bernoulli(key, 0.5, (x_BCHW.shape[0],))
    return jnp.where(flip[:, None, None, None], x_BCHW[..., ::-1], x_BCHW)


def mix(x_BCHW, key, *, mixup: float, cutmix: float, mix_prob: float = 1.0, switch_prob: float = 0.5):
    """(mixed images, lam): images mixed with the batch reversed; lam () float32 is the weight
    of each image's own label (1 when the batch is not mixed)."""
    k_lam, k_switch, k_apply, k_box = jax.random.split(key, 4)
    B, _, H, W = x_BCHW.shape
    use_cutmix = jnp.asarray(cutmix > 0) & ((mixup <= 0) | (jax.random.uniform(k_switch) < switch_prob))
    alpha = jnp.where(use_cutmix, cutmix if cutmix > 0 else 1.0, mixup if mixup > 0 else 1.0)
    lam = jax.random.beta(k_lam, alpha, alpha).astype(jnp.float32)
    other = x_BCHW[::-1]
    # cutmix: a box of area (1 - lam) at a uniform centre, clipped to the image (timm's rand_bbox)
    cut = jnp.sqrt(1.0 - lam)
    bh, bw = (H * cut).astype(jnp.int32), (W * cut).astype(jnp.int32)
    k_cy, k_cx = jax.random.split(k_box)
    cy, cx = jax.random.randint(k_cy, (), 0, H), jax.random.randint(k_cx, (), 0, W)
    y0, y1 = jnp.clip(cy - bh // 2, 0, H), jnp.clip(cy + bh // 2, 0, H)
    x0, x1 = jnp.clip(cx - bw // 2, 0, W), jnp.clip(cx + bw // 2, 0, W)
    in_box = ((jnp.arange(H)[:, None] >= y0) & (jnp.arange(H)[:, None] < y1)
              & (jnp.arange(W)[None] >= x0) & (jnp.arange(W)[None] < x1))
    cut_lam = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (H * W)
    cut_x = jnp.where(in_box, other, x_BCHW)
    mixed_x = (lam * x_BCHW.astype(jnp.float32) + (1 - lam) * other.astype(jnp.float32)).astype(x_BCHW.dtype)
    apply = jax.random.uniform(k_apply) < mix_prob
    lam = jnp.where(apply, jnp.where(use_cutmix, cut_lam, lam), 1.0)
    x = jnp.where(apply, jnp.where(use_cutmix, cut_x, mixed_x), x_BCHW)
    return x, lam


__all__ = ["AUGMENT_STREAM", "Augment", "crop_boxes", "mix", "random_hflip", "random_resized_crop",
           "resample_weights", "smoothed_one_hot", "with_augmentation"]
