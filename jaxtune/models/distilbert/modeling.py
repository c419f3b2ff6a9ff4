"""DistilBERT in Flax NNX, laid out like transformers' `modeling_distilbert`.

A 6-layer BERT without token types or pooler, post-LN blocks named `attention` (q_lin, k_lin,
v_lin, out_lin), `sa_layer_norm`, `ffn` (lin1, lin2), `output_layer_norm`; every LayerNorm uses
eps 1e-12. Config fields keep their HF names (dim, n_layers, n_heads, hidden_dim, ...).
Shapes in names: B batch, T tokens, D dim, N heads, H head dim, F hidden_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.models.activations import activation
from jaxtune.models.config import ConfigBase
from jaxtune.models.dropout import Dropout, KeySplitter, as_key
from jaxtune.models.heads import TaskModel, TiedDecoder, TokenClassifier
from jaxtune.models.layers import LayerStack, attention_bias, embed, layer_norm, linear, self_attention
from jaxtune.models.outputs import ModelOutput

LN_EPS = 1e-12  # hard-coded in transformers' DistilBERT


@dataclass(frozen=True)
class DistilBertConfig(ConfigBase):
    model_type = "distilbert"

    vocab_size: int = 30522
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False
    n_layers: int = 6
    n_heads: int = 12
    dim: int = 768
    hidden_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    initializer_range: float = 0.02
    qa_dropout: float = 0.1
    seq_classif_dropout: float = 0.2
    pad_token_id: int = 0
    tie_word_embeddings: bool = True

    attribute_map = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}
    activation_fields = ("activation",)


def sinusoidal_table(n_pos: int, dim: int) -> np.ndarray:
    """transformers' create_sinusoidal_embeddings: sin on even columns, cos on odd ones."""
    pos = np.arange(n_pos)[:, None]
    j = np.arange(dim)[None, :]
    angle = pos / np.power(10000, 2 * (j // 2) / dim)
    return np.where(j % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)


def sinusoidal_init(key, shape, dtype=jnp.float32):
    del key  # deterministic
    return jnp.asarray(sinusoidal_table(*shape), dtype)


class Embeddings(nnx.Module):
    def __init__(self, cfg: DistilBertConfig, *, rngs: nnx.Rngs):
        std = cfg.initializer_range
        self.word_embeddings = embed(cfg, cfg.vocab_size, cfg.dim, ("vocab", "embed"), rngs=rngs, std=std)
        # With sinusoidal_pos_embds a fresh model starts from the fixed table, as in transformers.
        init = sinusoidal_init if cfg.sinusoidal_pos_embds else None
        self.position_embeddings = embed(cfg, cfg.max_position_embeddings, cfg.dim, ("position", "embed"),
                                         rngs=rngs, std=std, init=init)
        self.LayerNorm = layer_norm(cfg, cfg.dim, LN_EPS, rngs=rngs)
        self.dropout = Dropout(cfg.dropout)

    def __call__(self, input_ids_BT, position_ids_BT, *, deterministic, rng):
        if position_ids_BT is None:
            position_ids_BT = jnp.broadcast_to(jnp.arange(input_ids_BT.shape[1]), input_ids_BT.shape)
        x_BTD = self.word_embeddings(input_ids_BT) + self.position_embeddings(position_ids_BT)
        return self.dropout(self.LayerNorm(x_BTD), deterministic=deterministic, rng=rng)


class DistilBertSelfAttention(nnx.Module):
    def __init__(self, cfg: DistilBertConfig, *, rngs: nnx.Rngs):
        D, std = cfg.dim, cfg.initializer_range
        self.num_heads = cfg.n_heads
        self.q_lin = linear(cfg, D, D, ("embed", "heads"), rngs=rngs, std=std)
        self.k_lin = linear(cfg, D, D, ("embed", "heads"), rngs=rngs, std=std)
        self.v_lin = linear(cfg, D, D, ("embed", "heads"), rngs=rngs, std=std)
        self.out_lin = linear(cfg, D, D, ("heads", "embed"), rngs=rngs, std=std)
        self.dropout_rate = cfg.attention_dropout

    def __call__(self, x_BTD, bias, *, deterministic, rng, first_token_only=False):
        """`first_token_only`: queries (and the output) for the first token only; keys all."""
        return self.out_lin(self_attention(
            self.q_lin, self.k_lin, self.v_lin, x_BTD, bias, self.num_heads, dropout_rate=self.dropout_rate,
            deterministic=deterministic, rng=rng, first_token_only=first_token_only))


class FFN(nnx.Module):
    def __init__(self, cfg: DistilBertConfig, *, rngs: nnx.Rngs):
        std = cfg.initializer_range
        self.lin1 = linear(cfg, cfg.dim, cfg.hidden_dim, ("embed", "mlp"), rngs=rngs, std=std)
        self.lin2 = linear(cfg, cfg.hidden_dim, cfg.dim, ("mlp", "embed"), rngs=rngs, std=std)
        self.act = activation(cfg.activation)
        self.dropout = Dropout(cfg.dropout)

    def __call__(self, x_BTD, *, deterministic, rng, within=None):
        return self.dropout(self.lin2(self.act(self.lin1(x_BTD))), deterministic=deterministic, rng=rng,
                            within=within)


class TransformerBlock(nnx.Module):
    def __init__(self, cfg: DistilBertConfig, *, rngs: nnx.Rngs):
        self.attention = DistilBertSelfAttention(cfg, rngs=rngs)
        self.sa_layer_norm = layer_norm(cfg, cfg.dim, LN_EPS, rngs=rngs)
        self.ffn = FFN(cfg, rngs=rngs)
        self.output_layer_norm = layer_norm(cfg, cfg.dim, LN_EPS, rngs=rngs)

    def __call__(self, x_BTD, bias, rng, *, deterministic, first_token_only=False):
        """`first_token_only`: the output for the first token only, (B, 1, D) (see DistilBertModel)."""
        keys = KeySplitter(rng)
        h = self.attention(x_BTD, bias, deterministic=deterministic, rng=keys(), first_token_only=first_token_only)
        h_BTD = self.sa_layer_norm(h + (x_BTD[:, :1] if first_token_only else x_BTD))
        h = self.ffn(h_BTD, deterministic=deterministic, rng=keys(), within=x_BTD.shape)
        return self.output_layer_norm(h + h_BTD)


class DistilBertModel(nnx.Module):
    """The bare encoder: `last_hidden_state` (no pooler).

    `token_type_ids` is accepted so that batches built for BERT run unchanged, and ignored:
    DistilBERT has no token-type embeddings (transformers does not take the argument at all).
    `first_token_only=True` (what the sequence-classification head passes) runs the last layer
    for the first token only: `last_hidden_state` is (B, 1, D), with the same values.
    `output_hidden_states=True` computes every token.
    """

    hf_architecture = "DistilBertModel"

    def __init__(self, cfg: DistilBertConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.transformer = LayerStack(cfg, TransformerBlock, rngs=rngs)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                 deterministic: bool = True, rngs=None, output_hidden_states: bool = False,
                 first_token_only: bool = False) -> ModelOutput:
        del token_type_ids  # see the class docstring
        keys = KeySplitter(None if deterministic else as_key(rngs))
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        x_BTD = self.embeddings(input_ids, position_ids, deterministic=deterministic, rng=keys())
        x_BTD, hidden = self.transformer(
            x_BTD, attention_bias(attention_mask, jnp.float32), deterministic=deterministic, keys=keys,
            output_hidden_states=output_hidden_states,
            first_token_only=first_token_only and not output_hidden_states,
        )
        return ModelOutput(last_hidden_state=x_BTD, hidden_states=hidden)


class DistilBertTaskModel(TaskModel):
    """The base model under `distilbert`, as in transformers."""

    base_prefix = "distilbert"
    base_cls = DistilBertModel


class DistilBertForSequenceClassification(DistilBertTaskModel):
    """First token -> pre_classifier -> relu -> dropout -> classifier.

    Returns `logits` (and `hidden_states` when asked), not `last_hidden_state`, as transformers'
    head does: the last layer runs for the first token alone.
    """

    hf_architecture = "DistilBertForSequenceClassification"
    first_token_only = True

    def __init__(self, cfg: DistilBertConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        std = cfg.initializer_range
        self.pre_classifier = linear(cfg, cfg.dim, cfg.dim, ("embed", None), rngs=rngs, std=std)
        self.classifier = linear(cfg, cfg.dim, cfg.num_labels, (None, "classes"), rngs=rngs, std=std)
        self.dropout = Dropout(cfg.seq_classif_dropout)

    def head(self, out, *, deterministic, keys):
        h_BD = jax.nn.relu(self.pre_classifier(out.last_hidden_state[:, 0]))
        return self.classifier(self.dropout(h_BD, deterministic=deterministic, rng=keys()))


class DistilBertForTokenClassification(DistilBertTaskModel, TokenClassifier):
    hf_architecture = "DistilBertForTokenClassification"

    def classifier_dropout(self, cfg: DistilBertConfig) -> float:
        return cfg.dropout


class DistilBertForMaskedLM(DistilBertTaskModel):
    """vocab_transform -> activation -> vocab_layer_norm -> vocab_projector (tied)."""

    hf_architecture = "DistilBertForMaskedLM"

    def __init__(self, cfg: DistilBertConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.vocab_transform = linear(cfg, cfg.dim, cfg.dim, ("embed", None), rngs=rngs, std=cfg.initializer_range)
        self.act = activation(cfg.activation)
        self.vocab_layer_norm = layer_norm(cfg, cfg.dim, LN_EPS, rngs=rngs)
        self.vocab_projector = TiedDecoder(cfg)

    def head(self, out, *, deterministic, keys):
        h_BTD = self.vocab_layer_norm(self.act(self.vocab_transform(out.last_hidden_state)))
        return self.vocab_projector(h_BTD, self.distilbert.embeddings.word_embeddings)


# task -> head class: the family record's table (jaxtune.models.distilbert.FAMILY)
HEADS = {"base": DistilBertModel, "sequence-classification": DistilBertForSequenceClassification,
         "token-classification": DistilBertForTokenClassification, "masked-lm": DistilBertForMaskedLM}
