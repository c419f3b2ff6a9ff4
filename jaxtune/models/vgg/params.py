"""VGG's timm <-> jaxtune key table. `features` and `pre_logits` carry timm's names already (the
head's `vgg/` prefix is dropped: timm has none); convolution kernels are HWIO here, OIHW in
PyTorch; BatchNorm's `scale` is PyTorch's `weight`; the classifier is timm's `head.fc`."""

from jaxtune.models.family import DEFAULT_RULES, KeyRule
from jaxtune.models.resnet.conv import conv_weight_from_torch, conv_weight_to_torch

_BASE = r"^(?:vgg/)?"

KEY_RULES = (
    KeyRule(_BASE + r"(features/\d+|pre_logits/fc[12])/kernel$", r"\1/weight", conv_weight_to_torch,
            conv_weight_from_torch),
    KeyRule(_BASE + r"(features/\d+)/scale$", r"\1/weight"),
    KeyRule(r"^classifier/kernel$", "head/fc/weight", DEFAULT_RULES[0].to_hf, DEFAULT_RULES[0].from_hf),
    KeyRule(r"^classifier/bias$", "head/fc/bias"),
    KeyRule(_BASE + r"(.*)$", r"\1"),  # biases and BatchNorm statistics keep their names
)

IGNORE_KEYS = ()

# A checkpoint without a classifier (num_classes 0) gets a new one (initialised, with a warning).
NEW_OK = (r"^classifier/",)
