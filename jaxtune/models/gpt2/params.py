"""GPT-2's HF <-> jaxtune key table.

HF stores `c_attn`, `c_proj` and `c_fc` as Conv1D weights of shape (in, out): the same layout as our
kernels, so unlike nn.Linear they are NOT transposed. `c_attn` is (D, 3D) in HF and (D, 3, D) here
(q, k, v on their own axis, so that `heads` sharding splits each of them by heads).
"""

import numpy as np

from jaxtune.models.family import KeyRule


def _qkv_kernel_from_hf(a: np.ndarray) -> np.ndarray:  # (D, 3D) -> (D, 3, D)
    return a.reshape(a.shape[0], 3, -1) if a.ndim == 2 and a.shape[1] % 3 == 0 else a


def _qkv_bias_from_hf(a: np.ndarray) -> np.ndarray:  # (3D,) -> (3, D)
    return a.reshape(3, -1) if a.ndim == 1 and a.shape[0] % 3 == 0 else a


KEY_RULES = (
    KeyRule(r"^(.*/attn/c_attn)/kernel$", r"\1/weight",
            lambda a: np.ascontiguousarray(a.reshape(a.shape[0], -1)), _qkv_kernel_from_hf),
    KeyRule(r"^(.*/attn/c_attn)/bias$", r"\1/bias", lambda a: a.reshape(-1), _qkv_bias_from_hf),
    KeyRule(r"^(.*/(?:c_proj|c_fc))/kernel$", r"\1/weight"),  # Conv1D: (in, out) both sides
)

# Buffers and tied copies found in HF checkpoints that are not parameters here.
IGNORE_KEYS = (
    r"(^|\.)attn\.(bias|masked_bias)$",  # the causal-mask buffers of older checkpoints
    r"^lm_head\.weight$",  # tied to transformer.wte
)

# Parameters a checkpoint may lack: task heads (initialised, with a warning).
NEW_OK = (r"^score/", r"^lm_head/")
