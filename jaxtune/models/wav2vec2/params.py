"""Wav2Vec2 / HuBERT HF <-> jaxtune key table: the convolutions' layouts and the weight-normed
positional convolution; DEFAULT_RULES do the rest (Linear kernels transposed, LayerNorm scale ->
weight).

Old checkpoints name the positional convolution's g and v `conv.weight_g` / `conv.weight_v`
(`torch.nn.utils.weight_norm`); `jaxtune.models.family.LEGACY_RENAMES` reads them as the
`parametrizations.weight.original0/1` that transformers 5 writes (and that the export writes).
"""

import numpy as np

from jaxtune.models.family import KeyRule


def _conv_to_hf(a: np.ndarray) -> np.ndarray:  # flax (k, in, out) -> torch (out, in, k)
    return np.ascontiguousarray(np.transpose(a, (2, 1, 0)))


_conv_from_hf = _conv_to_hf  # the same axis swap both ways


def _g_to_hf(a: np.ndarray) -> np.ndarray:  # (k,) -> torch's (1, 1, k)
    return np.ascontiguousarray(a.reshape(1, 1, -1))


def _g_from_hf(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.reshape(-1))


KEY_RULES = (
    KeyRule(r"^(.*pos_conv_embed/conv)/weight_g$", r"\1/parametrizations/weight/original0", _g_to_hf, _g_from_hf),
    KeyRule(r"^(.*pos_conv_embed/conv)/weight_v$", r"\1/parametrizations/weight/original1", _conv_to_hf,
            _conv_from_hf),
    KeyRule(r"^(.*conv_layers/\d+/conv)/kernel$", r"\1/weight", _conv_to_hf, _conv_from_hf),
)

# Checkpoint keys that are not parameters here: pre-training's quantizer and projections, and
# the heads of other tasks (transformers warns about them the same way).
IGNORE_KEYS = (
    r"(^|\.)quantizer\.", r"^project_(hid|q)\.", r"^(projector|classifier|tdnn|objective)\.",
    r"^layer_weights$", r"^feature_extractor\.(weight|bias)$",
)

# Parameters a checkpoint may lack: the CTC head (initialised, with a warning), and the SpecAugment
# vector a checkpoint trained without masking does not carry.
NEW_OK = (r"^lm_head/", r"(^|/)masked_spec_embed$")
