"""Forgetting, measured: how much of what the pretrained model could do the fine-tuned backbone keeps.

A recipe names retention texts (`data.retention`: any data spec; the texts come from
`data.retention_column`, default `data.text_column`). At step 0 (the pretrained reference) and at
every evaluation, the run scores its current backbone on them with one of three measures, chosen
from what the checkpoint can do:

- `perplexity` (families with a causal-LM head: GPT-2, Llama, ...): the checkpoint's causal-LM
  model on the retention texts, its backbone (and a tied head) replaced by the current one;
  logs `loss` (mean token cross-entropy) and `perplexity`. Lower is better; step 0 is the
  pretrained model's.
- `masked-lm` (encoders whose checkpoint has its masked-LM head, e.g. bert-base-uncased): the
  checkpoint's MLM head, frozen at its pretrained weights (its decoder tied to the current word
  embeddings, as in the model), over the current backbone; 15% of each text's non-special tokens
  are replaced by the mask token, the same tokens at every evaluation (seeded by batch); logs
  `mlm_loss` (mean cross-entropy over masked tokens) and `mlm_accuracy`.
- `embedding` (encoders without one, e.g. all-MiniLM-L6-v2, a sentence-embedding model): each
  text's mean-pooled last hidden state; logs `rank_correlation`, the Spearman correlation between
  the pretrained model's and the current model's pairwise cosine similarities over all pairs of
  retention texts (1.0: the geometry of the embedding space is kept; it says whether texts that
  were close stay close, which is what a sentence-embedding model is used for), and
  `cosine_to_pretrained`, the mean cosine between each text's current and pretrained embedding.

Forward passes are pure and jitted on the run's mesh, like the eval step: `(state, frozen, batch)`
with the state's, the frozen head's and the batch's shardings. The retention model is the
checkpoint's head model (loaded once more from `model.path`) whose parameters the current model
also has are taken from the state at every call (a LoRA run: the adapters merged in); only the
rest (an MLM head, an untied LM head) is kept, frozen.

The same model gives the pretraining objective that EWC needs (`log_prob_fn`: the log-likelihood
of labels sampled from the model's own prediction; `jaxtune.ewc`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtune import lora
from jaxtune.data import Data, build_data
from jaxtune.errors import ConfigError, DataError
from jaxtune.models import family_of, flatten, from_pretrained, merge, split, unflatten
from jaxtune.tasks.base import model_inputs
from jaxtune.tasks.causal_lm import IGNORE, shifted_targets

MEASURES = ("perplexity", "masked-lm", "embedding")
SPLIT = "retention"  # the metrics.jsonl split (TensorBoard tags retention/<name>)
MASK_FRACTION = 0.15
MASK_SEED = 20261204  # the masked positions: fixed, so every evaluation scores the same tokens
METRICS = {
    "perplexity": ("loss", "perplexity"),
    "masked-lm": ("mlm_loss", "mlm_accuracy"),
    "embedding": ("rank_correlation", "cosine_to_pretrained"),
}
# the metric a table reports, and whether higher means more retained
HEADLINE = {"perplexity": ("perplexity", "min"), "masked-lm": ("mlm_loss", "min"),
            "embedding": ("rank_correlation", "max")}


# ---------------------------------------------------------------------------------------------
# The retention texts


def retention_data_config(data_cfg, batch_size: int):
    """The recipe's data options rewritten to read the retention texts as plain causal-lm text
    (the 'train' split, nothing held out, every row kept in order)."""
    return dataclasses.replace(
        data_cfg, train=data_cfg.retention, validation=None, test=None,
        text_column=data_cfg.retention_column or data_cfg.text_column, text_pair_column=None,
        prompt_column=None, response_column=None, prompt_template=None, response_template=None,
        messages_column=None, chat_template="none", system_prompt=None, pack=False,
        validation_fraction=0.0, test_fraction=0.0, deduplicate=False, labels=None, num_workers=0,
        skip_bad_rows=False,
    )


def load_retention_data(data_cfg, tokenizer, batch_size: int) -> Data:
    """The retention texts as a Data whose 'train' split holds them; one-line errors naming
    data.retention when they cannot be read or scored."""
    cfg = retention_data_config(data_cfg, batch_size)
    try:
        data = build_data(cfg, "causal-lm", tokenizer=tokenizer, batch_size=batch_size,
                          eval_batch_size=batch_size, seed=0)
    except DataError as e:
        msg = str(e)
        if data_cfg.retention_column:
            msg = msg.replace("(data.text_column)", "(data.retention_column)")
        raise DataError(f"data.retention ({data_cfg.retention}): {msg}") from None
    return data


# ---------------------------------------------------------------------------------------------
# Which measure


@contextlib.contextmanager
def _quiet(name: str = "jaxtune"):
    logger = logging.getLogger(name)
    was, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = was


def choose_measure(family, model_path: str, load) -> tuple[str, Any, list]:
    """(measure, retention model, its freshly initialised paths). `load(task)` loads the
    checkpoint as that head with loading info."""
    if "causal-lm" in family.heads:
        model, info = load("causal-lm")
        return "perplexity", model, info.get("fresh", [])
    if "masked-lm" in family.heads:
        with _quiet():  # a checkpoint without the head would log it as initialised from scratch
            model, info = load("masked-lm")
        if not info.get("fresh"):
            return "masked-lm", model, []
    model, info = load("base")
    return "embedding", model, info.get("fresh", [])


# ---------------------------------------------------------------------------------------------
# Pure pieces (jitted by Retention)


def mean_pool(hidden_BTD, mask_BT) -> jax.Array:
    """(B, D) mean of the hidden states over the attended tokens, in float32."""
    m = mask_BT.astype(jnp.float32)[..., None]
    return jnp.sum(hidden_BTD.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def masked_lm_sums(logits_BTV, labels_BT, weights_B) -> dict:
    valid = labels_BT != IGNORE
    w = weights_B[:, None] * valid
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                           jnp.where(valid, labels_BT, 0))
    return {"loss_sum": jnp.sum(w * loss), "weight_sum": jnp.sum(w),
            "correct": jnp.sum(w * (logits_BTV.argmax(-1) == labels_BT))}


def causal_lm_sums(logits_BTV, batch) -> dict:
    logits, targets, valid, _ = shifted_targets(logits_BTV, batch)
    w = batch["weights"][:, None] * valid
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return {"loss_sum": jnp.sum(w * loss), "weight_sum": jnp.sum(w)}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equally long vectors (average ranks for ties).

    >>> round(spearman(np.array([1., 2., 3., 4.]), np.array([10., 20., 30., 39.])), 6)
    1.0
    >>> round(spearman(np.array([1., 2., 3.]), np.array([3., 2., 1.])), 6)
    -1.0
    """
    def ranks(x):
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        ends = np.cumsum(counts)
        return (ends - (counts - 1) / 2.0)[inverse]

    ra, rb = ranks(np.asarray(a, np.float64)), ranks(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float(np.sum(ra * ra) * np.sum(rb * rb)))
    return float(np.sum(ra * rb) / denom) if denom > 0 else 0.0


