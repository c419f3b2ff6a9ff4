"""jaxtune.checkpoint on a toy TrainState: what is kept, fallback, mismatch, never zero checkpoints."""

import asyncio
import gc
import inspect
import json
import logging
import re
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax.checkpoint._src.serialization import serialization

from jaxtune.checkpoint import CheckpointDamaged, CheckpointMismatch, Checkpoints, is_better, quiet_orbax, rank
from jaxtune.config import CheckpointConfig
from jaxtune.train import init_state


# A failed restore (damaged files, other shapes) leaves TensorStore reads that end after Orbax gave
# up on them ("Exception ignored in: <coroutine ...>"): collect them here, where they are expected.
# (Orbax's never-awaited coroutines are jaxtune.checkpoint's to silence: not filtered here.)
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _quiet_orbax():
    """quiet_orbax() as the CLI calls it, undone after each test (pytest restores the warning
    filters itself) so that no other test module runs quieted."""
    absl, aio = logging.getLogger("absl"), logging.getLogger("asyncio")
    saved = list(absl.filters), list(aio.filters), sys.unraisablehook
    quiet_orbax()
    yield
    absl.filters[:], aio.filters[:], sys.unraisablehook = saved[0], saved[1], saved[2]


@pytest.fixture(autouse=True)
def _collect_abandoned_reads(_quiet_orbax):
    yield
    gc.collect()  # before _quiet_orbax is undone


class Iter:
    """The smallest iterator Grain's Orbax handler saves (a DataLoader-style bytes state)."""

    def __init__(self, n=0):
        self.n = n

    def get_state(self) -> bytes:
        return json.dumps({"n": self.n}).encode()

    def set_state(self, state: bytes):
        self.n = json.loads(state)["n"]

    def start_prefetch(self):
        pass


def toy_state(width=4):
    params = {"w": jnp.arange(8.0 * width).reshape(8, width), "b": {"c": jnp.ones(3)}}
    return init_state(params, jax.random.PRNGKey(0), tx=optax.adamw(1e-3))


def truncate(step_dir):
    """A torn write: every array file of a checkpoint step cut to 100 bytes."""
    for f in (step_dir / "state" / "d").iterdir():
        f.write_bytes(f.read_bytes()[:100])


def save_all(ckpt, state, accuracies):
    for step, acc in accuracies.items():
        state = state.replace(step=jnp.int32(step), params=jax.tree.map(lambda x: x + step, state.params))
        ckpt.save(step, state, Iter(step), {"step": step}, metrics=None if acc is None else {"accuracy": acc})
    ckpt.wait()
    return state


def test_keep_latest_and_best_ties_go_to_the_earlier_step(tmp_path):
    ckpt = Checkpoints(tmp_path / "c", CheckpointConfig(keep=2, keep_best=1))
    # 4 and 10 tie on accuracy: the earlier (4) is the best; 12, 14 are the newest two.
    save_all(ckpt, toy_state(), {2: 0.5, 4: 0.9, 6: 0.3, 8: None, 10: 0.9, 12: 0.1, 14: None})
    assert ckpt.steps() == [4, 12, 14]
    assert ckpt.best_step() == 4
    ckpt.close()
    reopened = Checkpoints(tmp_path / "c", CheckpointConfig(keep=2, keep_best=1))
    assert reopened.steps() == [4, 12, 14] and reopened.best_step() == 4  # metrics persisted


def test_min_mode_keep_best_two_and_nan_is_worst(tmp_path):
    ckpt = Checkpoints(tmp_path / "c", CheckpointConfig(keep=1, keep_best=2), metric="loss", mode="min")
    state = toy_state()
    for step, loss in {1: 0.7, 2: float("nan"), 3: 0.2, 4: 0.5, 5: 0.9}.items():
        ckpt.save(step, state, Iter(), {}, metrics={"loss": loss})
    ckpt.wait()
    assert ckpt.steps() == [3, 4, 5]  # best two by lowest loss (3, 4) + newest (5)
    assert ckpt.best_step() == 3


def test_keep_best_zero_keeps_only_the_newest(tmp_path):
    ckpt = Checkpoints(tmp_path / "c", CheckpointConfig(keep=1, keep_best=0))
    save_all(ckpt, toy_state(), {1: 0.9, 2: 0.1, 3: 0.2})
    assert ckpt.steps() == [3]


def test_restore_gives_back_state_iterator_and_meta(tmp_path):
    ckpt = Checkpoints(tmp_path / "c", CheckpointConfig(keep=3))
    state = save_all(ckpt, toy_state(), {5: 0.5, 7: 0.6})
    abstract = jax.eval_shape(lambda: state)
    restored = ckpt.restore_latest(abstract, Iter)
    assert restored.step == 7 and restored.meta == {"step": 7} and restored.iterator.n == 7
    for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    params = ckpt.restore_params(5, jax.eval_shape(lambda: state.params))
    np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(toy_state().params["w"]) + 5)


