"""Image classification: one label per image, from `pixel_values` (B, C, H, W) float32.

The loss and metrics are sequence classification's (they only see logits and labels): cross-entropy
weighted by `batch['weights']`; over a split `loss`, `accuracy` and `macro_f1` (classes that occur
as label or prediction). Multi-label and regression targets work as there, by `problem_type`.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxtune.tasks.sequence_classification import SequenceClassification

NAME = "image-classification"


@dataclass(frozen=True)
class ImageClassification(SequenceClassification):
    name: str = NAME
    head: str = NAME


def make(config=None) -> ImageClassification:
    return ImageClassification(
        num_labels=getattr(config, "num_labels", 2),
        problem_type=getattr(config, "problem_type", None),
    )


__all__ = ["ImageClassification", "NAME", "make"]
