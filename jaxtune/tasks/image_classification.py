"""Image classification: one label per image, from `pixel_values` (B, C, H, W) float32.

The loss and metrics are sequence classification's (they only see logits and labels): cross-entropy
weighted by `batch['weights']`; over a split `loss`, `accuracy` and `macro_f1` (classes that occur
as label or prediction). Multi-label and regression targets work as there, by `problem_type`.
Prediction reads image files and preprocesses them as evaluation does. Training may see soft labels
(`label_probs`, from mixup / cutmix on the device: `jaxtune.data.augment`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import optax

from jaxtune.data.image import ImageEncoder, ImageSettings, image_settings_from_model
from jaxtune.errors import DataError
from jaxtune.tasks.base import example_weights, weighted_mean
from jaxtune.tasks.predicting import forward
from jaxtune.tasks.sequence_classification import SequenceClassification

NAME = "image-classification"


@dataclass(frozen=True)
class ImageClassification(SequenceClassification):
    name: str = NAME
    head: str = NAME
    data_kind: ClassVar[str] = "image"
    modality: ClassVar[str] = "image"

    def loss(self, logits_BK, batch):
        """With `batch['label_probs']` (B, K) (mixup / cutmix / label smoothing on the device,
        `jaxtune.data.augment`): cross-entropy against those soft labels, accuracy against the
        integer labels; otherwise sequence classification's loss."""
        if "label_probs" not in batch:
            return super().loss(logits_BK, batch)
        w_B = example_weights(batch, logits_BK.shape[0])
        loss = weighted_mean(optax.softmax_cross_entropy(logits_BK, batch["label_probs"]), w_B)
        return loss, {"accuracy": weighted_mean((logits_BK.argmax(-1) == batch["labels"]).astype("float32"), w_B)}

    def predict(self, loaded, paths: Sequence[str], *, batch: int = 32) -> list[dict]:
        """Classify image files, preprocessed like the model's evaluation."""
        config = loaded.model.config
        settings = image_settings_from_model(loaded.tokenizer_dir) if loaded.tokenizer_dir else None
        settings = ImageSettings.from_any(settings)
        if settings.size is None and getattr(config, "image_size", None):
            settings = settings.with_size(config.image_size)
        encoder = ImageEncoder(settings, getattr(config, "num_channels", 3))
        logits_of = forward(loaded)
        results = []
        for i in range(0, len(paths), batch):
            chunk = list(paths[i:i + batch])
            images = []
            for p in chunk:
                try:
                    images.append({"image": Path(p).read_bytes()})
                except OSError as e:
                    raise DataError(f"cannot read image {p}: {e.strerror}") from None
            logits = logits_of({"pixel_values": encoder(images, where=chunk)})
            results += [{"input": p, **s} for p, s in zip(chunk, self.scores(config, logits))]
        return results


def make(config=None) -> ImageClassification:
    return ImageClassification(
        num_labels=getattr(config, "num_labels", 2),
        problem_type=getattr(config, "problem_type", None),
    )


__all__ = ["ImageClassification", "NAME", "make"]
