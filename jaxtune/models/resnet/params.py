"""ResNet's HF <-> jaxtune key table: convolution kernels (HWIO here, OIHW in PyTorch) and the
head's `classifier.1` (HF's nn.Sequential(Flatten, Linear)); DEFAULT_RULES do the rest
(BatchNorm `scale` -> `weight`; `bias`, `running_mean`, `running_var`, `num_batches_tracked`
keep their names)."""

from jaxtune.models.family import DEFAULT_RULES, KeyRule
from jaxtune.models.resnet.conv import conv_weight_from_torch, conv_weight_to_torch

KEY_RULES = (
    KeyRule(r"^(.*)/convolution/kernel$", r"\1/convolution/weight", conv_weight_to_torch, conv_weight_from_torch),
    KeyRule(r"^classifier/kernel$", "classifier/1/weight", DEFAULT_RULES[0].to_hf, DEFAULT_RULES[0].from_hf),
    KeyRule(r"^classifier/bias$", "classifier/1/bias"),
)

IGNORE_KEYS = ()

# A checkpoint of the bare network has no classifier (initialised, with a warning).
NEW_OK = (r"^classifier/",)
