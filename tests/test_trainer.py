"""`jaxtune run` end to end on a tiny BERT (subprocesses, 8 fake CPU devices): the run folder,
keep-best, early stopping, kill -9 + resume (bit-identical), SIGTERM, NaN, a damaged checkpoint,
the export in transformers, and `jaxtune eval/export/predict`.

Runs share the session's JAX persistent compilation cache and its uninterrupted tiny run
(`_tiny_run.shared_tiny`, also the reference of test_kill_resume, test_checkpoint_damage and
test_failures); they are real processes forked from one that has imported jaxtune already
(`_tiny_run.Warm`), or fresh subprocesses where jax must see the environment at import.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from jaxtune.runlog import TIMING_KEYS, read_metrics

import _tiny_run

WARM = None  # set by the `tiny` fixture

TOTAL = 24  # train.steps of the tiny recipe
EVALS = [6, 12, 18, 24]  # train.eval_every 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(this module's folder, the session's tiny recipe maker and JAX cache: `shared_assets`)."""
    global WARM
    recipe, env = _tiny_run.shared_assets(tmp_path_factory)
    WARM = _tiny_run.shared_warm(tmp_path_factory)
    return tmp_path_factory.mktemp("trainer"), recipe, env


def _extra_env(env):
    """`env` less what the Warm parent has already; None if jax must see it at import."""
    extra = {k: v for k, v in (env or {}).items() if WARM.env.get(k) != v}
    return None if any(k.startswith("JAX_") for k in extra) else extra


def cli(*args, env=None):
    """`jaxtune ARGS` to its end: forked from the session's `Warm` parent (a fresh subprocess
    where jax must read the environment at import: JAX_NUM_PROCESSES and the like)."""
    extra = _extra_env(env)
    return _tiny_run.cli(*args, env=env) if extra is None else WARM.run(*args, env=extra, timeout=240)


def popen(*args, env=None):
    extra = _extra_env(env)
    return _tiny_run.popen(*args, env=env) if extra is None else WARM.popen(*args, env=extra)


def run(tiny, out, *extra, env=None, **changes):
    root, recipe, base_env = tiny
    path = recipe(out, name=f"trainer-{Path(out).name}", **changes)
    return cli("run", path, *extra, env={**base_env, **(env or {})}), path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny):
    """The session's uninterrupted tiny run (`shared_tiny`: a fresh `jaxtune run` subprocess),
    its stdout and recipe. Read it; copy it before changing anything."""
    _, _, ref = _tiny_run.shared_tiny(tmp_path_factory)
    proc = subprocess.CompletedProcess(["jaxtune", "run"], 0, (ref.parent / "reference.stdout").read_text(), "")
    return ref, proc, ref.parent / "assets" / "reference.yaml"


def final_state(run_dir, step=TOTAL):
    """Every array of a step's TrainState, as numpy, by path."""
    import jax
    import orbax.checkpoint as ocp

    with warnings.catch_warnings():  # "Sharding info not provided": numpy is what we want
        warnings.simplefilter("ignore")
        tree = ocp.PyTreeCheckpointer().restore(Path(run_dir) / "checkpoints" / str(step) / "state")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def steady(lines):
    """metrics.jsonl lines without the wall-clock numbers."""
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in lines]


def assert_same_run(a, b):
    sa, sb = final_state(a), final_state(b)
    assert sa.keys() == sb.keys() and len(sa) > 50
    different = [k for k in sa if not np.array_equal(sa[k], sb[k])]
    assert not different, different[:5]
    assert steady(read_metrics(a)) == steady(read_metrics(b))


def wait_for_step(run_dir, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if any(m.get("step", 0) >= step for m in read_metrics(run_dir)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} in {run_dir} after {timeout}s")


def tear(step_dir: Path) -> None:
    """A torn write: every array file of a checkpoint step cut to half its size."""
    for f in (step_dir / "state" / "d").iterdir():
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])


def checkpoint_steps(run_dir):
    return sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir() if p.name.isdigit())


# ---------------------------------------------------------------------------------------------
# One uninterrupted run


