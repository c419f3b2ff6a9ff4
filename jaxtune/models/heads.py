"""What HF-style task heads share: the base model under its prefix, one call signature, tied decoders.

A head subclasses `TaskModel`, names its base model (`base_prefix`, `base_cls`), builds its own
layers after `super().__init__` (the order parameters are created in is the order they are
initialised in) and defines `head(out, deterministic=, keys=) -> logits`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import ModelLoadError
from jaxtune.models.config import ConfigBase
from jaxtune.models.dropout import Dropout, as_key, head_keys
from jaxtune.models.layers import linear
from jaxtune.models.outputs import ModelOutput


def run_base(base: nnx.Module, *args, deterministic: bool, rngs, **kwargs):
    """A task head's base model: `base(*args, ...)` -> (its output, the dropout keys left for the head)."""
    key = None if deterministic else as_key(rngs)
    return base(*args, deterministic=deterministic, rngs=key, **kwargs), head_keys(key)


class TaskModel(nnx.Module):
    """A text task head over a base encoder stored under HF's `base_model_prefix` attribute.

    `first_token_only`: the head reads the first token only, so the base model's last layer
    computes that token alone and the output carries no `last_hidden_state` (as transformers'
    sequence-classification heads return none).
    """

    base_prefix: ClassVar[str] = ""
    base_cls: ClassVar[type] = nnx.Module
    first_token_only: ClassVar[bool] = False

    def __init__(self, cfg: ConfigBase, *, rngs: nnx.Rngs):
        self.config = cfg
        setattr(self, self.base_prefix, self.base_cls(cfg, rngs=rngs, **self.base_kwargs()))

    def base_kwargs(self) -> dict[str, Any]:
        return {}

    @property
    def base(self) -> nnx.Module:
        return getattr(self, self.base_prefix)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                 deterministic: bool = True, rngs=None, output_hidden_states: bool = False) -> ModelOutput:
        out, keys = run_base(self.base, input_ids, attention_mask, token_type_ids, position_ids,
                             deterministic=deterministic, rngs=rngs, output_hidden_states=output_hidden_states,
                             first_token_only=self.first_token_only)
        out = out.replace(logits=self.head(out, deterministic=deterministic, keys=keys).astype(jnp.float32))
        return out.replace(last_hidden_state=None) if self.first_token_only else out

    def head(self, out: ModelOutput, *, deterministic: bool, keys):
        raise NotImplementedError


class TokenClassifier(TaskModel):
    """Every token -> dropout -> `classifier` (embed -> classes)."""

    def __init__(self, cfg: ConfigBase, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.dropout = Dropout(self.classifier_dropout(cfg))
        self.classifier = linear(cfg, cfg.hidden_size, cfg.num_labels, ("embed", "classes"), rngs=rngs,
                                 std=cfg.initializer_range)

    def classifier_dropout(self, cfg: ConfigBase) -> float:
        raise NotImplementedError

    def head(self, out, *, deterministic, keys):
        return self.classifier(self.dropout(out.last_hidden_state, deterministic=deterministic, rng=keys()))


def tied_decoder_bias(cfg: ConfigBase, vocab_size: int) -> nnx.Param:
    """The bias of an MLM decoder whose weight is the (tied) word-embedding matrix."""
    if not getattr(cfg, "tie_word_embeddings", True):
        raise ModelLoadError(
            f"{cfg.model_type}: tie_word_embeddings=false (an untied MLM decoder) is not supported"
        )
    return nnx.Param(jnp.zeros((vocab_size,), cfg.param_dtype), logical_axes=("vocab",))


class TiedDecoder(nnx.Module):
    """An MLM decoder tied to the word embeddings: only its bias is a parameter of its own."""

    def __init__(self, cfg: ConfigBase):
        self.bias = tied_decoder_bias(cfg, cfg.vocab_size)

    def __call__(self, x_BTD, word_embeddings: nnx.Embed):
        return word_embeddings.attend(x_BTD) + self.bias[...]
