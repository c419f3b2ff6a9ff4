"""Bad input: each case raises ModelLoadError with one line that names the problem."""

from __future__ import annotations

import json
import logging
import shutil
import sys

import pytest

from jaxtune.errors import ModelLoadError
from jaxtune.models import from_pretrained, supported_model_types


def load_error(*args, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as info:
        from_pretrained(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def copy_of(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_folder_missing(tmp_path):
    assert str(tmp_path / "nope") in load_error(tmp_path / "nope")


def test_no_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "no config.json" in load_error(tmp_path)


def test_invalid_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert "config.json: invalid JSON" in load_error(tmp_path)


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    message = load_error(tmp_path)
    assert "unsupported model_type 'mamba'" in message
    assert ", ".join(supported_model_types()) in message and "bert, distilbert" in message


def test_shape_mismatch_names_the_key_and_both_shapes(tiny):
    t = tiny("bert", "sequence-classification", num_labels=3)
    message = load_error(t.path, num_labels=5)
    assert "classifier.weight: checkpoint (3, 30) vs model (5, 30)" in message
    assert "classifier.bias: checkpoint (3,) vs model (5,)" in message


def test_ignore_mismatched_sizes_reinitialises_the_head(tiny, caplog):
    t = tiny("bert", "sequence-classification", num_labels=3)
    with caplog.at_level(logging.WARNING, logger="jaxtune"):
        model = from_pretrained(t.path, num_labels=5, ignore_mismatched_sizes=True)
    assert model.classifier.kernel[...].shape == (30, 5)
    assert "classifier.weight" in caplog.text


def test_missing_encoder_weights_are_listed_together(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = copy_of(tiny("bert", "base").path, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["encoder.layer.1.output.dense.weight"], tensors["embeddings.LayerNorm.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    message = load_error(folder)
    assert "missing from the checkpoint" in message
    assert "embeddings.LayerNorm.bias" in message and "encoder.layer.1.output.dense.weight" in message


def test_truncated_safetensors(tiny, tmp_path):
    folder = copy_of(tiny("bert", "base").path, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    message = load_error(folder)
    assert "model.safetensors" in message and "truncated" in message


def test_corrupt_safetensors(tiny, tmp_path):
    folder = copy_of(tiny("bert", "base").path, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\x00garbage, not a JSON header \xff\xfe"
    weights.write_bytes(bytes(data))
    message = load_error(folder)
    assert "model.safetensors" in message and "corrupt" in message


def test_no_weights_file(tiny, tmp_path):
    (tmp_path / "config.json").write_bytes((tiny("bert", "base").path / "config.json").read_bytes())
    assert "no weights found" in load_error(tmp_path)


def test_shard_named_in_the_index_is_missing(tiny, tmp_path):
    tiny("bert", "base").model.save_pretrained(tmp_path, max_shard_size="20KB")
    next(tmp_path.glob("model-*.safetensors")).unlink()
    assert "which is missing" in load_error(tmp_path)


def test_bin_without_torch(tiny, tmp_path, monkeypatch):
    import torch

    t = tiny("bert", "base")
    shutil.copy(t.path / "config.json", tmp_path / "config.json")
    torch.save(t.model.state_dict(), tmp_path / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    message = load_error(tmp_path)
    assert "pytorch_model.bin" in message and "PyTorch" in message


def test_task_not_supported_by_the_architecture(tiny):
    message = load_error(tiny("distilbert", "base").path, task="question-answering")
    assert "'question-answering'" in message and "distilbert" in message
    assert "sequence-classification" in message


def test_hub_id_not_in_cache():
    message = load_error("jaxtune-test/not-in-any-cache")
    assert "'jaxtune-test/not-in-any-cache'" in message and "cache" in message


def test_unknown_activation(tiny, tmp_path):
    folder = copy_of(tiny("bert", "base").path, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["hidden_act"] = "swiglu_of_the_future"
    (folder / "config.json").write_text(json.dumps(config))
    assert "hidden_act 'swiglu_of_the_future' is not supported" in load_error(folder)


def test_untied_mlm_decoder_is_refused(tiny, tmp_path):
    folder = copy_of(tiny("roberta", "masked-lm").path, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    assert "tie_word_embeddings" in load_error(folder)
