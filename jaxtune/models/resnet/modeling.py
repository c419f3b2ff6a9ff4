"""ResNet in Flax NNX, laid out like the checkpoints of transformers' `modeling_resnet`.

Keys (as transformers writes them): `embedder.embedder.{convolution,normalization}` (the 7x7 stem,
then a 3x3 max pool), `encoder.stages.i.layers.j.layer.k.{convolution,normalization}` (basic
blocks: two 3x3 convolutions; bottleneck blocks: 1x1 reduce by 4, 3x3, 1x1 expand),
`encoder.stages.i.layers.j.shortcut.{convolution,normalization}` where the block changes width or
stride, and the head's `classifier.1` (after HF's `nn.Flatten`). Our modules mirror those names.

Input: `pixel_values` (B, C, H, W), NCHW like transformers; computed NHWC inside (what XLA's CPU
and TPU convolutions prefer); `last_hidden_state`, `pooler_output` (B, C, 1, 1) and
`hidden_states` come back NCHW, as transformers returns them.

BatchNorm: `deterministic=False` (training) normalises by the batch's statistics and updates the
running ones in place (`nnx.BatchStat`s; jaxtune's train step carries them in
`TrainState.model_state`); `use_running_average=True` keeps eval-mode statistics while training
(frozen BatchNorm). The momentum is PyTorch's convention, `batch_norm_momentum` (0.1, PyTorch's
default, which transformers' ResNet uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import JaxtuneError, ModelLoadError
from jaxtune.models.activations import activation
from jaxtune.models.config import ConfigBase
from jaxtune.models.layers import linear
from jaxtune.models.outputs import ModelOutput
from jaxtune.models.resnet.conv import BatchNorm2d, Conv2d, max_pool, nchw_to_nhwc, nhwc_to_nchw

LAYER_TYPES = ("basic", "bottleneck")


@dataclass(frozen=True)
class ResNetConfig(ConfigBase):
    """transformers' ResNetConfig fields and defaults (ResNet-50), plus BatchNorm's momentum and
    eps (PyTorch's defaults; transformers has no field for them and ignores ours)."""

    model_type = "resnet"
    attribute_map = {"num_hidden_layers": "num_stages"}

    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: tuple = (256, 512, 1024, 2048)
    depths: tuple = (3, 4, 6, 3)
    layer_type: str = "bottleneck"
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    batch_norm_momentum: float = 0.1
    batch_norm_eps: float = 1e-5

    def __post_init__(self):  # no attention: ConfigBase's width / heads check does not apply
        activation(self.hidden_act)
        if self.layer_type not in LAYER_TYPES:
            raise ModelLoadError(f"resnet: layer_type '{self.layer_type}' is not one of {', '.join(LAYER_TYPES)}")
        if len(self.hidden_sizes) != len(self.depths) or not self.depths:
            raise ModelLoadError(f"resnet: hidden_sizes {list(self.hidden_sizes)} and depths {list(self.depths)} "
                                 "must be non-empty and of the same length")
        if not 0 <= self.batch_norm_momentum <= 1:
            raise ModelLoadError(f"resnet: batch_norm_momentum must be in [0, 1], got {self.batch_norm_momentum}")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def hidden_size(self) -> int:  # the pooled feature width, what a head reads
        return self.hidden_sizes[-1]

    @property
    def image_hw(self) -> tuple[int, int]:
        """The image size `jaxtune verify` feeds: a ResNet takes any size; 64 x 64 reaches every
        stage with more than one pixel."""
        return (64, 64)


class ResNetConvLayer(nnx.Module):
    """Conv (no bias, padding k // 2) -> BatchNorm -> activation (None: none)."""

    def __init__(self, cfg: ResNetConfig, din: int, dout: int, *, kernel_size: int = 3, stride: int = 1,
                 act: Optional[str] = "relu", rngs: nnx.Rngs):
        self.convolution = Conv2d(din, dout, kernel_size, stride=stride, padding=kernel_size // 2,
                                  dtype=cfg.activation_dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.normalization = BatchNorm2d(dout, momentum=cfg.batch_norm_momentum, eps=cfg.batch_norm_eps,
                                         param_dtype=cfg.param_dtype)
        self.act = activation(act) if act is not None else None

    def __call__(self, x_BHWC, *, use_running_average: bool):
        x_BHWC = self.normalization(self.convolution(x_BHWC), use_running_average=use_running_average)
        return self.act(x_BHWC) if self.act is not None else x_BHWC


class ResNetShortCut(nnx.Module):
    """1x1 convolution (with the block's stride) -> BatchNorm: the residual at the block's width."""

    def __init__(self, cfg: ResNetConfig, din: int, dout: int, stride: int, *, rngs: nnx.Rngs):
        self.convolution = Conv2d(din, dout, 1, stride=stride, dtype=cfg.activation_dtype,
                                  param_dtype=cfg.param_dtype, rngs=rngs)
        self.normalization = BatchNorm2d(dout, momentum=cfg.batch_norm_momentum, eps=cfg.batch_norm_eps,
                                         param_dtype=cfg.param_dtype)

    def __call__(self, x_BHWC, *, use_running_average: bool):
        return self.normalization(self.convolution(x_BHWC), use_running_average=use_running_average)


class ResNetBlock(nnx.Module):
    """A residual block, basic or bottleneck: act(layer(x) + shortcut(x)).

    As transformers builds them, the inner convolutions use ReLU whatever `hidden_act` is; only
    the block's output activation (and the stem's) follow `hidden_act`.
    """

    def __init__(self, cfg: ResNetConfig, din: int, dout: int, stride: int = 1, *, rngs: nnx.Rngs):
        self.shortcut = (ResNetShortCut(cfg, din, dout, stride, rngs=rngs)
                         if din != dout or stride != 1 else None)
        if cfg.layer_type == "basic":
            convs = [ResNetConvLayer(cfg, din, dout, stride=stride, rngs=rngs),
                     ResNetConvLayer(cfg, dout, dout, act=None, rngs=rngs)]
        else:
            mid = dout // 4  # transformers' `reduction`
            first, second = (stride, 1) if cfg.downsample_in_bottleneck else (1, stride)
            convs = [ResNetConvLayer(cfg, din, mid, kernel_size=1, stride=first, rngs=rngs),
                     ResNetConvLayer(cfg, mid, mid, stride=second, rngs=rngs),
                     ResNetConvLayer(cfg, mid, dout, kernel_size=1, act=None, rngs=rngs)]
        self.layer = nnx.List(convs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x_BHWC, *, use_running_average: bool):
        h = x_BHWC
        for conv in self.layer:
            h = conv(h, use_running_average=use_running_average)
        residual = (self.shortcut(x_BHWC, use_running_average=use_running_average)
                    if self.shortcut is not None else x_BHWC)
        return self.act(h + residual)


class ResNetStage(nnx.Module):
    def __init__(self, cfg: ResNetConfig, din: int, dout: int, stride: int, depth: int, *, rngs: nnx.Rngs):
        self.layers = nnx.List([ResNetBlock(cfg, din, dout, stride, rngs=rngs)]
                               + [ResNetBlock(cfg, dout, dout, rngs=rngs) for _ in range(depth - 1)])

    def __call__(self, x_BHWC, *, use_running_average: bool):
        for block in self.layers:
            x_BHWC = block(x_BHWC, use_running_average=use_running_average)
        return x_BHWC


class ResNetEmbeddings(nnx.Module):
    """The stem: a 7x7 stride-2 convolution, then a 3x3 stride-2 max pool."""

    def __init__(self, cfg: ResNetConfig, *, rngs: nnx.Rngs):
        self.embedder = ResNetConvLayer(cfg, cfg.num_channels, cfg.embedding_size, kernel_size=7, stride=2,
                                        act=cfg.hidden_act, rngs=rngs)

    def __call__(self, x_BHWC, *, use_running_average: bool):
        return max_pool(self.embedder(x_BHWC, use_running_average=use_running_average), 3, 2, 1)


class ResNetEncoder(nnx.Module):
    def __init__(self, cfg: ResNetConfig, *, rngs: nnx.Rngs):
        widths = (cfg.embedding_size,) + tuple(cfg.hidden_sizes)
        first_stride = 2 if cfg.downsample_in_first_stage else 1
        self.stages = nnx.List([
            ResNetStage(cfg, widths[i], widths[i + 1], first_stride if i == 0 else 2, depth, rngs=rngs)
            for i, depth in enumerate(cfg.depths)
        ])


class ResNetModel(nnx.Module):
    """The bare network: `last_hidden_state` (B, C, h, w), `pooler_output` (B, C, 1, 1) (global
    average pool) and, when asked, `hidden_states` (the stem's output and each stage's), NCHW."""

    hf_architecture = "ResNetModel"

    def __init__(self, cfg: ResNetConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embedder = ResNetEmbeddings(cfg, rngs=rngs)
        self.encoder = ResNetEncoder(cfg, rngs=rngs)

    def __call__(self, pixel_values=None, *, deterministic: bool = True, rngs=None,
                 use_running_average: Optional[bool] = None, output_hidden_states: bool = False) -> ModelOutput:
        """`use_running_average`: None follows `deterministic` (train mode: batch statistics);
        True: running statistics, also in training (frozen BatchNorm). `rngs` is unused (no dropout)."""
        cfg = self.config
        if pixel_values is None or pixel_values.ndim != 4:
            raise JaxtuneError(f"{type(self).__name__} takes pixel_values (B, C, H, W)")
        if pixel_values.shape[1] != cfg.num_channels:
            raise JaxtuneError(f"ResNet: pixel_values have {pixel_values.shape[1]} channels, the model "
                               f"expects {cfg.num_channels}")
        frozen = deterministic if use_running_average is None else use_running_average
        x = self.embedder(nchw_to_nhwc(pixel_values.astype(cfg.activation_dtype)), use_running_average=frozen)
        hidden = [x]
        for stage in self.encoder.stages:
            x = stage(x, use_running_average=frozen)
            hidden.append(x)
        pooled_BC = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
        return ModelOutput(
            last_hidden_state=nhwc_to_nchw(x),
            pooler_output=pooled_BC[:, :, None, None],
            hidden_states=tuple(nhwc_to_nchw(h) for h in hidden) if output_hidden_states else None,
        )


class ResNetForImageClassification(nnx.Module):
    """`classifier` (HF's `classifier.1`) on the pooled features."""

    hf_architecture = "ResNetForImageClassification"

    def __init__(self, cfg: ResNetConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.resnet = ResNetModel(cfg, rngs=rngs)
        self.classifier = linear(cfg, cfg.hidden_sizes[-1], cfg.num_labels, ("embed", "classes"), rngs=rngs)

    def __call__(self, pixel_values=None, *, deterministic: bool = True, rngs=None,
                 use_running_average: Optional[bool] = None, output_hidden_states: bool = False) -> ModelOutput:
        out = self.resnet(pixel_values, deterministic=deterministic, use_running_average=use_running_average,
                          output_hidden_states=output_hidden_states)
        logits = self.classifier(out.pooler_output[:, :, 0, 0]).astype(jnp.float32)
        return out.replace(logits=logits, last_hidden_state=None, pooler_output=None)


# task -> head class: the family record's table (jaxtune.models.resnet.FAMILY)
HEADS = {"base": ResNetModel, "image-classification": ResNetForImageClassification}
