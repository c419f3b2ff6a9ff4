"""`kill -9` twenty times at random moments of one tiny run, resumed each time: the run ends with
the same parameters, bit for bit, and the same metrics.jsonl as an uninterrupted one (README,
Runs: "A run killed at any step (even kill -9) and started again ends with the same parameters").

One run is killed in succession (a restart is cheap: the JAX compilation cache is shared, and each
`jaxtune run` is a process forked from one that has imported jaxtune already, `_tiny_run.Warm`;
the last one, which finishes the run, is a fresh `python -m jaxtune.cli`), each
kill aimed at one of three moments: during the train steps, during an asynchronous checkpoint
save (its temporary folder is on disk), and during an evaluation (the eval step's train line is
logged, its validation line not yet; past the last one, the final test and export). The moments
and delays come from a seeded generator: the seed is printed, and JAXTUNE_KILL_SEED=N replays it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

import _tiny_run as tr
from jaxtune.runlog import TIMING_KEYS, read_metrics

KILLS = 20
TOTAL = 24  # the tiny recipe: train.steps 24, eval_every 6, checkpoint.every 2, log_every 2
EVALS = (6, 12, 18, 24)
TMP = "orbax-checkpoint-tmp"
DELAY = {"step": 0.3, "save": 0.02, "eval": 0.05, "final": 2.0}  # the kill comes this many seconds at most after the moment


def state_arrays(step_dir) -> dict:
    import jax
    import orbax.checkpoint as ocp

    with warnings.catch_warnings():  # "Sharding info not provided": numpy is what we want
        warnings.simplefilter("ignore")
        tree = ocp.PyTreeCheckpointer().restore(Path(step_dir) / "state")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def saved_steps(out: Path) -> list[int]:
    d = out / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def tmp_folders(out: Path) -> set[str]:
    d = out / "checkpoints"
    try:
        return {p for p in os.listdir(d) if TMP in p}
    except FileNotFoundError:
        return set()


def logged(out: Path) -> list[dict]:
    try:
        return read_metrics(out)
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written; a line half written
        return []


def wait_for_moment(proc, out: Path, stdout: Path, phase: str, newest: int, after: int, leftovers: set[str],
                    timeout=180) -> str:
    """Return once `phase`'s first moment after step `after` (>= `newest`, where this process
    resumed) has come, polling every ~2 ms; 'ended' if the process ended first. The moments:
    step: a train line after `after` is logged (the loop is running steps);
    save: once `after` is logged, a checkpoint's temporary folder exists (a save is in flight;
          not the killed process's);
    eval: the next eval step is logged and its validation line is not (it is being evaluated);
    final: (the run has saved its last step) it said it resumed: the final test and export."""
    deadline = time.time() + timeout
    next_eval = next((e for e in EVALS if e > newest), None)
    while time.time() < deadline:
        if proc.poll() is not None:
            return "ended"
        if leftovers and not tmp_folders(out) & leftovers:
            leftovers.clear()  # the new process removed the killed one's: any tmp folder is new
        if phase == "final":
            if "resuming from step" in stdout.read_text():
                return phase
        else:
            lines = logged(out)
            train = max((m["step"] for m in lines if m["split"] == "train"), default=0)
            if phase == "save" and train >= after and tmp_folders(out) - leftovers:
                return phase
            if phase == "step" and train > after:
                return phase
            if phase == "eval" and train >= next_eval and not any(
                    m["split"] == "validation" and m["step"] == next_eval for m in lines):
                return phase
        time.sleep(0.002)
    raise AssertionError(f"no {phase} moment after step {newest} in {out} after {timeout}s")


def steady(lines):
    """metrics.jsonl lines without the wall-clock numbers."""
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in lines]


def test_20_kill_9_at_random_moments_each_resumed_ends_with_the_same_bits(tmp_path_factory, tmp_path):
    recipe, env, ref = tr.shared_tiny(tmp_path_factory)
    seed = int(os.environ.get("JAXTUNE_KILL_SEED", random.randrange(1 << 30)))
    print(f"JAXTUNE_KILL_SEED={seed}")
    rng = random.Random(seed)
    out = tmp_path / "killed"
    path = recipe(out, name="killed")
    warm = tr.shared_warm(tmp_path_factory)
    phases = (["step", "save", "eval"] * KILLS)[:KILLS]
    rng.shuffle(phases)
    hits, newest = Counter(), 0
    for i in range(KILLS):
        phase = phases[i] if newest < TOTAL else "final"
        leftovers = tmp_folders(out)
        proc = warm.popen("run", path)  # a real process: its own pid, killed for real
        stdout = proc.stdout_path
        try:
            after = newest + 2 * rng.randint(0, 2)  # train lines come at even steps: 0-4 steps into the session
            moment = wait_for_moment(proc, out, stdout, phase, newest, after, leftovers)
            if moment != "ended":
                time.sleep(rng.uniform(0, DELAY[moment]))
                proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            stderr = proc.communicate(timeout=60)[1]
        assert proc.returncode in (-signal.SIGKILL, 0), (moment, stderr[-3000:])
        if moment == "save" and tmp_folders(out):
            moment = "save (interrupted)"
        hits[moment] += 1
        steps = saved_steps(out)  # nothing done before is lost: the newest checkpoint never goes back
        assert steps or newest == 0, f"kill {i + 1}: no checkpoint left (had step {newest})"
        assert max(steps, default=0) >= newest, f"kill {i + 1}: newest checkpoint went from {newest} to {steps}"
        newest = max(steps, default=0)
        print(f"kill {i + 1}: {phase} -> {moment}; checkpoints {steps}")
    print("moments:", dict(hits))
    assert hits["step"] and hits["save (interrupted)"] and hits["eval"], hits

    final = tr.cli("run", path, env=env)
    assert final.returncode == 0, final.stderr[-3000:]
    a, b = state_arrays(ref / "checkpoints" / str(TOTAL)), state_arrays(out / "checkpoints" / str(TOTAL))
    assert a.keys() == b.keys() and len(a) > 50
    assert not [k for k in a if not np.array_equal(a[k], b[k])]
    assert steady(read_metrics(ref)) == steady(read_metrics(out))
    assert (out / "export" / "model.safetensors").read_bytes() == (ref / "export" / "model.safetensors").read_bytes()
    summary, expected = json.loads((out / "summary.json").read_text()), json.loads((ref / "summary.json").read_text())
    assert {k: summary[k] for k in ("best_step", "validation", "test")} == \
        {k: expected[k] for k in ("best_step", "validation", "test")}
