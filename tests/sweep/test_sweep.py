"""`jaxtune sweep` end to end on the tiny BERT recipe (8 training steps, evaluations at 4 and 8):
each sampler, a pruned trial, kill -9 and rerun, two processes on one study, and every SPACE
mistake as one line. Processes are forked from the session's warm jaxtune (`_tiny_run.Warm`),
the killed one is a fresh subprocess; all share the session's JAX compilation cache.

A learning rate is a constant of the compiled step, so each new value costs a compilation
(~6 s here): the spaces draw from the same few rates (or vary `train.seed`, an input of the step)
except where a continuous distribution itself is under test."""

from __future__ import annotations

import csv
import json
import signal
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from jaxtune.config import load_recipe
from jaxtune.errors import ConfigError
from jaxtune.sweep.space import read_space
from jaxtune.sweep.trial import run_trial

import _tiny_run

STEPS = {"train__steps": 8, "train__eval_every": 4, "checkpoint__every": 4}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    recipe, env = _tiny_run.shared_assets(tmp_path_factory)
    warm = _tiny_run.shared_warm(tmp_path_factory)
    root = tmp_path_factory.mktemp("sweep")
    long = recipe(root / "unused", name="sweep-long", train__steps=16, train__eval_every=8)
    return root, recipe(root / "unused", name="sweep-tiny", **STEPS), warm, env, long


