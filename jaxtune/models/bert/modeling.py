"""BERT in Flax NNX, laid out like transformers' `modeling_bert` so checkpoints map one to one.

Shapes in names: B batch, T tokens, D hidden, N heads, H head dim, F intermediate, V vocab.
RoBERTa reuses these modules with its own embeddings and heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import ModelLoadError
from jaxtune.models.activations import activation
from jaxtune.models.config import EncoderConfig
from jaxtune.models.dropout import Dropout, KeySplitter, as_key
from jaxtune.models.heads import TaskModel, TokenClassifier, tied_decoder_bias
from jaxtune.models.layers import LayerStack, SelfAttention, attention_bias, embed, layer_norm, linear
from jaxtune.models.outputs import ModelOutput


@dataclass(frozen=True)
class BertConfig(EncoderConfig):
    model_type = "bert"

    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    classifier_dropout: Optional[float] = None
    is_decoder: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.is_decoder:
            raise ModelLoadError(f"{self.model_type}: is_decoder=true (causal attention) is not supported")
        if self.position_embedding_type != "absolute":
            raise ModelLoadError(
                f"position_embedding_type '{self.position_embedding_type}' is not supported "
                "(only 'absolute')"
            )
        super().__post_init__()


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        std = cfg.initializer_range
        self.word_embeddings = embed(cfg, cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), rngs=rngs, std=std)
        self.position_embeddings = embed(
            cfg, cfg.max_position_embeddings, cfg.hidden_size, ("position", "embed"), rngs=rngs, std=std
        )
        self.token_type_embeddings = embed(
            cfg, cfg.type_vocab_size, cfg.hidden_size, ("type", "embed"), rngs=rngs, std=std
        )
        self.LayerNorm = layer_norm(cfg, cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def default_position_ids(self, input_ids_BT):
        return jnp.broadcast_to(jnp.arange(input_ids_BT.shape[1]), input_ids_BT.shape)

    def __call__(self, input_ids_BT, token_type_ids_BT, position_ids_BT, *, deterministic, rng):
        if position_ids_BT is None:
            position_ids_BT = self.default_position_ids(input_ids_BT)
        if token_type_ids_BT is None:
            token_type_ids_BT = jnp.zeros_like(input_ids_BT)
        x_BTD = (
            self.word_embeddings(input_ids_BT)
            + self.token_type_embeddings(token_type_ids_BT)
            + self.position_embeddings(position_ids_BT)
        )
        return self.dropout(self.LayerNorm(x_BTD), deterministic=deterministic, rng=rng)


class BertSelfOutput(nnx.Module):
    def __init__(self, cfg: BertConfig, din: int, in_axis: str, *, rngs: nnx.Rngs):
        self.dense = linear(cfg, din, cfg.hidden_size, (in_axis, "embed"), rngs=rngs, std=cfg.initializer_range)
        self.LayerNorm = layer_norm(cfg, cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def __call__(self, h, residual_BTD, *, deterministic, rng, within=None):
        h = self.dropout(self.dense(h), deterministic=deterministic, rng=rng, within=within)
        return self.LayerNorm(h + residual_BTD)


class BertAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        # HF names: attention.self / attention.output ('self' is fine as an attribute name here).
        setattr(self, "self", SelfAttention(cfg, rngs=rngs))
        self.output = BertSelfOutput(cfg, cfg.hidden_size, "heads", rngs=rngs)

    def __call__(self, x_BTD, bias, *, deterministic, keys, first_token_only=False):
        h = getattr(self, "self")(x_BTD, bias, deterministic=deterministic, rng=keys(),
                                  first_token_only=first_token_only)
        residual = x_BTD[:, :1] if first_token_only else x_BTD
        return self.output(h, residual, deterministic=deterministic, rng=keys(), within=x_BTD.shape)


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = linear(cfg, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs=rngs,
                            std=cfg.initializer_range)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x_BTD):
        return self.act(self.dense(x_BTD))


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.attention = BertAttention(cfg, rngs=rngs)
        self.intermediate = BertIntermediate(cfg, rngs=rngs)
        self.output = BertSelfOutput(cfg, cfg.intermediate_size, "mlp", rngs=rngs)

    def __call__(self, x_BTD, bias, rng, *, deterministic, first_token_only=False):
        """`first_token_only`: return the layer's output for the first token only, (B, 1, D),
        computing only what it needs (its keys and values still come from every token)."""
        keys = KeySplitter(rng)
        h_BTD = self.attention(x_BTD, bias, deterministic=deterministic, keys=keys,
                               first_token_only=first_token_only)
        return self.output(self.intermediate(h_BTD), h_BTD, deterministic=deterministic, rng=keys(),
                           within=x_BTD.shape)


class BertPooler(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", None), rngs=rngs,
                            std=cfg.initializer_range)

    def __call__(self, x_BTD):
        return jnp.tanh(self.dense(x_BTD[:, 0]))


class BertModel(nnx.Module):
    """The bare encoder: `last_hidden_state` and (with the pooler) `pooler_output`.

    `first_token_only=True` (what the sequence-classification heads pass: they read only the
    first token) runs the last layer for the first token only, so `last_hidden_state` is
    (B, 1, D); the values are the same. `output_hidden_states=True` computes every token.
    """

    hf_architecture = "BertModel"
    embeddings_cls = BertEmbeddings

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, add_pooling_layer: bool = True):
        self.config = cfg
        self.embeddings = self.embeddings_cls(cfg, rngs=rngs)
        self.encoder = LayerStack(cfg, BertLayer, rngs=rngs)
        self.pooler = BertPooler(cfg, rngs=rngs) if add_pooling_layer else None

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        *,
        deterministic: bool = True,
        rngs=None,
        output_hidden_states: bool = False,
        first_token_only: bool = False,
    ) -> ModelOutput:
        keys = KeySplitter(None if deterministic else as_key(rngs))
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        x_BTD = self.embeddings(
            input_ids, token_type_ids, position_ids, deterministic=deterministic, rng=keys()
        )
        bias = attention_bias(attention_mask, jnp.float32)
        x_BTD, hidden = self.encoder(
            x_BTD, bias, deterministic=deterministic, keys=keys,
            output_hidden_states=output_hidden_states,
            first_token_only=first_token_only and not output_hidden_states,
        )
        pooled = self.pooler(x_BTD) if self.pooler is not None else None
        return ModelOutput(last_hidden_state=x_BTD, pooler_output=pooled, hidden_states=hidden)


def _classifier_dropout(cfg: BertConfig) -> float:
    return cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob


class BertTaskModel(TaskModel):
    """What every task head shares: the base model under HF's `base_model_prefix` attribute.

    Other families reuse the heads by changing `base_prefix` / `base_cls` (RoBERTa: 'roberta').
    """

    base_prefix = "bert"
    base_cls = BertModel
    add_pooling_layer = False

    def base_kwargs(self) -> dict:
        return {"add_pooling_layer": self.add_pooling_layer}

    @property
    def word_embeddings(self) -> nnx.Embed:
        return self.base.embeddings.word_embeddings


class BertForSequenceClassification(BertTaskModel):
    """Pooled [CLS] -> dropout -> linear. Loss by `problem_type` lives in jaxtune.tasks.

    Returns `logits` (and `hidden_states` when asked), not `last_hidden_state`, as transformers'
    head does: the last layer runs for the [CLS] token alone (see `BertModel`).
    """

    hf_architecture = "BertForSequenceClassification"
    add_pooling_layer = True
    first_token_only = True

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.dropout = Dropout(_classifier_dropout(cfg))
        self.classifier = linear(cfg, cfg.hidden_size, cfg.num_labels, ("embed", "classes"), rngs=rngs,
                                 std=cfg.initializer_range)

    def head(self, out, *, deterministic, keys):
        return self.classifier(self.dropout(out.pooler_output, deterministic=deterministic, rng=keys()))


class BertForTokenClassification(BertTaskModel, TokenClassifier):
    hf_architecture = "BertForTokenClassification"

    def classifier_dropout(self, cfg: BertConfig) -> float:
        return _classifier_dropout(cfg)


class BertPredictionHeadTransform(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", None), rngs=rngs,
                            std=cfg.initializer_range)
        self.act = activation(cfg.hidden_act)
        self.LayerNorm = layer_norm(cfg, cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x_BTD):
        return self.LayerNorm(self.act(self.dense(x_BTD)))


class BertLMPredictionHead(nnx.Module):
    """The decoder is tied to the word embeddings; only its bias is a parameter of its own."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.transform = BertPredictionHeadTransform(cfg, rngs=rngs)
        self.bias = tied_decoder_bias(cfg, cfg.vocab_size)

    def __call__(self, x_BTD, word_embeddings: nnx.Embed):
        return word_embeddings.attend(self.transform(x_BTD)) + self.bias[...]


class BertOnlyMLMHead(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.predictions = BertLMPredictionHead(cfg, rngs=rngs)

    def __call__(self, x_BTD, word_embeddings):
        return self.predictions(x_BTD, word_embeddings)


class BertForMaskedLM(BertTaskModel):
    hf_architecture = "BertForMaskedLM"

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.cls = BertOnlyMLMHead(cfg, rngs=rngs)

    def head(self, out, *, deterministic, keys):
        return self.cls(out.last_hidden_state, self.word_embeddings)


# task -> head class: the family record's table (jaxtune.models.bert.FAMILY)
HEADS = {"base": BertModel, "sequence-classification": BertForSequenceClassification,
         "token-classification": BertForTokenClassification, "masked-lm": BertForMaskedLM}