def test_run_folder_metrics_and_summary(reference):
    out, proc, recipe = reference
    for name in ("config.yaml", "model_config.json", "metrics.jsonl", "summary.json", "curves.png",
                 "export/config.json", "export/model.safetensors", "export/tokenizer.json"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    from jaxtune.config import load_recipe

    resolved = load_recipe(out / "config.yaml")  # fully resolved, and still a valid recipe
    assert resolved.output_dir == str(out) and resolved.train.steps == TOTAL

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "split"} <= m.keys() for m in lines)
    train = [m for m in lines if m["split"] == "train"]
    val = [m for m in lines if m["split"] == "validation"]
    test = [m for m in lines if m["split"] == "test"]
    assert [m["step"] for m in train] == list(range(2, TOTAL + 1, 2))  # train.log_every 2
    assert all({"loss", "lr", "grad_norm", "accuracy", "examples_per_s", "epoch"} <= m.keys() for m in train)
    assert [m["step"] for m in val] == EVALS
    assert all({"loss", "accuracy", "macro_f1"} <= m.keys() for m in val)
    assert len(test) == 1

    summary = json.loads((out / "summary.json").read_text())
    best = max(val, key=lambda m: (m["accuracy"], -m["step"]))  # ties: the earlier step
    assert summary["best_step"] == best["step"] == test[0]["model_step"]
    assert summary["validation"] == {k: best[k] for k in ("loss", "accuracy", "macro_f1")}
    assert summary["test"] == {k: test[0][k] for k in ("loss", "accuracy", "macro_f1")}
    assert summary["stopped"] == "completed" and summary["steps"] == TOTAL
    assert summary["data"]["num_examples"] == {"train": 72, "validation": 24, "test": 24}
    assert summary["data"]["files"][0]["rows"] == 120 and summary["train_examples_per_s"] > 0
    assert f"test accuracy {100 * summary['test']['accuracy']:.2f}%" in proc.stdout
    assert f"macro-F1 {summary['test']['macro_f1']:.4f}" in proc.stdout


def test_keep_best_keeps_the_best_eval_step_and_the_newest_two(reference):
    out = reference[0]
    val = [m for m in read_metrics(out) if m["split"] == "validation"]
    best = max(val, key=lambda m: (m["accuracy"], -m["step"]))["step"]
    assert best not in (TOTAL - 2, TOTAL), "the recipe should make the best an older step"
    assert checkpoint_steps(out) == sorted({best, TOTAL - 2, TOTAL})  # keep 2 + keep_best 1
    metrics = json.loads((out / "checkpoints" / str(best) / "metrics" / "metrics").read_text())
    assert metrics["accuracy"] == max(m["accuracy"] for m in val)


