"""On-device augmentation (jaxtune.data.augment): the same key draws the same batch and another
key another; crops equal PIL's bilinear resize of the same box; mixup / cutmix labels are rows
summing to one whose weight is the share of each image kept; draws do not depend on the mesh;
the recipe's data.augment mapping is validated with one-line errors; the soft-label loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from jaxtune.config import ConfigError, load_recipe
from jaxtune.data.augment import AUGMENT_STREAM, Augment, crop_boxes, mix, random_resized_crop, with_augmentation
from jaxtune.tasks import get_task

K = 5
FULL = Augment(num_classes=K, crop_scale=(0.2, 1.0), hflip=True, mixup=0.4, cutmix=1.0, label_smoothing=0.1)
FULL_JIT = jax.jit(FULL.__call__)  # one compilation shared by the tests (batches of 8)


def batch(n: int = 8, hw=(20, 16), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"pixel_values": jnp.asarray(rng.normal(size=(n, 2, *hw)).astype(np.float32)),
            "labels": jnp.asarray(rng.integers(0, K, n).astype(np.int32))}


def test_same_key_same_draw_other_key_other_draw():
    b = batch()
    f = FULL_JIT
    one, again, other = f(b, jax.random.PRNGKey(1)), f(b, jax.random.PRNGKey(1)), f(b, jax.random.PRNGKey(2))
    for k in ("pixel_values", "label_probs"):
        np.testing.assert_array_equal(np.asarray(one[k]), np.asarray(again[k]))
    assert not np.allclose(np.asarray(one["pixel_values"]), np.asarray(other["pixel_values"]))
    assert not np.allclose(np.asarray(one["pixel_values"]), np.asarray(b["pixel_values"]))
    np.testing.assert_array_equal(np.asarray(one["labels"]), np.asarray(b["labels"]))  # kept for accuracy


def test_crops_equal_pils_bilinear_resize_of_the_same_box():
    b = batch(6)
    x = np.asarray(b["pixel_values"])
    key = jax.random.PRNGKey(3)
    out = np.asarray(jax.jit(random_resized_crop, static_argnums=(2,))(b["pixel_values"], key, (0.1, 0.6)))
    boxes = jax.jit(crop_boxes, static_argnums=(1, 2, 3, 4, 5))(key, 6, 20, 16, (0.1, 0.6), (3 / 4, 4 / 3))
    top, left, ch, cw = (np.asarray(a) for a in boxes)
    assert len({(t, l, h, w) for t, l, h, w in zip(top, left, ch, cw)}) == 6  # each image its own box
    for i in range(6):
        area = ch[i] * cw[i] / (20 * 16)
        assert 0.1 - 0.05 <= area <= 0.6 + 0.05 and 0 <= top[i] <= 20 - ch[i] and 0 <= left[i] <= 16 - cw[i]
        for c in range(2):
            ref = Image.fromarray(x[i, c], mode="F").resize(
                (16, 20), Image.BILINEAR, box=(int(left[i]), int(top[i]), int(left[i] + cw[i]), int(top[i] + ch[i])))
            np.testing.assert_allclose(out[i, c], np.asarray(ref), atol=1e-4)
    # the whole image at its own ratio is the identity
    whole = jax.jit(random_resized_crop, static_argnums=(2, 3))(b["pixel_values"], key, (1.0, 1.0), (0.8, 0.8))
    np.testing.assert_allclose(np.asarray(whole), x, atol=1e-6)


def test_mixed_labels_sum_to_one_and_weigh_what_each_image_kept():
    mixup, cutmix = 0.4, 1.0  # both on: 12 draws see both kinds (one compilation)
    aug = Augment(num_classes=K, mixup=mixup, cutmix=cutmix, label_smoothing=0.1)
    b = batch()
    x = np.asarray(b["pixel_values"])

    def draw(key):  # what the loss sees, and `mix` itself on the key Augment hands it (the third)
        out = aug(b, key)
        mixed, lam = mix(b["pixel_values"], jax.random.split(key, 3)[2], mixup=mixup, cutmix=cutmix)
        return out["pixel_values"], out["label_probs"], mixed, lam

    images, probs, mixed, lams = (np.asarray(a) for a in jax.jit(jax.vmap(draw))(
        jax.random.split(jax.random.PRNGKey(0), 12)))
    np.testing.assert_array_equal(mixed, images)
    assert probs.shape == (12, 8, K) and (probs >= 0).all() and ((lams >= 0) & (lams <= 1)).all()
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    onehot = np.eye(K)[np.asarray(b["labels"])] * 0.9 + 0.1 / K
    kinds = set()
    for image, p, lam in zip(images, probs, lams):
        np.testing.assert_allclose(p, lam * onehot + (1 - lam) * onehot[::-1], atol=1e-6)
        if np.all((image == x) | (image == x[::-1])):  # cutmix: each pixel from one of the two images
            kinds.add("cutmix")
            np.testing.assert_allclose(np.mean(image == x, axis=(1, 2, 3)), lam, atol=1e-6)
        else:  # mixup: the convex combination with the reversed batch
            kinds.add("mixup")
            np.testing.assert_allclose(image, lam * x + (1 - lam) * x[::-1], atol=1e-5)
    assert kinds == {"mixup", "cutmix"}


def test_draws_do_not_depend_on_the_mesh():
    b = batch()
    key = jax.random.PRNGKey(7)
    one = FULL_JIT(b, key)
    mesh = jax.make_mesh((8,), ("data",))
    sharded = jax.device_put(b, NamedSharding(mesh, P("data")))
    eight = FULL_JIT(sharded, key)
    for k in ("pixel_values", "label_probs"):
        np.testing.assert_allclose(np.asarray(eight[k]), np.asarray(one[k]), atol=1e-6)


def test_the_loss_sees_augmented_batches_and_soft_labels():
    task = get_task("image-classification", None)

    def loss_fn(params, batch, rng):  # uniform logits; the batch it saw comes back as aux
        return task.loss(params["w"] * jnp.ones((batch["labels"].shape[0], K)), batch)[0], batch

    wrapped = with_augmentation(loss_fn, FULL)
    b, rng = batch(), jax.random.PRNGKey(0)
    loss, seen = jax.jit(wrapped)({"w": jnp.float32(0.0)}, b, rng)
    expected = FULL_JIT(b, jax.random.fold_in(rng, AUGMENT_STREAM))
    np.testing.assert_allclose(np.asarray(seen["pixel_values"]), np.asarray(expected["pixel_values"]), atol=1e-5)
    np.testing.assert_allclose(float(loss), np.log(K), rtol=1e-6)  # uniform logits: log K whatever the labels
    assert with_augmentation(loss_fn, None) is loss_fn
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(8, K)).astype(np.float32))
    probs = expected["label_probs"]
    want = -np.mean(np.sum(np.asarray(probs) * np.asarray(jax.nn.log_softmax(logits)), -1))
    np.testing.assert_allclose(float(task.loss(logits, {**b, "label_probs": probs})[0]), want, rtol=1e-5)


def test_the_recipe_mapping_and_its_one_line_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: image-classification\nmodel: {config: {model_type: resnet}}\n"
                      "data: {augment: {crop_scale: [0.3, 1], hflip: true, mixup: 0.2, cutmix: 1.0}}\n")
    r = load_recipe(recipe)
    aug = Augment.from_config(r.data.augment, 10)
    assert aug.crop_scale == (0.3, 1.0) and aug.hflip and aug.mixup == 0.2 and aug.cutmix == 1.0
    assert Augment.from_config(load_recipe(recipe, ["data.augment=true"]).data.augment, 10) is None
    for override, needle in (
        ("data.augment={mixpu: 0.2}", "unknown key 'data.augment.mixpu'; did you mean 'data.augment.mixup'"),
        ("data.augment={crop_scale: [0.5, 1.5]}", "data.augment.crop_scale must be [low, high]"),
        ("data.augment={cutmix: -1}", "data.augment.cutmix must be >= 0"),
        ("data.augment={mix_prob: 2}", "data.augment.mix_prob must be in [0, 1]"),
    ):
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")) as e:
            load_recipe(recipe, [override])
        assert "\n" not in str(e.value)


def test_a_vit_trains_on_augmented_batches_too():
    """Any image family: the wrapper sits in front of the model's loss (here a tiny ViT's)."""
    import optax

    from jaxtune.models import from_config, split
    from jaxtune.tasks import make_loss_fn
    from jaxtune.train import init_state, make_train_step

    vit = from_config(dict(model_type="vit", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, image_size=[20, 16], patch_size=4, num_channels=2,
                           num_labels=K), "image-classification")
    tx = optax.sgd(0.1)
    state = init_state(split(vit)[1], jax.random.PRNGKey(0), tx=tx)
    plain = make_train_step(make_loss_fn(vit), tx)
    crop_flip = Augment(num_classes=K, crop_scale=(0.3, 1.0), hflip=True, label_smoothing=0.1)
    augmented = jax.jit(make_train_step(with_augmentation(make_loss_fn(vit), crop_flip), tx))
    b = batch()
    (_, m_plain), (_, m_aug) = jax.jit(plain)(state, b), augmented(state, b)
    assert np.isfinite(float(m_aug["loss"])) and float(m_aug["loss"]) != float(m_plain["loss"])
    # the step's own key decides the draw: the same state gives the same loss
    np.testing.assert_array_equal(float(augmented(state, b)[1]["loss"]), float(m_aug["loss"]))
