"""VGG in Flax NNX as timm builds it (`vgg11/13/16/19`, with BatchNorm as `_bn`), laid out like
timm's checkpoints.

Keys (timm's): `features.i` is timm's nn.Sequential, kept index for index: per width of the
layout a 3x3 convolution (padding 1, bias), its BatchNorm in the `_bn` variants, a ReLU; per 'M'
a 2x2 stride-2 max pool. `pre_logits` is timm's ConvMlp: `fc1`, a 7x7 convolution (512 ->
4096 x mlp_ratio) that reads a 7x7 map as one position (224-pixel images), ReLU, dropout, `fc2`,
a 1x1 convolution to 4096, ReLU. A feature map smaller than 7x7 (images under 224 pixels) is first
average-pooled UP to 7x7 exactly as timm's `F.adaptive_avg_pool2d` does it (a 1x1 map becomes 49
copies). The head (`head.fc` in timm, `classifier` here) reads the global average of fc2's output.

Input: `pixel_values` (B, C, H, W), NCHW as timm takes it; NHWC inside. BatchNorm behaves as the
ResNet's (`jaxtune.models.resnet.conv.BatchNorm2d`: running statistics are `nnx.BatchStat`s in the
train state; `use_running_average=True` freezes them); without BatchNorm the model holds no
statistics. Dropout (timm's `drop_rate`, 0 by default) acts after fc1 and before the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import JaxtuneError, ModelLoadError
from jaxtune.models import timm_folder
from jaxtune.models.config import ConfigBase
from jaxtune.models.dropout import Dropout, KeySplitter, as_key, head_keys
from jaxtune.models.layers import linear
from jaxtune.models.outputs import ModelOutput
from jaxtune.models.resnet.conv import (
    BatchNorm2d, Conv2d, adaptive_avg_pool, max_pool, nchw_to_nhwc, nhwc_to_nchw,
)

# timm's vgg.py `cfgs`: each convolution's width, 'M' a max pool
LAYOUTS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}
HEAD_WIDTH = 4096  # timm's head_hidden_size: fc2's width, what the classifier reads
MLP_KERNEL = 7  # fc1's kernel; smaller feature maps are pooled up to it


@dataclass(frozen=True)
class VGGConfig(ConfigBase):
    """timm's VGG arguments: `depth` (11, 13, 16, 19), `batch_norm` (the `_bn` variants),
    `mlp_ratio` (fc1's width / 4096), `dropout` (timm's drop_rate), input channels."""

    model_type = "timm_vgg"
    activation_fields = ()

    depth: int = 16
    batch_norm: bool = False
    num_channels: int = 3
    mlp_ratio: float = 1.0
    dropout: float = 0.0
    batch_norm_momentum: float = 0.1
    batch_norm_eps: float = 1e-5

    def __post_init__(self):  # no attention: ConfigBase's width / heads check does not apply
        if self.depth not in LAYOUTS:
            raise ModelLoadError(f"timm_vgg: depth {self.depth} is not one of {', '.join(map(str, LAYOUTS))}")
        if self.mlp_width < 1:
            raise ModelLoadError(f"timm_vgg: mlp_ratio {self.mlp_ratio} leaves fc1 no channels")
        if not 0 <= self.dropout < 1:
            raise ModelLoadError(f"timm_vgg: dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.batch_norm_momentum <= 1:
            raise ModelLoadError(f"timm_vgg: batch_norm_momentum must be in [0, 1], got {self.batch_norm_momentum}")

    @property
    def layout(self) -> tuple:
        return LAYOUTS[self.depth]

    @property
    def mlp_width(self) -> int:
        return int(HEAD_WIDTH * self.mlp_ratio)  # timm's int(out_features * mlp_ratio)

    @property
    def hidden_size(self) -> int:  # the pooled feature width, what a head reads
        return HEAD_WIDTH

    @property
    def num_conv_layers(self) -> int:
        return sum(v != "M" for v in self.layout)

    @property
    def image_hw(self) -> tuple[int, int]:
        """The image size `jaxtune verify` feeds: 32 x 32 reaches the last pool with one pixel."""
        return (32, 32)

    def to_checkpoint_config(self, head_cls) -> dict:
        """timm's config.json for an export (`jaxtune.models.pretrained.save_pretrained`)."""
        return timm_folder.checkpoint_config(self, classifier=head_cls is not VGGModel)


class ReLU(nnx.Module):
    """timm's nn.ReLU entry of `features` (no parameters; it keeps the indices timm's)."""

    def __call__(self, x):
        return jax.nn.relu(x)


class MaxPool(nnx.Module):
    """timm's 2x2 stride-2 nn.MaxPool2d entry of `features` (odd sizes round down, as PyTorch's)."""

    def __call__(self, x):
        return max_pool(x, 2, 2, 0)


