"""A tiny BERT classifier run for the sharding tests; also the worker of the two-process test.

Imported by tests/test_parallel.py (for one-process runs) and run as a script by it, once per JAX
process: `python tests/_tiny_bert.py PROCESS_ID NUM_PROCESSES PORT OUT.json`.
"""

from __future__ import annotations

import json
import sys

import numpy as np

# vocab 99 does not divide tensor=2: the embedding falls back to replicated on that dim.
TINY = dict(
    model_type="bert", vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0, num_labels=3,
)
BATCH, LENGTH, STEPS = 8, 12, 5


def make_batches(steps: int = STEPS, batch: int = BATCH, length: int = LENGTH) -> list[dict]:
    rs = np.random.RandomState(0)
    out = []
    for i in range(steps):
        ids = rs.randint(1, TINY["vocab_size"], (batch, length)).astype(np.int32)
        lengths = rs.randint(4, length + 1, (batch, 1))
        mask = (np.arange(length)[None] < lengths).astype(np.int32)
        weights = np.ones(batch, np.float32)
        if i == 2:
            weights[-2:] = 0.0  # padding examples: must not change anything
        out.append(dict(input_ids=ids * mask, attention_mask=mask,
                        token_type_ids=np.zeros_like(ids),
                        labels=rs.randint(0, 3, (batch,)).astype(np.int32), weights=weights))
    return out


def train(plan, batches, *, lr=1e-3, process_rows=None, memory=False, **model_overrides):
    """Train tiny BERT on `plan` for len(batches) steps -> (state, losses, memory stats or None).

    `process_rows(batch) -> rows`: the share of each global batch this process feeds.
    """
    import optax

    import jaxtune
    from jaxtune.tasks import make_loss_fn
    from jaxtune.train import make_train_step

    model = jaxtune.from_config(dict(TINY), task="sequence-classification",
                                shardings=plan.param_shardings, **model_overrides)
    _, params, _ = jaxtune.models.split(model)
    tx = optax.adamw(lr, weight_decay=0.01)
    state = plan.create_state(params, tx, rng=0)
    step = plan.jit_train_step(make_train_step(make_loss_fn(model), tx), state)
    stats = None
    losses = []
    for b in batches:
        local = process_rows(b) if process_rows else b
        batch = plan.shard_batch(local)
        if memory and stats is None:
            stats = step.lower(state, batch).compile().memory_analysis()
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses, stats


def _worker(process_id: int, num_processes: int, port: int, out_path: str) -> None:
    import os

    os.environ["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
    os.environ["JAX_NUM_PROCESSES"] = str(num_processes)
    os.environ["JAX_PROCESS_ID"] = str(process_id)
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from jaxtune import parallel

    assert parallel.initialize() is True
    plan = parallel.Plan.from_config(None, data=2, fsdp=2, tensor=2)

    def rows(b):  # this process's contiguous share of the global batch
        n = plan.local_batch_size(len(b["labels"]))
        return {k: v[process_id * n:(process_id + 1) * n] for k, v in b.items()}

    state, losses, _ = train(plan, make_batches(), process_rows=rows)
    from jax.experimental import multihost_utils

    kernel = state.params["bert"]["encoder"]["layer"][1]["output"]["dense"]["kernel"]
    kernel = np.asarray(multihost_utils.process_allgather(kernel, tiled=True))
    result = dict(
        process_index=jax.process_index(), process_count=jax.process_count(),
        devices=jax.device_count(), local_devices=jax.local_device_count(),
        main=parallel.is_main_process(), losses=losses, kernel=kernel.tolist(),
    )
    with open(out_path, "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