def test_corrupt_latest_is_moved_aside_and_the_previous_one_restores(tmp_path, caplog):
    ckpt = Checkpoints(tmp_path / "c", CheckpointConfig(keep=3))
    state = save_all(ckpt, toy_state(width=300), {1: None, 2: None, 3: None})  # arrays > inline size
    truncate(tmp_path / "c" / "3")
    ckpt = Checkpoints(tmp_path / "c", CheckpointConfig(keep=3))
    with caplog.at_level(logging.WARNING, logger="jaxtune"):
        restored = ckpt.restore_latest(jax.eval_shape(lambda: state), Iter)
    assert restored.step == 2 and restored.iterator.n == 2
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert f"checkpoint step 3 in {tmp_path / 'c'} cannot be restored" in msg and "falling back to step 2" in msg
    moved = list((tmp_path / "c.corrupt").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("3-") and (moved[0] / "state").is_dir()
    assert ckpt.steps() == [1, 2]
    ckpt.save(3, state, Iter(3), {})  # the step can be written again
    ckpt.wait()
    assert ckpt.steps() == [1, 2, 3]


def test_restoring_params_of_a_damaged_step_is_a_clear_error_and_nothing_moves(tmp_path):
    ckpt = Checkpoints(tmp_path / "c", CheckpointConfig(keep=3))
    state = save_all(ckpt, toy_state(width=300), {1: None, 2: None})
    truncate(tmp_path / "c" / "2")
    ckpt = Checkpoints(tmp_path / "c", read_only=True)
    params = jax.eval_shape(lambda: state.params)
    with pytest.raises(CheckpointDamaged, match=rf"^checkpoint step 2 in {re.escape(str(tmp_path / 'c'))} cannot "
                                                r"be restored \(ValueError: .*not valid for value of size 100\)$") as e:
        ckpt.restore_params(2, params)
    assert e.value.step == 2 and "tensorstore_spec" not in str(e.value)
    assert ckpt.steps() == [1, 2] and not (tmp_path / "c.corrupt").exists()
    step_1 = np.asarray(state.params["w"]) - 2  # save_all added 1, then 2
    np.testing.assert_array_equal(ckpt.restore_params(1, params)["w"], step_1)


@pytest.mark.parametrize("error", [RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 96 bytes"),
                                   ValueError("RESOURCE_EXHAUSTED: while reading"), MemoryError(),
                                   TypeError("a bug")])
def test_a_failure_that_is_not_the_files_fault_propagates_and_nothing_moves(tmp_path, monkeypatch, error):
    ckpt = Checkpoints(tmp_path / "c", CheckpointConfig())
    state = save_all(ckpt, toy_state(), {1: None})

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(ckpt.mngr, "restore", fails)
    with pytest.raises(type(error)) as raised:
        ckpt.restore_latest(jax.eval_shape(lambda: state), Iter)
    assert raised.value is error
    with pytest.raises(type(error)):
        ckpt.restore_params(1, jax.eval_shape(lambda: state.params))
    assert ckpt.steps() == [1] and not (tmp_path / "c.corrupt").exists()


def test_leftover_read_errors_of_a_failed_step_are_not_logged_others_are(tmp_path, caplog):
    """The parallel reads of a failed restore that nobody awaited reach asyncio's 'exception was
    never retrieved' log (with a traceback) when garbage collected, at random times: those that
    name the step that failed are dropped, any other stays visible. The same for the warnings of
    coroutines never awaited: Orbax's are dropped, others stay."""
    ckpt = Checkpoints(tmp_path / "c", CheckpointConfig(keep=3))
    state = save_all(ckpt, toy_state(width=300), {1: None, 2: None})
    truncate(tmp_path / "c" / "2")
    assert Checkpoints(tmp_path / "c").restore_latest(jax.eval_shape(lambda: state), Iter).step == 1
    gc.collect()

    def abandoned_failure(path):
        loop = asyncio.new_event_loop()
        future = loop.create_future()
        future.set_exception(ValueError(f'Error reading "w/.zarray" at local file "{path}/state/"'))
        loop.close()
        del future
        gc.collect()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        abandoned_failure(tmp_path / "c" / "2")
        abandoned_failure(tmp_path / "c" / "1")
    logged = [str(r.exc_info[1]) for r in caplog.records if r.name == "asyncio"]
    assert len(logged) == 1 and f"{tmp_path / 'c' / '1'}/state/" in logged[0], logged

    # ... and coroutines that Orbax created but never awaited warn only when they are not Orbax's
    async def ours():
        pass

    def unawaited(coroutine_function):  # its body never runs: any arguments do
        params = inspect.signature(coroutine_function).parameters.values()
        return coroutine_function(*[None for p in params if p.kind == p.POSITIONAL_OR_KEYWORD],
                                  **{p.name: None for p in params if p.kind == p.KEYWORD_ONLY})

    with warnings.catch_warnings(record=True) as warned:  # keeps the filters (pytest.warns would not)
        warnings.filterwarnings("always", category=RuntimeWarning, append=True)
        leftovers = [unawaited(serialization._read_array_index_and_device_put), ours()]
        del leftovers
        gc.collect()
    messages = [str(w.message) for w in warned]
    assert messages == [f"coroutine '{ours.__qualname__}' was never awaited"], messages


def test_a_checkpoint_of_another_model_is_a_user_error_and_nothing_moves(tmp_path):
    ckpt = Checkpoints(tmp_path / "c", CheckpointConfig())
    save_all(ckpt, toy_state(width=4), {1: None})
    other = jax.eval_shape(lambda: toy_state(width=5))
    with pytest.raises(CheckpointMismatch, match="step 1 .* does not fit this recipe's model or optimizer"):
        ckpt.restore_latest(other, Iter)
    assert ckpt.steps() == [1] and not (tmp_path / "c.corrupt").exists()


def test_there_is_always_a_finished_checkpoint_once_one_was_written(tmp_path):
    """keep=1, async saves: old steps are deleted only after the new one is finalized."""
    root = tmp_path / "c"
    ckpt = Checkpoints(root, CheckpointConfig(keep=1, keep_best=0, async_save=True))
    state = toy_state(width=2000)  # big enough that writes take a moment
    ckpt.save(1, state, Iter(1), {})
    ckpt.wait()
    seen, stop = [], threading.Event()

    def watch():
        # A look counts when the folder list is the same before and after its checks: otherwise
        # it can list step n while n+1 is still a tmp folder, then find n already being deleted
        # (after n+1 was finalized and renamed) and count no finished step where there was one.
        while not stop.is_set():
            names = sorted(p.name for p in root.iterdir())
            done = [n for n in names if n.isdigit() and (root / n / "_CHECKPOINT_METADATA").exists()]
            if sorted(p.name for p in root.iterdir()) == names:
                seen.append(len(done))

    t = threading.Thread(target=watch)
    t.start()
    try:
        for step in range(2, 8):
            ckpt.save(step, state, Iter(step), {})
        ckpt.wait()
        time.sleep(0.05)
    finally:
        stop.set()
        t.join()
    assert len(seen) > 50 and min(seen) >= 1, (len(seen), min(seen))
    assert ckpt.steps() == [7]


def test_rank_and_is_better():
    key = rank("accuracy", "max")
    assert key({"accuracy": 0.9, "step": 4}) > key({"accuracy": 0.9, "step": 10}) > key({"accuracy": 0.1, "step": 1})
    assert key({"accuracy": float("nan"), "step": 1}) < key({"accuracy": 0.0, "step": 9})
    low = rank("loss", "min")
    assert low({"loss": 0.1, "step": 9}) > low({"loss": 0.2, "step": 1})
    assert is_better(0.3, 0.5, "min", min_delta=0.1) and not is_better(0.45, 0.5, "min", min_delta=0.1)
    assert not is_better(float("nan"), 0.5, "max")


# Run in a fresh interpreter: the modules jaxtune.checkpoint imports first (others' import-time
# filters, e.g. numpy's, are not ours), found from its source so that the list cannot go stale.
FRESH_IMPORT = textwrap.dedent("""
    import ast, gc, importlib, importlib.util, json, logging, sys, warnings
    source = open(importlib.util.find_spec("jaxtune.checkpoint").origin).read()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            importlib.import_module(node.module)
            for alias in node.names:  # `from jax.experimental import multihost_utils`
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ModuleNotFoundError:
                    pass
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
    assert "jaxtune.checkpoint" not in sys.modules

    def state():
        return {"absl": list(logging.getLogger("absl").filters), "asyncio": list(logging.getLogger("asyncio").filters),
                "hook": sys.unraisablehook, "warnings": list(warnings.filters), "gc": gc.isenabled()}

    before = state()
    import jaxtune.checkpoint as ckpt
    imported = state()
    ckpt.quiet_orbax()
    once = state()
    ckpt.quiet_orbax()
    twice = state()
    print(json.dumps({
        "unchanged_by_import": {k: imported[k] == before[k] for k in before},
        "added": {k: len(once[k]) - len(before[k]) for k in ("absl", "asyncio", "warnings")},
        "new_warning": [once["warnings"][0][0], once["warnings"][0][1].pattern, once["warnings"][0][2].__name__],
        "hook": [once["hook"] is not before["hook"], getattr(once["hook"], "_jaxtune", False)],
        "gc": [before["gc"], imported["gc"], once["gc"]],
        "second_call_unchanged": {k: twice[k] == once[k] for k in before},
    }))
""")


def test_importing_changes_no_process_state_and_quiet_orbax_installs_once():
    proc = subprocess.run([sys.executable, "-c", FRESH_IMPORT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    assert r["unchanged_by_import"] == {"absl": True, "asyncio": True, "hook": True, "warnings": True, "gc": True}
    assert r["added"] == {"absl": 1, "asyncio": 1, "warnings": 1}
    action, message, category = r["new_warning"]
    assert action == "ignore" and category == "RuntimeWarning"
    assert message.startswith("coroutine '(") and message.endswith(")' was never awaited")
    assert "|Store\\._get_array_metadatas|" in message  # Orbax's read path, named one by one
    assert r["hook"] == [True, True] and r["gc"] == [True, True, True]
    assert r["second_call_unchanged"] == {"absl": True, "asyncio": True, "hook": True, "warnings": True, "gc": True}