def test_export_reloads_in_transformers_with_the_same_logits(reference):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from jaxtune.inference import load

    out = reference[0]
    ours = load(out)  # the best checkpoint, in jaxtune
    assert ours.step == json.loads((out / "summary.json").read_text())["best_step"]
    tok = AutoTokenizer.from_pretrained(out / "export")
    theirs = AutoModelForSequenceClassification.from_pretrained(out / "export").eval()
    assert theirs.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    batch = tok(["good great day", "the food was awful and bad", "paper road"], padding=True, return_tensors="np")
    mine = np.asarray(ours.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits)
    with torch.no_grad():
        ref = theirs(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    np.testing.assert_allclose(mine, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Interrupted runs


def test_kill_9_at_a_random_step_then_resume_is_bit_identical(tiny, reference):
    root = tiny[0]
    out = root / "killed"
    kill_at = random.Random().randint(5, 20)
    print(f"kill -9 after step {kill_at}")
    recipe = tiny[1](out, name="trainer-killed")
    proc = popen("run", recipe, env=tiny[2])
    wait_for_step(out, kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    saved = checkpoint_steps(out)  # finished ones only (a save in flight is a *-tmp-* folder)
    last_logged = max(m["step"] for m in read_metrics(out))
    assert saved and max(saved) <= last_logged < TOTAL, (saved, last_logged)
    again, _ = run(tiny, out)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [line for line in again.stdout.splitlines() if line.startswith("resuming from step")]
    assert resumed and int(resumed[0].split()[3]) == max(saved), again.stdout
    assert_same_run(reference[0], out)
    assert (out / "export" / "model.safetensors").read_bytes() == \
        (reference[0] / "export" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def sigtermed(tiny):
    out = tiny[0] / "sigterm"
    recipe = tiny[1](out, name="trainer-sigterm")
    proc = popen("run", recipe, env=tiny[2])
    wait_for_step(out, 7, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    return out, proc.returncode, stdout, stderr


def test_sigterm_finishes_the_step_saves_and_exits_0(sigtermed):
    out, code, stdout, stderr = sigtermed
    assert code == 0, stderr[-3000:]
    lines = [line for line in stdout.splitlines() if line.startswith("stopped by SIGTERM at step")]
    assert len(lines) == 1, stdout
    step = int(lines[0].split()[5].rstrip(":"))
    assert 7 <= step < TOTAL and max(checkpoint_steps(out)) == step
    assert max(m["step"] for m in read_metrics(out)) <= step
    assert not (out / "summary.json").exists()


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tiny, reference, sigtermed):
    out = tiny[0] / "damaged"
    shutil.copytree(sigtermed[0], out)
    latest = max(checkpoint_steps(out))
    tear(out / "checkpoints" / str(latest))
    proc, _ = run(tiny, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    previous = max(s for s in checkpoint_steps(sigtermed[0]) if s < latest)
    assert f"checkpoint step {latest} in {out / 'checkpoints'} cannot be restored" in proc.stderr
    assert f"falling back to step {previous}" in proc.stderr
    assert f"resuming from step {previous}" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert [p.name.split("-")[0] for p in (out / "checkpoints.corrupt").iterdir()] == [str(latest)]
    assert_same_run(reference[0], out)


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tiny):
    """JAX's preemption sync point: hosts agree on the step, all save it, all exit 0."""
    import socket

    out = tiny[0] / "two-hosts"
    recipe = tiny[1](out, name="trainer-two-hosts")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**tiny[2], "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2"}
    procs = [popen("run", recipe, env={**env, "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    try:
        wait_for_step(out, 5, procs[0])
        procs[1].send_signal(signal.SIGTERM)
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    stops = [line for line in results[0][0].splitlines() if line.startswith("stopped by SIGTERM at step")]
    assert len(stops) == 1, results[0][0]
    step = int(stops[0].split()[5].rstrip(":"))
    assert 5 <= step < TOTAL and max(checkpoint_steps(out)) == step
    assert f"Reached preemption sync point, step={step}" in results[1][1]  # process 1 saved it too
    assert (out / "checkpoints" / str(step) / "data" / "process_1-of-2.json").is_file()


def test_injected_nan_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny):
    out = tiny[0] / "nan"
    proc, _ = run(tiny, out, env={"JAXTUNE_INJECT_NAN_STEP": "9"})
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and err[-1].startswith("error: non-finite loss (nan) at step 9;")
    assert f"last good checkpoint: step 8 in {out / 'checkpoints'}" in err[-1]
    assert max(checkpoint_steps(out)) == 8
    assert all(np.isfinite(v).all() for v in final_state(out, 8).values())
    assert max(m["step"] for m in read_metrics(out)) == 8


def test_early_stopping_stops_at_the_first_eval_out_of_patience(tiny):
    out = tiny[0] / "early"
    # min_delta is large so that the tiny model, whatever its trajectory, runs out of patience
    # before the last step (the loss falls ~0.35 in all); the replay below checks the exact step.
    es = {"metric": "loss", "mode": "min", "patience": 2, "min_delta": 0.25}
    proc, _ = run(tiny, out, train__eval_every=3, train__early_stopping=es)
    assert proc.returncode == 0, proc.stderr[-3000:]
    val = [m for m in read_metrics(out) if m["split"] == "validation"]
    best, bad, expected = None, 0, None  # the rule, replayed on the logged losses
    for m in val:
        if best is None or m["loss"] < best - es["min_delta"]:
            best, bad = m["loss"], 0
        else:
            bad += 1
            if bad == es["patience"]:
                expected = m["step"]
                break
    assert expected is not None and expected < TOTAL, val
    assert val[-1]["step"] == expected
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "early_stopping" and summary["steps"] == expected
    assert f"early stopping at step {expected}" in proc.stdout


def test_a_finished_folder_without_checkpoints_is_refused_and_restart_moves_it_aside(tiny, tmp_path):
    from jaxtune.errors import JaxtuneError
    from jaxtune.run.folder import prepare_run_dir

    out = tmp_path / "run"
    (out / "export").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    said = []
    with pytest.raises(JaxtuneError, match="holds export, summary.json but no checkpoint .* --restart"):
        prepare_run_dir(out, False, said.append)
    assert prepare_run_dir(out, True, said.append) is False
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "summary.json").exists() and out.is_dir()
    assert said and str(aside[0]) in said[0]
    (out / "metrics.jsonl").write_text("{}\n")  # a run that died before its first checkpoint
    assert prepare_run_dir(out, False, said.append) is False
    (out / "checkpoints" / "4").mkdir(parents=True)
    assert prepare_run_dir(out, False, said.append) is True


# ---------------------------------------------------------------------------------------------
# eval / export / predict (in-process through Click)


def invoke(*args):
    from click.testing import CliRunner

    from jaxtune.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_eval_a_run_and_its_export(reference, tiny):
    out = reference[0]
    summary = json.loads((out / "summary.json").read_text())
    r = invoke("eval", out, "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["examples"] == 24 and got["data"] == "test split"
    for k in ("loss", "accuracy", "macro_f1"):
        assert got[k] == pytest.approx(summary["test"][k], abs=1e-6)
    r = invoke("eval", out / "export", "--data", f"csv:{out.parent / 'assets' / 'data.csv'}", "--json")
    assert r.exit_code == 0, r.output
    whole = json.loads(r.stdout.strip().splitlines()[-1])
    assert whole["examples"] == 120 and 0 <= whole["accuracy"] <= 1
    r = invoke("eval", out, "--split", "validation", "--step", TOTAL)
    assert r.exit_code == 0 and "checkpoint step 24 (requested): validation split (24 examples)" in r.stdout
    last = [m for m in read_metrics(out) if m["split"] == "validation"][-1]
    assert f"accuracy {last['accuracy']:.4f}" in r.stdout


def test_export_a_step_and_predict(reference, tmp_path):
    from safetensors.numpy import load_file

    out = reference[0]
    r = invoke("export", out, tmp_path / "e", "--step", TOTAL - 2)
    assert r.exit_code == 0, r.output
    ours = load_file(tmp_path / "e" / "model.safetensors")
    best = load_file(out / "export" / "model.safetensors")
    assert ours.keys() == best.keys() and any(not np.array_equal(ours[k], best[k]) for k in ours)
    assert json.loads((tmp_path / "e" / "config.json").read_text())["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    r = invoke("export", out, tmp_path / "b")  # --best is the default: the same as export/
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (out / "export" / "model.safetensors").read_bytes()

    r = invoke("predict", out / "export", "good great love", "bad awful hate", "--json")
    assert r.exit_code == 0, r.output
    preds = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [p["input"] for p in preds] == ["good great love", "bad awful hate"]
    for p in preds:
        probs = p["probabilities"]
        assert set(probs) == {"neg", "neu", "pos"} and sum(probs.values()) == pytest.approx(1, abs=1e-6)
        assert p["label"] == max(probs, key=probs.get)
    r = invoke("predict", out, "good great love")  # a run folder works too (its best checkpoint)
    assert r.exit_code == 0 and r.stdout.strip().endswith("<- good great love")
    assert r.stdout.split()[0] == preds[0]["label"]


def test_a_damaged_checkpoint_is_one_line_for_eval_export_predict_and_nothing_moves(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    best = json.loads((out / "summary.json").read_text())["best_step"]
    tear(out / "checkpoints" / str(best))
    others = ", ".join(str(s) for s in checkpoint_steps(out) if s != best)
    for args in (["eval", out], ["export", out, tmp_path / "e"], ["predict", out, "good great love"]):
        r = _tiny_run.cli(*args, env=WARM.env)  # a fresh process reads the torn files at its start-up
        assert r.returncode == 2, r.stderr[-3000:]
        err = [line for line in r.stderr.splitlines() if not line.startswith("WARNING:")]  # jax's own
        assert len(err) == 1 and err[0].startswith(f"error: checkpoint step {best} in {out / 'checkpoints'} "
                                                   "cannot be restored (ValueError: "), r.stderr
        assert "is not valid for value of size" in err[0] and err[0].endswith(f"other checkpoints: {others} (--step N)")
    assert best in checkpoint_steps(out) and not (out / "checkpoints.corrupt").exists()
    assert not (tmp_path / "e").exists()
    r = cli("eval", out, "--step", TOTAL)
    assert r.returncode == 0 and f"checkpoint step {TOTAL} (requested)" in r.stdout, r.stderr[-3000:]


# `jaxtune run`, but the best checkpoint is torn just before the final test evaluation reads it back.
TEAR_BEST_THEN_RUN = """
import sys
from jaxtune.checkpoint import Checkpoints
real = Checkpoints.restore_params
def torn(self, step, abstract):
    for f in (self.directory / str(step) / "state" / "d").iterdir():
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    return real(self, step, abstract)
Checkpoints.restore_params = torn
from jaxtune.cli import entry
sys.argv = ["jaxtune", "run", sys.argv[1]]
entry()
"""


def test_a_best_checkpoint_damaged_at_the_end_falls_back_to_the_final_state(tiny, reference):
    best = json.loads((reference[0] / "summary.json").read_text())["best_step"]
    assert best < TOTAL  # the premise: the final test reads the best checkpoint back
    out = tiny[0] / "torn-best"
    recipe = tiny[1](out, name="trainer-torn-best")
    proc = subprocess.run([sys.executable, "-c", TEAR_BEST_THEN_RUN, str(recipe)], capture_output=True,
                          text=True, timeout=240, env={**os.environ, **tiny[2]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"warning: checkpoint step {best} in {out / 'checkpoints'} cannot be restored" in proc.stdout
    assert f"using step {TOTAL}" in proc.stdout and "Traceback" not in proc.stderr
    assert [p.name.split("-")[0] for p in (out / "checkpoints.corrupt").iterdir()] == [str(best)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_step"] == TOTAL and summary["validation"] == {
        k: v for k, v in summary["last_validation"].items() if k != "step"}
    assert summary["metric"]["value"] == summary["validation"]["accuracy"]
    test = [m for m in read_metrics(out) if m["split"] == "test"]
    assert len(test) == 1 and test[0]["model_step"] == TOTAL
    from safetensors.numpy import load_file  # the export holds the final parameters, not the reference's best
    assert any(not np.array_equal(a, load_file(reference[0] / "export" / "model.safetensors")[k])
               for k, a in load_file(out / "export" / "model.safetensors").items())


@pytest.mark.parametrize("args, message", [
    (["eval", "{tmp}/nope"], "{tmp}/nope does not exist"),
    (["eval", "{tmp}"], "is neither a run folder"),
    (["eval", "{out}/export"], "is a model folder: give the data to evaluate with --data SPEC"),
    (["eval", "{out}", "--split", "train2"], "no 'train2' split"),
    (["eval", "{out}", "optim.lr=1"], "eval takes data.KEY=VALUE overrides only"),
    (["eval", "{out}", "--data", "csv:{tmp}/missing.csv"], "missing.csv"),
    (["export", "{out}", "{out}"], "exists and is not empty"),
    (["export", "{out}", "{tmp}/x", "--step", "999"], "no checkpoint at step 999; available: "),
    (["export", "{out}/export", "{tmp}/y"], "is not a run folder"),
    (["predict", "{out}/export"], "give at least one INPUT"),
])
def test_user_mistakes_give_one_line(reference, tmp_path, args, message):
    out = reference[0]
    fill = lambda s: s.format(tmp=tmp_path, out=out)  # noqa: E731
    r = invoke(*map(fill, args))
    assert r.exit_code == 2, r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fill(message) in err[0], r.stderr
