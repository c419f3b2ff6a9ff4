"""PEFT adapter folders (jaxtune.lora.save_peft / load_peft): what jaxtune writes,
`peft.PeftModel.from_pretrained(transformers_model, folder)` reads with jaxtune's logits (fp32, padded
batch, 1e-4), the head under modules_to_save; GPT-2's fused Conv1D c_attn as fan_in_fan_out; a PEFT
adapter made by peft itself loads into jaxtune with PeftModel's logits; a folder that does not fit
is one ModelLoadError line."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxtune import lora
from jaxtune.errors import ModelLoadError
from jaxtune.models import flatten, from_pretrained, merge, split, unflatten

import _tiny_gpt2_vit as tg
import _tiny_llama as tl



CASES = [  # (family, task, transformers Auto class, input kind)
    ("bert", "sequence-classification", "AutoModelForSequenceClassification", "bert"),
    ("gpt2", "sequence-classification", "AutoModelForSequenceClassification", "tokens"),
    ("gpt2", "causal-lm", "AutoModelForCausalLM", "tokens"),
    ("llama", "causal-lm", "AutoModelForCausalLM", "tokens"),
    ("qwen3", "sequence-classification", "AutoModelForSequenceClassification", "tokens"),
]


def _path(arch, task, tiny, tiny2, tiny3):
    if arch == "gpt2":
        return tiny2(arch, task).path
    if arch in tl.MODEL_TYPES:
        return tiny3(arch, task).path
    return tiny(arch, task).path


def _batch(kind, path, batch_for):
    import transformers

    return tg.token_batch() if kind == "tokens" else batch_for(transformers.AutoConfig.from_pretrained(path))


def _perturbed(model, seed=1):
    """Every trainable param (adapters, head) moved randomly, so that all of them show in the logits."""
    trainable, frozen = lora.partition(model)
    key = jax.random.PRNGKey(seed)
    flat = {p: v + 0.2 * jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype)
            for i, (p, v) in enumerate(flatten(trainable).items())}
    return lora.combine(unflatten(flat), frozen)


def _logits(model, params, batch):
    graphdef, _, rest = split(model)
    return np.asarray(merge(graphdef, params, rest)(**batch).logits)


def _peft_logits(path, auto, folder, batch):
    import peft
    import transformers

    base = getattr(transformers, auto).from_pretrained(path).eval()
    wrapped = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    return tg.torch_forward(wrapped, batch).logits.numpy()


def _keep(batch, ref):
    return np.asarray(batch["attention_mask"], bool) if ref.ndim == 3 else None


@pytest.mark.parametrize("arch,task,auto,kind", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_save_peft_is_read_by_peft_with_jaxtunes_logits(arch, task, auto, kind, tiny, tiny2, tiny3, batch_for,
                                                          tmp_path):
    path = _path(arch, task, tiny, tiny2, tiny3)
    batch = _batch(kind, path, batch_for)
    model = from_pretrained(path, task)
    spec = lora.apply(model, rank=3, alpha=5.0)
    params = _perturbed(model)
    ours = _logits(model, params, batch)
    lora.save_peft(model, tmp_path, params)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == 5.0
    assert len([k for k in keys if k.endswith(".lora_A.weight")]) == len(spec.targets)
    assert all(k.startswith("base_model.model.") for k in keys)
    a = next(v for k, v in keys.items() if k.endswith(".lora_A.weight"))
    assert a.shape[0] == 3  # PEFT's (r, in)
    if task == "sequence-classification":  # the head trains in full: modules_to_save, plain HF keys
        head = "classifier" if arch == "bert" else "score"
        assert config["modules_to_save"] == [head] and f"base_model.model.{head}.weight" in keys
    else:
        assert config["modules_to_save"] is None
    if arch == "gpt2":  # Conv1D layers (c_attn fused q/k/v): (in, out) weights
        assert config["fan_in_fan_out"] is True
        assert keys["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape[1] == 3

    ref = _peft_logits(path, auto, tmp_path, batch)
    assert tg.max_diff(ours, ref, _keep(batch, ref)) < 1e-4

    # and back: the folder onto a fresh jaxtune base gives the same logits
    again = from_pretrained(path, task)
    back = lora.load_peft(again, tmp_path)
    assert set(back.targets) == set(spec.targets)
    np.testing.assert_allclose(np.asarray(again(**batch).logits), ours, atol=1e-5)


@pytest.mark.parametrize("arch,task,auto,kind,targets", [
    ("bert", "sequence-classification", "AutoModelForSequenceClassification", "bert", ["query", "value"]),
    ("gpt2", "causal-lm", "AutoModelForCausalLM", "tokens", ["c_attn", "c_fc"]),
    ("llama", "causal-lm", "AutoModelForCausalLM", "tokens", ["q_proj", "v_proj", "down_proj"]),
], ids=["bert", "gpt2", "llama"])
def test_an_adapter_made_by_peft_loads_into_jaxtune_with_peft_logits(arch, task, auto, kind, targets, tiny, tiny2,
                                                                      tiny3, batch_for, tmp_path):
    import peft
    import torch
    import transformers

    path = _path(arch, task, tiny, tiny2, tiny3)
    batch = _batch(kind, path, batch_for)
    torch.manual_seed(0)
    base = getattr(transformers, auto).from_pretrained(path)
    wrapped = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=7, target_modules=targets, fan_in_fan_out=arch == "gpt2",
        task_type="SEQ_CLS" if task == "sequence-classification" else "CAUSAL_LM"))
    with torch.no_grad():  # B random (PEFT starts it at 0) and the head moved: everything shows
        for name, p in wrapped.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    wrapped.save_pretrained(tmp_path)
    ref = _peft_logits(path, auto, tmp_path, batch)

    model = from_pretrained(path, task)
    spec = lora.load_peft(model, tmp_path)
    assert spec.rank == 4 and spec.alpha == 7.0
    ours = np.asarray(model(**batch).logits)
    assert tg.max_diff(ours, ref, _keep(batch, ref)) < 1e-4


def test_an_adapter_that_does_not_fit_is_one_line(tiny, tiny3, tmp_path):
    bert = tiny("bert", "sequence-classification").path
    llama = tiny3("llama", "causal-lm").path
    model = from_pretrained(llama, "causal-lm")
    lora.apply(model, rank=2)
    lora.save_peft(model, tmp_path / "llama")
    with pytest.raises(ModelLoadError, match="not a matrix of this bert model") as e:
        lora.load_peft(from_pretrained(bert, "sequence-classification"), tmp_path / "llama")
    assert "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="is not a PEFT adapter folder: no adapter_config.json"):
        lora.load_peft(from_pretrained(bert, "sequence-classification"), tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ModelLoadError, match="cannot read") as e:
        lora.load_peft(from_pretrained(bert, "sequence-classification"), tmp_path / "bad")
    assert "\n" not in str(e.value)
    (tmp_path / "bad" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(ModelLoadError, match="peft_type 'IA3'"):
        lora.load_peft(from_pretrained(bert, "sequence-classification"), tmp_path / "bad")
