"""LoRA (Hu et al. 2021) on any jaxtune model, without copying it.

    spec = jaxtune.lora.apply(model, rank=8, alpha=16, targets=r"attention/self/(query|value)/kernel$")
    trainable, frozen = jaxtune.lora.partition(model)
    loss_fn = jaxtune.lora.make_loss_fn(model)     # for make_train_step(..., has_model_state=True)
    merged = jaxtune.lora.merged_params(spec, jaxtune.lora.combine(trainable, frozen))

Modules: `layers` (the adapted layer, adapter dropout), `apply` (targets, train_also, the split
into trainable and frozen, merging), `steps` (loss / eval functions for the pure steps), `peft` (PEFT adapter folders, both ways),
`quant` (QLoRA: the frozen base's matrices as int8 / NF4 QTensors).
"""

from jaxtune.lora.apply import (
    LoRASpec, apply, check, combine, default_targets, default_train_also, is_lora, merged_params, partition,
    select, spec_of,
)
from jaxtune.lora.layers import LORA_LEAVES, dropout_keys, is_adapted
from jaxtune.lora.peft import load_peft, read_adapter, save_peft
from jaxtune.lora.quant import QTensor, quantize
from jaxtune.lora.steps import make_eval_fn, make_loss_fn

__all__ = ["LORA_LEAVES", "LoRASpec", "QTensor", "apply", "check", "combine", "default_targets",
           "default_train_also", "dropout_keys", "is_adapted", "is_lora", "load_peft", "make_eval_fn", "make_loss_fn",
           "merged_params", "partition", "quantize", "read_adapter", "save_peft", "select", "spec_of"]
