"""Recipes: every bundled recipe validates; overrides; typed validation errors."""

import pytest

from jaxtune.config import (
    Recipe,
    apply_overrides,
    bundled_recipes,
    from_dict,
    load_recipe,
    parse_override,
    replace,
)
from jaxtune.errors import ConfigError

MINIMAL = {"task": "sequence-classification", "model": {"path": "some/folder"}}


@pytest.mark.parametrize("name", sorted(bundled_recipes()))
def test_every_bundled_recipe_validates_and_starts_with_its_command(name):
    path = bundled_recipes()[name]
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe)
    assert recipe.name == name
    first = path.read_text().splitlines()[0]
    assert first.startswith("# jaxtune run "), f"{path} must start with its exact command"


def test_defaults_and_types():
    r = from_dict(MINIMAL)
    assert r.optim.name == "adamw" and r.optim.lr == 5e-5
    assert r.train.batch_size == 32 and r.mesh.data == -1
    assert r.data.max_length == 128 and r.checkpoint.keep == 2


def test_overrides_apply_as_yaml_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("task: sequence-classification\nmodel: {path: x}\ntrain: {epochs: 1}\n")
    r = load_recipe(
        path,
        [
            "train.steps=7",
            "optim.lr=3e-5",
            "optim.freeze=[embeddings, 'layer/0/']",
            "optim.lr_multipliers={classifier: 10}",
            "train.early_stopping.patience=2",
            "output_dir=/tmp/out",
            "model.config.hidden_dropout_prob=0.0",
        ],
    )
    assert r.train.steps == 7 and r.train.epochs == 1
    assert r.optim.lr == pytest.approx(3e-5)
    assert r.optim.freeze == ["embeddings", "layer/0/"]
    assert r.optim.lr_multipliers == {"classifier": 10.0}
    assert r.train.early_stopping.patience == 2 and r.train.early_stopping.mode == "min"
    assert r.output_dir == "/tmp/out"
    assert r.model.config == {"hidden_dropout_prob": 0.0}
    assert r.name == "r"


def test_yaml_reads_5e_5_as_a_string_and_we_still_take_it():
    r = from_dict({**MINIMAL, "optim": {"lr": "5e-5"}})
    assert r.optim.lr == pytest.approx(5e-5)


def test_replace_returns_a_validated_copy():
    r = from_dict(MINIMAL)
    r2 = replace(r, **{"train.steps": 3, "optim.lr": 1e-3})
    assert (r2.train.steps, r2.optim.lr, r.train.steps) == (3, 1e-3, None)
    with pytest.raises(ConfigError, match="train.steps"):
        replace(r, **{"train.steps": "many"})


@pytest.mark.parametrize(
    "raw, message",
    [
        ({**MINIMAL, "trian": {}}, "unknown key 'trian'; did you mean 'train'"),
        ({**MINIMAL, "optim": {"lrr": 1}}, "unknown key 'optim.lrr'; did you mean 'optim.lr'"),
        ({**MINIMAL, "train": {"batch_size": "big"}}, "train.batch_size: expected an integer"),
        ({**MINIMAL, "train": {"batch_size": 0}}, "train.batch_size must be positive"),
        ({**MINIMAL, "optim": {"name": "adamx"}}, "optim.name: 'adamx' is not one of"),
        ({**MINIMAL, "task": "classify"}, "task: 'classify' is not one of"),
        ({"model": {"path": "x"}}, "missing required key 'task'"),
        ({"task": "sequence-classification"}, "missing required key 'model.path'"),
        ({**MINIMAL, "optim": {"lr": -1.0}}, "optim.lr must be >= 0"),
        ({**MINIMAL, "optim": {"freeze": "embeddings"}}, "optim.freeze: expected a list"),
        ({**MINIMAL, "mesh": {"data": 0}}, "mesh.data must be a positive size or -1"),
        ({**MINIMAL, "train": {"early_stopping": {"mode": "up"}}}, "train.early_stopping.mode"),
        ({**MINIMAL, "model": {"path": "x", "remat": "yes"}}, "model.remat: expected true or false"),
    ],
)
def test_bad_recipes_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        from_dict(raw, "r.yaml")
    text = str(err.value)
    assert message in text and text.startswith("r.yaml: ") and "\n" not in text


@pytest.mark.parametrize("text", ["train.steps", "=3", "train..steps=3", ".steps=1"])
def test_malformed_overrides(text):
    with pytest.raises(ConfigError, match="malformed override"):
        parse_override(text)


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="'task' is not a section"):
        apply_overrides({"task": "x"}, ["task.sub=1"])


@pytest.mark.parametrize("raw,message", [
    ({"model": {"path": "base", "adapter": "peft"}, "lora": {"rank": 4}},
     "model.adapter brings its own LoRA settings (rank, alpha, targets, head); remove the lora section"),
    ({"model": {"adapter": "peft", "config": {"model_type": "bert"}}},
     "model.adapter needs model.path, the base model the adapter was trained on"),
    ({"model": {"path": "base"}, "lora": {"base_dtype": "int4"}}, "lora.base_dtype: 'int4' is not one of int8, nf4"),
])
def test_lora_adapter_and_base_dtype_mistakes_are_one_line(raw, message):
    with pytest.raises(ConfigError) as e:
        from_dict({"task": "sequence-classification", **raw}, "r.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)
