"""Wav2Vec2 and HuBERT (`model_type` wav2vec2, hubert): base encoder and CTC head, one set of
blocks (`modeling.py`) and one key table (`params.py`); `FAMILIES` maps each model_type to its
record (HuBERT's base model sits under `hubert`, Wav2Vec2's under `wav2vec2`)."""

from jaxtune.models.family import define
from jaxtune.models.wav2vec2 import modeling, params

# the feature encoder, projection, SpecAugment vector and positional convolution -> depth 0,
# encoder.layers.i -> i + 1, the encoder's layer_norm and lm_head -> L + 1
_EMBEDDINGS = ("feature_extractor", "feature_projection", "masked_spec_embed", "pos_conv_embed")

FAMILY = define(config_cls=modeling.Wav2Vec2Config, heads=modeling.HEADS, base_prefix="wav2vec2", params=params,
                layers=(_EMBEDDINGS, "layers"))
HUBERT = define(config_cls=modeling.HubertConfig, heads=modeling.HUBERT_HEADS, base_prefix="hubert", params=params,
                layers=(_EMBEDDINGS, "layers"))
FAMILIES = {"wav2vec2": FAMILY, "hubert": HUBERT}

__all__ = ["FAMILIES", "FAMILY", "HUBERT"]