def space(root: Path, name: str, text: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(text)
    return path


def load(folder: Path, storage=None) -> optuna.Study:
    storage = storage or f"sqlite:///{folder / 'study.db'}"
    return optuna.load_study(study_name=folder.name, storage=storage)


def trials_csv(folder: Path) -> list[dict]:
    with open(folder / "trials.csv") as f:
        return list(csv.DictReader(f))


def done(study) -> list:
    return [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def check_folder(folder: Path, n: int, numbers=None) -> list[dict]:
    """Every promise of a finished sweep folder of n trials (run folders `numbers`, default 0..n-1:
    Optuna's trial numbers, which skip the queue entries of resumed trials); trials.csv's rows."""
    numbers = list(range(n)) if numbers is None else numbers
    rows = trials_csv(folder)
    assert [int(r["trial"]) for r in rows] == numbers and len(rows) == n, rows
    assert all(r["state"] in ("complete", "pruned") for r in rows), rows
    for r in rows:
        run = folder / r["run_dir"]
        assert run == folder / "trials" / f"{int(r['trial']):04d}"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["stopped"] == ("pruned" if r["state"] == "pruned" else "completed")
        assert any(p.name.isdigit() for p in (run / "checkpoints").iterdir())
        assert float(r["wall_time_s"]) > 0
    assert sorted(p.name for p in (folder / "trials").iterdir()) == [f"{i:04d}" for i in numbers]
    assert (folder / "history.png").stat().st_size > 1000
    return rows


def test_grid_sampler_every_point_once_and_best_yaml_runs(tiny):
    root, recipe, warm, *_ = tiny
    out = root / "grid"
    sp = space(root, "grid", "optim.lr: [0.003, 0.001]\ntrain.seed: [0, 1]\n")
    proc = warm.run("sweep", recipe, sp, "--sampler", "grid", "--pruner", "none", "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = check_folder(out, 4)  # --trials defaults to the grid's size
    points = {(float(r["optim.lr"]), int(r["train.seed"])) for r in rows}
    assert points == {(0.003, 0), (0.003, 1), (0.001, 0), (0.001, 1)}
    assert (out / "importance.png").stat().st_size > 1000  # two keys, four complete trials
    best = max(rows, key=lambda r: float(r["accuracy"]))
    recipe_best = yaml.safe_load((out / "best.yaml").read_text())
    assert recipe_best["optim"]["lr"] == float(best["optim.lr"])
    assert recipe_best["train"]["seed"] == int(best["train.seed"])
    assert recipe_best["output_dir"] is None and recipe_best["name"] == "grid-best"
    check = warm.run("validate", out / "best.yaml")
    assert check.returncode == 0, check.stderr
    # a trial's folder is an ordinary run folder
    ev = warm.run("eval", out / "trials" / "0000", "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "accuracy" in json.loads(ev.stdout.strip().splitlines()[-1])
    # the same command again: nothing left to run
    again = warm.run("sweep", recipe, sp, "--sampler", "grid", "--pruner", "none", "--output", out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "=== trial" not in again.stdout and "4 done already" in again.stdout
    assert len(load(out).get_trials()) == 4
    # another SPACE for this folder: one line, nothing run
    other = space(root, "grid-other", "optim.lr: [0.003, 0.0001]\ntrain.seed: [0, 1]\n")
    bad = warm.run("sweep", recipe, other, "--sampler", "grid", "--output", out)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith("error: ") and "space.optim.lr" in bad.stderr
    changed = warm.run("sweep", recipe, sp, "optim.weight_decay=0.1", "--sampler", "grid", "--output", out)
    assert changed.returncode == 2 and "recipe.optim.weight_decay" in changed.stderr, changed.stderr
    assert len(load(out).get_trials()) == 4


def test_random_sampler_on_journal_storage(tiny):
    root, recipe, warm, *_ = tiny
    out = root / "random"
    out.mkdir()
    journal = f"journal:{out / 'study.journal'}"
    sp = space(root, "random", "optim.lr: {log_uniform: [1.0e-3, 1.0e-2]}\ntrain.seed: {int: [0, 9]}\n")
    proc = warm.run("sweep", recipe, sp, "--sampler", "random", "--trials", "1", "--pruner", "none",
                    "--output", out, "--storage", journal, "--seed", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = check_folder(out, 1)
    assert not (out / "study.db").exists() and (out / "study.journal").stat().st_size > 0
    for r in rows:
        assert 1e-3 <= float(r["optim.lr"]) <= 1e-2 and int(r["train.seed"]) in range(10)
        cfg = yaml.safe_load((out / r["run_dir"] / "config.yaml").read_text())
        assert cfg["optim"]["lr"] == float(r["optim.lr"]) and cfg["train"]["seed"] == int(r["train.seed"])
    assert len(done(load(out, optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))))) == 1
    # a rerun without --storage finds the journal through sweep.yaml; a second trial with --trials 2
    more = warm.run("sweep", recipe, sp, "--sampler", "random", "--trials", "2", "--pruner", "none",
                    "--output", out)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "1 done already" in more.stdout and more.stdout.count("=== trial 1:") == 2  # header + result
    check_folder(out, 2)
    assert not (out / "study.db").exists()
    assert (out / "parallel.png").stat().st_size > 1000  # two keys, fewer than 4 complete trials


def test_tpe_sampler_and_a_pruned_trial_keeps_its_checkpoint(tiny):
    root, recipe, warm, *_ = tiny
    out = root / "tpe"
    sp = space(root, "tpe", "train.seed: {int: [0, 9]}\n")
    proc = warm.run("sweep", recipe, sp, "--sampler", "tpe", "--trials", "2", "--pruner", "none",
                    "--output", out, "--seed", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_folder(out, 2)
    assert (out / "slice.png").stat().st_size > 1000  # one key
    # pruning: lr 0 never learns; the grid (seed 1) runs lr 0.003 first, so the median pruner
    # stops lr 0 at its first evaluation (step 4), whose validation loss is worse
    out = root / "pruned"
    sp = space(root, "prune", "optim.lr: [0.003, 0.0]\n")
    proc = warm.run("sweep", recipe, sp, "--sampler", "grid", "--pruner", "median", "--metric", "loss",
                    "--mode", "min", "--seed", "1", "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = check_folder(out, 2)
    assert [(float(r["optim.lr"]), r["state"]) for r in rows] == [(0.003, "complete"), (0.0, "pruned")], rows
    run = out / "trials" / "0001"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["stopped"] == "pruned" and summary["metric"]["name"] == "loss"
    assert max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == 4  # the pruned step
    assert (run / "export" / "config.json").is_file()
    trial = load(out).get_trials()[1]
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [4]


def test_kill_9_mid_trial_then_rerun_ends_with_exactly_n_trials(tiny):
    root, _, warm, env, recipe = tiny
    out = root / "killed"
    sp = space(root, "kill", "optim.lr: [0.003, 0.001]\n")
    args = ["sweep", recipe, sp, "--sampler", "random", "--trials", "3", "--pruner", "none", "--output", out]
    proc = _tiny_run.popen(*args, env=env)  # a fresh process, killed for real
    metrics = out / "trials" / "0001" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.is_file() and any(json.loads(l).get("step", 0) >= 10 for l in metrics.read_text().splitlines()
                                     if l.strip().endswith("}")):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "trials" / "0001" / "summary.json").exists(), "the kill came after trial 1 ended"
    first_summary = (out / "trials" / "0000" / "summary.json").read_text()
    before = load(out).get_trials()
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.RUNNING]

    again = warm.run(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "=== trial 1 (resuming trial 1" in again.stdout and "resuming from step" in again.stdout
    assert "=== trial 0" not in again.stdout
    assert (out / "trials" / "0000" / "summary.json").read_text() == first_summary  # not run again
    study = load(out)
    assert len(done(study)) == 3
    killed, retry = study.get_trials()[1], study.get_trials()[2]  # the kill's trial and its queue entry
    assert killed.state == TrialState.FAIL and retry.system_attrs["retry_history"] == [1]
    assert retry.params == killed.params == before[1].params
    assert len(study.get_trials()) == 4
    rows = check_folder(out, 3, [0, 1, 3])
    assert [int(r["attempts"]) for r in rows] == [1, 2, 1]
    summary = json.loads((out / "trials" / "0001" / "summary.json").read_text())
    assert summary["resumed_from"] >= 2 and summary["steps"] == 16  # from a checkpoint, not from scratch


def test_two_processes_share_one_study(tiny):
    root, recipe, warm, *_ = tiny
    out = root / "parallel"
    sp = space(root, "parallel", "optim.lr: [0.003, 0.001]\ntrain.seed: {int: [0, 9]}\n")
    args = ["sweep", recipe, sp, "--sampler", "random", "--trials", "3", "--pruner", "none", "--output", out]
    procs = [warm.popen(*args), warm.popen(*args)]
    outputs = [p.communicate(600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    ran = [{int(line.split()[2].rstrip(":")) for line in o[0].splitlines() if line.startswith("=== trial ")}
           for o in outputs]
    study = load(out)
    numbers = sorted(t.number for t in done(study))
    assert ran[0] and ran[1] and not ran[0] & ran[1] and sorted(ran[0] | ran[1]) == numbers, ran
    assert len(numbers) == 3
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or t.user_attrs.get("surplus")
               for t in study.get_trials())
    owners = {t.user_attrs["owner"]["pid"] for t in done(study)}
    assert owners == {p.pid for p in procs}
    check_folder(out, 3, numbers)


BAD_SPACES = [
    ("optim.lrr: [0.1, 0.2]\n", "random", "optim.lrr: the recipe has no key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("optim.lr: {normal: [0, 1]}\n", "random", "optim.lr: expected a list of values or one of"),
    ("optim.lr: {uniform: [0.1, 0.01]}\n", "random", "optim.lr: uniform needs low < high"),
    ("optim.lr: {log_uniform: [0, 0.01]}\n", "random", "optim.lr: log_uniform needs low > 0"),
    ("optim.lr: {uniform: [0.01]}\n", "random", "optim.lr: uniform needs [low, high]"),
    ("optim.lr: {uniform: [a, 0.01]}\n", "random", "optim.lr: uniform bounds must be finite numbers"),
    ("train.steps: {int: [2, 8.5]}\n", "random", "train.steps: int needs whole-number bounds"),
    ("train.batch_size: {uniform: [4, 8]}\n", "random", "train.batch_size: 4.0 does not fit the recipe"),
    ("optim.schedule: [linear, cubic]\n", "random", "optim.schedule: 'cubic' does not fit the recipe"),
    ("optim.lr: {choice: []}\n", "random", "optim.lr: choice needs a non-empty list"),
    ("optim.lr: [0.1, 0.1]\n", "random", "optim.lr: a value is listed twice"),
    ("optim.freeze: {choice: [[a], [b]]}\n", "random", "optim.freeze: choices must be single values"),
    ("optim.lr: {log_uniform: [1.0e-4, 1.0e-2]}\n", "grid", "optim.lr: a log_uniform range has no grid values"),
    ("train.metric: [accuracy, loss]\n", "random", "train.metric: the sweep sets this key itself"),
    ("optim: [1, 2]\n", "random", "optim: is a section; name one of its keys"),
    ("optim.lr.x: [1, 2]\n", "random", "optim.lr.x: 'optim.lr' is a value, not a section"),
    ("", "random", "the SPACE file names no keys"),
    ("optim.lr: [1, 2\n", "random", "invalid YAML at line 2"),
]


@pytest.mark.parametrize("text,sampler,message", BAD_SPACES, ids=[m.split(":")[0] + str(i) for i, (_, _, m)
                                                                   in enumerate(BAD_SPACES)])
def test_bad_space_is_one_line_before_any_trial(tiny, text, sampler, message):
    root, recipe, warm, *_ = tiny
    sp = space(root, "bad", text)
    out = root / "bad-sweep"
    proc = warm.run("sweep", recipe, sp, "--sampler", sampler, "--output", out)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert proc.stderr.startswith(f"error: {sp}: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not out.exists()


def test_other_user_mistakes_are_one_line(tiny):
    root, recipe, warm, *_ = tiny
    sp = space(root, "ok", "optim.lr: [0.003, 0.001]\n")
    out = root / "mistakes"
    for args, message in [
        (["--sampler", "grid", "--trials", "3"], "--trials 3 is more than the grid's 2 points"),
        (["--sampler", "bayes"], "--sampler bayes: choose one of grid, random, tpe"),
        (["--pruner", "asha"], "--pruner asha: choose one of none, median, hyperband"),
        (["--mode", "up"], "--mode up: choose min or max"),
        (["--trials", "0"], "--trials must be positive"),
        (["--storage", "study.db"], "--storage study.db: give an RDB URL"),
    ]:
        proc = warm.run("sweep", recipe, sp, *args, "--output", out)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert not (out / "trials").exists() or not any((out / "trials").iterdir())


def test_values_the_run_refuses_stop_the_sweep_with_one_line_naming_the_trial(tiny):
    root, recipe, warm, *_ = tiny
    sp = space(root, "unsplittable", "train.batch_size: [7]\n")  # 8 devices: the batch cannot be split
    out = root / "unsplittable"
    proc = warm.run("sweep", recipe, sp, "--sampler", "random", "--trials", "1", "--output", out)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: trial 0 (train.batch_size=7): batch size 7 is not divisible"), proc.stderr
    assert [t.state for t in load(out).get_trials()] == [TrialState.FAIL]


def test_sigterm_saves_the_trial_and_queues_it_for_the_rerun(tiny):
    root, _, warm, env, recipe = tiny
    out = root / "sigterm"
    sp = space(root, "term", "optim.lr: [0.003, 0.001]\n")
    args = ["sweep", recipe, sp, "--sampler", "random", "--trials", "1", "--pruner", "none", "--output", out]
    proc = warm.popen(*args)
    metrics = out / "trials" / "0000" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and '"step": 6' in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(300)
    assert proc.returncode == 0, stderr[-2000:]
    assert "=== trial 0 interrupted: its run saved a checkpoint" in stdout
    trials = load(out).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params == trials[0].params and trials[1].system_attrs["retry_history"] == [0]
    assert [(r["trial"], r["state"], r["attempts"]) for r in trials_csv(out)] == [("0", "waiting", "2")]
    again = warm.run(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "=== trial 0 (resuming trial 0" in again.stdout and "resuming from step" in again.stdout
    check_folder(out, 1)
    assert [t.state for t in load(out).get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]


def test_hyperband_pruner_sees_every_evaluation(tiny):
    root, recipe, warm, *_ = tiny
    out = root / "hyperband"
    sp = space(root, "hyperband", "optim.lr: [0.003, 0.001]\n")
    proc = warm.run("sweep", recipe, sp, "--sampler", "random", "--trials", "2", "--pruner", "hyperband",
                    "--seed", "0", "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_folder(out, 2)
    for t in done(load(out)):
        steps = [4] if t.state == TrialState.PRUNED else [4, 8]
        assert sorted(t.intermediate_values) == steps, t


def test_a_sampled_combination_the_recipe_refuses_is_one_line_before_its_run(tiny, tmp_path):
    """Each bound passes alone (checked before any trial); together they do not: the trial's
    recipe is validated again and the trial fails before its run starts."""
    root, recipe, *_ = tiny
    base = load_recipe(recipe)  # train.steps 8, optim.warmup 2
    sp = space(root, "combination", "train.steps: [4, 8]\noptim.warmup: [2, 6]\n")
    dims = read_space(sp, base, "random")
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"train.steps": 4, "optim.warmup": 6})
    with pytest.raises(ConfigError, match=r"trial 0's values .* make an invalid recipe: optim.warmup \(6 steps\) "
                                          r"is longer than training \(train.steps=4\)"):
        run_trial(study, study.ask(), dims, base, tmp_path, "accuracy", "max", str(sp))
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]
    assert not (tmp_path / "trials").exists()


def test_a_trial_whose_loss_becomes_non_finite_ends_pruned(tiny):
    root, recipe, warm, *_ = tiny
    out = root / "nan"
    sp = space(root, "nan", "optim.lr: [0.003, 0.001]\n")
    proc = warm.run("sweep", recipe, sp, "--sampler", "random", "--trials", "1", "--output", out,
                    env={"JAXTUNE_INJECT_NAN_STEP": "6"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "=== trial 0: pruned (non-finite loss (nan) at step 6" in proc.stdout
    [row] = trials_csv(out)
    assert (row["state"], row["stopped"]) == ("pruned", "non-finite loss"), row
    [trial] = load(out).get_trials()
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [4]
    assert float(row["accuracy"]) == trial.intermediate_values[4]  # its last reported value
    assert 4 in [int(p.name) for p in (out / "trials" / "0000" / "checkpoints").iterdir() if p.name.isdigit()]