def feature_layers(cfg: VGGConfig, *, rngs: nnx.Rngs) -> list:
    layers, width = [], cfg.num_channels
    for v in cfg.layout:
        if v == "M":
            layers.append(MaxPool())
            continue
        layers.append(Conv2d(width, v, 3, padding=1, use_bias=True, dtype=cfg.activation_dtype,
                             param_dtype=cfg.param_dtype, rngs=rngs))
        if cfg.batch_norm:
            layers.append(BatchNorm2d(v, momentum=cfg.batch_norm_momentum, eps=cfg.batch_norm_eps,
                                      param_dtype=cfg.param_dtype))
        layers.append(ReLU())
        width = v
    return layers


class ConvMlp(nnx.Module):
    """timm's ConvMlp: [pool up to 7x7] -> fc1 (7x7) -> ReLU -> dropout -> fc2 (1x1) -> ReLU."""

    def __init__(self, cfg: VGGConfig, *, rngs: nnx.Rngs):
        width = next(v for v in reversed(cfg.layout) if v != "M")
        conv = dict(use_bias=True, dtype=cfg.activation_dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.fc1 = Conv2d(width, cfg.mlp_width, MLP_KERNEL, **conv)
        self.fc2 = Conv2d(cfg.mlp_width, HEAD_WIDTH, 1, **conv)
        self.dropout = Dropout(cfg.dropout)

    def __call__(self, x_BHWC, *, deterministic: bool, rng: Optional[jax.Array]):
        h, w = x_BHWC.shape[1:3]
        if h < MLP_KERNEL or w < MLP_KERNEL:
            x_BHWC = adaptive_avg_pool(x_BHWC, (max(MLP_KERNEL, h), max(MLP_KERNEL, w)))
        x_BHWC = self.dropout(jax.nn.relu(self.fc1(x_BHWC)), deterministic=deterministic, rng=rng)
        return jax.nn.relu(self.fc2(x_BHWC))


class VGGModel(nnx.Module):
    """The network without its classifier: `last_hidden_state` (B, 4096, h, w) (fc2's output),
    `pooler_output` (B, 4096, 1, 1) (its global average) and, when asked, `hidden_states` (each max
    pool's output), NCHW."""

    hf_architecture = "VGGModel"

    def __init__(self, cfg: VGGConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.features = nnx.List(feature_layers(cfg, rngs=rngs))
        self.pre_logits = ConvMlp(cfg, rngs=rngs)

    def __call__(self, pixel_values=None, *, deterministic: bool = True, rngs=None,
                 use_running_average: Optional[bool] = None, output_hidden_states: bool = False) -> ModelOutput:
        """`use_running_average`: None follows `deterministic` (train mode: batch statistics);
        True: running statistics, also in training (frozen BatchNorm). `rngs`: dropout's key."""
        cfg = self.config
        if pixel_values is None or pixel_values.ndim != 4:
            raise JaxtuneError(f"{type(self).__name__} takes pixel_values (B, C, H, W)")
        if pixel_values.shape[1] != cfg.num_channels:
            raise JaxtuneError(f"VGG: pixel_values have {pixel_values.shape[1]} channels, the model "
                               f"expects {cfg.num_channels}")
        frozen = deterministic if use_running_average is None else use_running_average
        x = nchw_to_nhwc(pixel_values.astype(cfg.activation_dtype))
        hidden = []
        for layer in self.features:
            x = layer(x, use_running_average=frozen) if isinstance(layer, BatchNorm2d) else layer(x)
            if isinstance(layer, MaxPool):
                hidden.append(x)
        x = self.pre_logits(x, deterministic=deterministic, rng=KeySplitter(as_key(rngs))())
        pooled_BC = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
        return ModelOutput(
            last_hidden_state=nhwc_to_nchw(x),
            pooler_output=pooled_BC[:, :, None, None],
            hidden_states=tuple(nhwc_to_nchw(h) for h in hidden) if output_hidden_states else None,
        )


class VGGForImageClassification(nnx.Module):
    """Dropout and `classifier` (timm's `head.fc`) on the pooled features."""

    hf_architecture = "VGGForImageClassification"

    def __init__(self, cfg: VGGConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.vgg = VGGModel(cfg, rngs=rngs)
        self.dropout = Dropout(cfg.dropout)
        # timm initialises its Linear layers N(0, 0.01)
        self.classifier = linear(cfg, HEAD_WIDTH, cfg.num_labels, ("embed", "classes"), rngs=rngs, std=0.01)

    def __call__(self, pixel_values=None, *, deterministic: bool = True, rngs=None,
                 use_running_average: Optional[bool] = None, output_hidden_states: bool = False) -> ModelOutput:
        key = as_key(rngs)
        out = self.vgg(pixel_values, deterministic=deterministic, rngs=key, use_running_average=use_running_average,
                       output_hidden_states=output_hidden_states)
        pooled = self.dropout(out.pooler_output[:, :, 0, 0], deterministic=deterministic, rng=head_keys(key)())
        logits = self.classifier(pooled).astype(jnp.float32)
        return out.replace(logits=logits, last_hidden_state=None, pooler_output=None)


# task -> head class: the family record's table (jaxtune.models.vgg.FAMILY)
HEADS = {"base": VGGModel, "image-classification": VGGForImageClassification}
