"""RoBERTa (and XLM-RoBERTa) in Flax NNX: BERT's encoder with RoBERTa's embeddings and heads.

Differences from BERT, all from transformers' `modeling_roberta`: position ids count only non-pad
tokens and start after `pad_token_id`; the base model sits under `roberta`; the classification
head reads the <s> token through dense -> tanh -> out_proj (no pooler); the MLM head is
lm_head.dense -> gelu -> lm_head.layer_norm -> tied decoder + lm_head.bias.
XLM-RoBERTa checkpoints have the same layout under another `model_type` and class names.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.models.bert.modeling import (
    BertConfig,
    BertEmbeddings,
    BertForTokenClassification,
    BertModel,
    BertTaskModel,
    _classifier_dropout,
)
from jaxtune.models.activations import ACTIVATIONS
from jaxtune.models.dropout import Dropout
from jaxtune.models.heads import tied_decoder_bias
from jaxtune.models.layers import layer_norm, linear


@dataclass(frozen=True)
class RobertaConfig(BertConfig):
    """BERT's fields; defaults are transformers' RobertaConfig defaults (checkpoints set their own)."""

    model_type = "roberta"

    vocab_size: int = 50265
    pad_token_id: int = 1


@dataclass(frozen=True)
class XLMRobertaConfig(RobertaConfig):
    model_type = "xlm-roberta"

    vocab_size: int = 30522


class RobertaEmbeddings(BertEmbeddings):
    def __init__(self, cfg: RobertaConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.padding_idx = cfg.pad_token_id

    def default_position_ids(self, input_ids_BT: jax.Array) -> jax.Array:
        # HF create_position_ids_from_input_ids: non-pad tokens count up from padding_idx + 1,
        # pad tokens keep position padding_idx.
        mask_BT = (input_ids_BT != self.padding_idx).astype(jnp.int32)
        return jnp.cumsum(mask_BT, axis=1) * mask_BT + self.padding_idx


class RobertaModel(BertModel):
    hf_architecture = "RobertaModel"
    embeddings_cls = RobertaEmbeddings


class RobertaTaskModel(BertTaskModel):
    base_prefix = "roberta"
    base_cls = RobertaModel


class RobertaClassificationHead(nnx.Module):
    """<s> token -> dropout -> dense -> tanh -> dropout -> out_proj."""

    def __init__(self, cfg: RobertaConfig, *, rngs: nnx.Rngs):
        D, std = cfg.hidden_size, cfg.initializer_range
        self.dense = linear(cfg, D, D, ("embed", None), rngs=rngs, std=std)
        self.dropout = Dropout(_classifier_dropout(cfg))
        self.out_proj = linear(cfg, D, cfg.num_labels, (None, "classes"), rngs=rngs, std=std)

    def __call__(self, x_BTD, *, deterministic, keys):
        h_BD = self.dropout(x_BTD[:, 0], deterministic=deterministic, rng=keys())
        h_BD = jnp.tanh(self.dense(h_BD))
        h_BD = self.dropout(h_BD, deterministic=deterministic, rng=keys())
        return self.out_proj(h_BD)


class RobertaForSequenceClassification(RobertaTaskModel):
    hf_architecture = "RobertaForSequenceClassification"
    first_token_only = True

    def __init__(self, cfg: RobertaConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.classifier = RobertaClassificationHead(cfg, rngs=rngs)

    def head(self, out, *, deterministic, keys):
        return self.classifier(out.last_hidden_state, deterministic=deterministic, keys=keys)


class RobertaForTokenClassification(RobertaTaskModel, BertForTokenClassification):
    hf_architecture = "RobertaForTokenClassification"


class RobertaLMHead(nnx.Module):
    """dense -> gelu (always exact gelu, whatever hidden_act) -> layer_norm -> tied decoder + bias."""

    def __init__(self, cfg: RobertaConfig, *, rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.dense = linear(cfg, D, D, ("embed", None), rngs=rngs, std=cfg.initializer_range)
        self.layer_norm = layer_norm(cfg, D, cfg.layer_norm_eps, rngs=rngs)
        self.bias = tied_decoder_bias(cfg, cfg.vocab_size)

    def __call__(self, x_BTD, word_embeddings: nnx.Embed):
        h_BTD = self.layer_norm(ACTIVATIONS["gelu"](self.dense(x_BTD)))
        return word_embeddings.attend(h_BTD) + self.bias[...]


class RobertaForMaskedLM(RobertaTaskModel):
    hf_architecture = "RobertaForMaskedLM"

    def __init__(self, cfg: RobertaConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.lm_head = RobertaLMHead(cfg, rngs=rngs)

    def head(self, out, *, deterministic, keys):
        return self.lm_head(out.last_hidden_state, self.word_embeddings)


# XLM-RoBERTa: the same modules; only the class names written to config.json differ.
class XLMRobertaModel(RobertaModel):
    hf_architecture = "XLMRobertaModel"


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    hf_architecture = "XLMRobertaForSequenceClassification"


class XLMRobertaForTokenClassification(RobertaForTokenClassification):
    hf_architecture = "XLMRobertaForTokenClassification"


class XLMRobertaForMaskedLM(RobertaForMaskedLM):
    hf_architecture = "XLMRobertaForMaskedLM"


# task -> head class: the family records' tables (jaxtune.models.roberta.FAMILIES)
HEADS = {"base": RobertaModel, "sequence-classification": RobertaForSequenceClassification,
         "token-classification": RobertaForTokenClassification, "masked-lm": RobertaForMaskedLM}
XLM_HEADS = {"base": XLMRobertaModel, "sequence-classification": XLMRobertaForSequenceClassification,
             "token-classification": XLMRobertaForTokenClassification, "masked-lm": XLMRobertaForMaskedLM}
