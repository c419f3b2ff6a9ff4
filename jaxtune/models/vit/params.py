"""ViT's HF <-> jaxtune key table: the patch convolution's layout; DEFAULT_RULES do the rest."""

import numpy as np

from jaxtune.models.family import KeyRule


def _conv_to_hf(a: np.ndarray) -> np.ndarray:  # flax (ph, pw, C, D) -> torch (D, C, ph, pw)
    return np.ascontiguousarray(np.transpose(a, (3, 2, 0, 1))) if a.ndim == 4 else a


def _conv_from_hf(a: np.ndarray) -> np.ndarray:  # torch (D, C, ph, pw) -> flax (ph, pw, C, D)
    return np.ascontiguousarray(np.transpose(a, (2, 3, 1, 0))) if a.ndim == 4 else a


KEY_RULES = (
    KeyRule(r"^(.*patch_embeddings/projection)/kernel$", r"\1/weight", _conv_to_hf, _conv_from_hf),
)

# Checkpoint keys that are not parameters here: the mask token of masked-image-modeling models.
IGNORE_KEYS = (r"(^|\.)embeddings\.mask_token$",)

# Parameters a checkpoint may lack: the classifier and the pooler (initialised, with a warning).
NEW_OK = (r"^classifier/", r"(^|/)pooler/")