def pairwise_cosines(e_ND: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair i < j of rows, as one vector."""
    e = np.asarray(e_ND, np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    i, j = np.triu_indices(len(e), k=1)
    return np.sum(e[i] * e[j], axis=1)


def embedding_metrics(pretrained_ND: np.ndarray, current_ND: np.ndarray) -> dict:
    """rank_correlation of pairwise cosines, and the mean cosine of each text to itself."""
    p = pretrained_ND / np.maximum(np.linalg.norm(pretrained_ND, axis=1, keepdims=True), 1e-12)
    c = current_ND / np.maximum(np.linalg.norm(current_ND, axis=1, keepdims=True), 1e-12)
    return {"rank_correlation": spearman(pairwise_cosines(pretrained_ND), pairwise_cosines(current_ND)),
            "cosine_to_pretrained": float(np.mean(np.sum(p * c, axis=1)))}


def mask_tokens(batch: dict, *, mask_id: int, special_ids, seed: int) -> dict:
    """Masked-LM inputs: MASK_FRACTION of the attended, non-special tokens (drawn from `seed`)
    replaced by `mask_id`; `labels` = the original ids there, IGNORE elsewhere."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rng = np.random.default_rng([MASK_SEED, seed])
    candidates = (mask == 1) & ~np.isin(ids, np.asarray(list(special_ids), np.int64))
    chosen = candidates & (rng.random(ids.shape) < MASK_FRACTION)
    out = dict(batch)
    out["input_ids"] = np.where(chosen, mask_id, ids).astype(ids.dtype)
    out["labels"] = np.where(chosen, ids, IGNORE).astype(np.int32)
    return out


# ---------------------------------------------------------------------------------------------
# The retention model over the current params


def plain_params_fn(spec: Optional[lora.LoRASpec]) -> Callable:
    """state -> the current params as the plain (non-LoRA) model has them."""
    if spec is None:
        return lambda state: state.params
    return lambda state: lora.merged_params(spec, lora.combine(state.params, state.model_state))


def overlay_table(retention_flat: dict, current_flat: dict, prefix: str) -> dict:
    """{retention param path: path in the current params (same shape), or None (kept frozen)}.
    A base model's paths lack the head's base prefix ('bert/...')."""
    table = {}
    for p, leaf in retention_flat.items():
        for q in (p, (prefix,) + p):
            if q in current_flat and tuple(current_flat[q].shape) == tuple(leaf.shape):
                table[p] = q
                break
        else:
            table[p] = None
    return table


@dataclass
class Retention:
    """The retention texts, the measure and its jitted passes; `evaluate(state)` -> metrics."""

    measure: str
    data: Data
    plan: Any
    graphdef: Any
    rest: Any
    table: dict  # retention path -> current path or None
    frozen: dict  # nested: the retention model's params no current param replaces
    plain: Callable  # state -> current plain params
    state_shardings: Any
    mask_id: Optional[int] = None
    special_ids: tuple = ()
    pretrained: Optional[dict] = None  # embedding: the full pretrained params until the reference exists
    reference: Optional[np.ndarray] = None  # embedding: the pretrained embeddings (N, D)
    _jitted: dict = dataclasses.field(default_factory=dict)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return METRICS[self.measure]

    @property
    def num_texts(self) -> int:
        return self.data.num_examples["train"]

    # -- pure functions ------------------------------------------------------------------

    def params_of(self, current_params, frozen) -> dict:
        """The retention model's params: current where the current model has them, else frozen."""
        cur, fro = flatten(current_params), flatten(frozen)
        return unflatten({p: (cur[q] if q is not None else fro[p]) for p, q in self.table.items()})

    def _model(self, params):
        return merge(self.graphdef, params, self.rest)

    def forward(self, params, batch) -> dict:
        """Per-batch outputs of the measure for the retention model's params."""
        model = self._model(params)
        inputs = {k: v for k, v in model_inputs(batch).items() if k != "segment_ids"}
        if self.measure == "embedding":
            out = model(**inputs, deterministic=True)
            return {"embeddings": mean_pool(out.last_hidden_state, batch["attention_mask"])}
        logits = model(**inputs, deterministic=True).logits
        if self.measure == "masked-lm":
            return masked_lm_sums(logits, batch["labels"], batch["weights"])
        return causal_lm_sums(logits, batch)

    def state_forward(self, state, frozen, batch) -> dict:
        return self.forward(self.params_of(self.plain(state), frozen), batch)

    def log_prob_fn(self, current_params, frozen, example, key) -> jax.Array:
        """log p(y | x) of one example (leading axis 1) under the pretraining objective, y drawn
        from the model's own prediction (no gradient through the draw): its gradient's square is
        a sample of the diagonal Fisher. causal-LM: a token per position; masked-LM: a token per
        masked position; embedding: an isotropic unit-variance Gaussian on the mean-pooled
        embedding, whose score is z . grad e(x) with z ~ N(0, I)."""
        model = self._model(self.params_of(current_params, frozen))
        inputs = {k: v for k, v in model_inputs(example).items() if k != "segment_ids"}
        out = model(**inputs, deterministic=True)
        if self.measure == "embedding":
            e = mean_pool(out.last_hidden_state, example["attention_mask"])
            return jnp.sum(jax.random.normal(key, e.shape) * e)
        if self.measure == "masked-lm":
            logits, valid = out.logits, example["labels"] != IGNORE
        else:
            logits, _, valid, _ = shifted_targets(out.logits, example)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        y = jax.random.categorical(key, jax.lax.stop_gradient(logp), axis=-1)
        picked = jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
        return jnp.sum(picked * valid)

    # -- host side -----------------------------------------------------------------------

    def host_batches(self):
        """This process's rows of each batch of the retention texts (numpy), in order, each text
        once; masked-LM: with the fixed masks."""
        for i, b in enumerate(self.data.eval_batches("train")):
            if self.measure == "masked-lm":
                b = mask_tokens(b, mask_id=self.mask_id, special_ids=self.special_ids,
                                seed=i * self.data.shard_count + self.data.shard_index)
            yield b

    def batches(self):
        """(sharded batch, host weights) of the retention texts, in order, each once."""
        for b in self.host_batches():
            yield self.plan.shard_batch(b), b["weights"]

    def _jit(self, name: str, fn, first_sh):
        if name not in self._jitted:
            frozen_sh = jax.tree.map(lambda x: x.sharding, self.frozen)
            self._jitted[name] = jax.jit(fn, in_shardings=(first_sh, frozen_sh, self.plan.batch_sharding()),
                                         out_shardings=self.plan_replicated())
        return self._jitted[name]

    def plan_replicated(self):
        return jax.sharding.NamedSharding(self.plan.mesh, jax.sharding.PartitionSpec())

    def _embeddings(self, fn, first) -> np.ndarray:
        rows = []
        for batch, w in self.batches():
            e = np.asarray(jax.device_get(fn(first, self.frozen, batch)["embeddings"]), np.float64)
            rows.append(e[np.asarray(w) > 0] if self.data.shard_count == 1 else e)
        return np.concatenate(rows)[: self.num_texts]

    def evaluate(self, state) -> dict:
        """The measure's metrics for `state` (a TrainState on the run's shardings)."""
        fn = self._jit("state", self.state_forward, self.state_shardings)
        if self.measure == "embedding":
            if self.reference is None:
                ref_fn = self._jit("pretrained", lambda params, frozen, batch: self.forward(params, batch),
                                   jax.tree.map(lambda x: x.sharding, self.pretrained))
                self.reference = self._embeddings(ref_fn, self.pretrained)
                self.pretrained = None  # the reference is all it was kept for
            return embedding_metrics(self.reference, self._embeddings(fn, state))
        totals = None
        for batch, _ in self.batches():
            out = {k: float(v) for k, v in jax.device_get(fn(state, self.frozen, batch)).items()}
            totals = out if totals is None else {k: totals[k] + out[k] for k in totals}
        n = totals["weight_sum"]
        if n <= 0:
            raise DataError(f"data.retention: no {'masked' if self.measure == 'masked-lm' else 'target'} "
                            "tokens to score in the retention texts")
        loss = totals["loss_sum"] / n
        if self.measure == "masked-lm":
            return {"mlm_loss": loss, "mlm_accuracy": totals["correct"] / n}
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def build_retention(recipe, *, plan, model, tokenizer, spec, abstract_state, load: Optional[Callable] = None
                    ) -> Optional[Retention]:
    """The run's Retention (None without data.retention). One-line errors, before training,
    for what cannot be scored. `load(task) -> (model, info)` defaults to from_pretrained on
    model.path with the recipe's dtypes on the plan's shardings."""
    d = recipe.data
    if d.retention is None:
        if d.retention_column is not None:
            raise ConfigError("data.retention_column names the column of data.retention, which is not set")
        return None
    if recipe.model.path is None:
        raise ConfigError("data.retention measures what the pretrained model knew; it needs model.path")
    if tokenizer is None:
        raise ConfigError(f"data.retention scores text; task {recipe.task} has no text model")
    batch_size = recipe.train.eval_batch_size or recipe.train.batch_size
    data = load_retention_data(d, tokenizer, batch_size)
    if load is None:
        m = recipe.model

        def load(task):
            return from_pretrained(m.path, task, dtype=m.dtype, compute_dtype=m.compute_dtype,
                                   shardings=plan.param_shardings, seed=recipe.train.seed,
                                   output_loading_info=True)

    family = family_of(model)
    measure, rmodel, fresh = choose_measure(family, recipe.model.path, load)
    if measure == "embedding" and data.num_examples["train"] < 3:
        raise DataError(f"data.retention ({d.retention}): {data.num_examples['train']} texts; the embedding "
                        "measure compares pairs of texts: give at least 3")
    graphdef, rparams, rest = split(rmodel)
    plain = plain_params_fn(spec)
    abstract_current = jax.eval_shape(plain, abstract_state)
    table = overlay_table(flatten(rparams), flatten(abstract_current), family.base_prefix)
    rflat = flatten(rparams)
    if measure == "perplexity" and fresh:  # an LM head the checkpoint lacks and the model does not tie
        untrained = [p for p in fresh if table.get(tuple(p)) is None]
        if untrained:
            raise ConfigError(f"data.retention: {recipe.model.path} has no causal-LM head weights "
                              f"({'/'.join(map(str, untrained[0]))}); perplexity needs them")
    frozen = unflatten({p: v for p, v in rflat.items() if table[p] is None})
    special, mask_id = (), None
    if measure == "masked-lm":
        mask_id = tokenizer.mask_token_id
        if mask_id is None:
            raise ConfigError(f"data.retention: the tokenizer of {recipe.model.path} has no mask token; "
                              "the masked-LM measure needs one")
        special = tuple(int(i) for i in tokenizer.all_special_ids)
    return Retention(
        measure=measure, data=data, plan=plan, graphdef=graphdef, rest=rest, table=table, frozen=frozen,
        plain=plain, state_shardings=jax.tree.map(lambda x: x.sharding, abstract_state), mask_id=mask_id, special_ids=special,
        pretrained=rparams if measure == "embedding" else None,
    )


def retention_summary(lines: list[dict], retention: Retention, model_step: int) -> dict:
    """summary.json's `retention`: the measure, the pretrained value (step 0), the last one and the
    one of the model tested and exported (`model_step`), from metrics.jsonl's retention lines."""
    by_step = {m["step"]: {k: m[k] for k in retention.metric_names if k in m}
               for m in lines if m.get("split") == SPLIT}
    last = max(by_step) if by_step else None
    return {
        "measure": retention.measure,
        "texts": retention.num_texts,
        "pretrained": by_step.get(0),
        "last": {"step": last, **by_step[last]} if last is not None else None,
        "model_step": {"step": model_step, **by_step[model_step]} if model_step in by_step else None,
    }


__all__ = ["HEADLINE", "MEASURES", "METRICS", "Retention", "SPLIT", "build_retention", "embedding_metrics",
           "load_retention_data", "mask_tokens", "mean_pool", "pairwise_cosines", "retention_summary", "spearman"]
