"""What every model returns."""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax


@flax.struct.dataclass
class ModelOutput:
    """What every model returns; unused fields stay None (a pytree, so jit can return it)."""

    logits: Optional[jax.Array] = None
    last_hidden_state: Optional[jax.Array] = None
    pooler_output: Optional[jax.Array] = None
    hidden_states: Optional[tuple[jax.Array, ...]] = None
    past_key_values: Any = None
