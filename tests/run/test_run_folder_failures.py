"""The run folder when a start fails or a finished run is run again, met as a user meets it:
`jaxtune run` in a subprocess.

- An `output_dir` that cannot be used fails with one line before any data or model is loaded.
- A start that fails (bad data, bad model, SIGTERM / Ctrl-C while loading) removes the folders it
  created and changes nothing in a folder that was there (a `--restart` move is undone).
- A signal during start-up says so in one line and exits 128 + the signal's number.
- Records are kept: a session with changed settings moves the old config.yaml and summary.json
  to history/<time>/; re-running a finished run keeps summary.json's training figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import _tiny_run as tr
from _tiny_run import make_csv, popen

STARTUP_STOP = "during start-up, before any step: nothing to save"


WARM = None  # set by the `tiny` fixture


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The session's tiny assets and JAX compilation cache (`_tiny_run.shared_assets`). Runs that
    need no signal or permission drop are `jaxtune` processes forked from one that has imported
    jaxtune already (`_tiny_run.Warm`); those that do are fresh subprocesses."""
    global WARM
    recipe, env = tr.shared_assets(tmp_path_factory)
    WARM = tr.shared_warm(tmp_path_factory)
    return tmp_path_factory.mktemp("folder-failures"), recipe, env


def cli(*args, env=None, timeout=240):
    """`jaxtune ARGS` to its end (a forked `Warm` process, whose environment is the tiny `env`)."""
    assert (env or {}).items() <= WARM.env.items(), env
    return WARM.run(*args, timeout=timeout)


@pytest.fixture(scope="module")
def big_csv(tiny):
    """Enough rows that preparing them takes seconds: a start-up long enough to signal into."""
    return make_csv(tiny[0] / "big.csv", n=100_000)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny):
    """A finished run folder (copy it before use) and its stdout: the session's tiny reference
    run, made by `jaxtune run` (recipe name "reference") in a fresh subprocess."""
    recipe, env, ref = tr.shared_tiny(tmp_path_factory)
    return ref, (ref.parent / "reference.stdout").read_text()


def same_name(path: Path, tmp_path) -> Path:
    """The recipe at `path`, saved as reference.yaml (the finished run's recipe name, which its
    config.yaml records) in a folder of its own."""
    copy = tmp_path / "recipe" / "reference.yaml"
    copy.parent.mkdir()
    shutil.copyfile(path, copy)
    return copy


def copy_of(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    return out


def snapshot(folder: Path) -> dict:
    """Every file and folder under `folder`: content hash and modification time."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        out[key] = "dir" if p.is_dir() else (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def one_error_line(proc) -> str:
    """The one `error: ` line, last on stderr (warnings printed while loading may come before)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return errors[0]


def without_dac_override() -> list[str]:
    """A command prefix under which file permissions apply: root ignores them unless its
    CAP_DAC_OVERRIDE is dropped (setpriv); nothing is needed for another user."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.fail("running as root without setpriv (util-linux, essential on Debian): root ignores "
                    "file permissions, so this test cannot drop that power; install util-linux")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


# ---------------------------------------------------------------------------------------------
# Item 2: an output_dir that cannot be used, before any loading


def _nowhere_recipe(tmp_path, out) -> Path:
    """A valid recipe whose model and data do not exist: an error about them would mean that
    loading started before the output folder was checked."""
    path = tmp_path / "nowhere.yaml"
    path.write_text(yaml.safe_dump({
        "task": "sequence-classification", "model": {"path": str(tmp_path / "no-model")},
        "data": {"train": f"csv:{tmp_path / 'no-data.csv'}", "cache_dir": str(tmp_path / "cache")},
        "output_dir": str(out),
    }))
    return path


@pytest.mark.parametrize("where, message", [
    ("{tmp}/afile/run", "output_dir {tmp}/afile/run: {tmp}/afile is a file, not a folder"),
    ("{tmp}/afile/a/b", "output_dir {tmp}/afile/a/b: {tmp}/afile is a file, not a folder"),
    ("{tmp}/afile", "output_dir {tmp}/afile: it is a file, not a folder"),
    ("/proc/jaxtune-run", "output_dir /proc/jaxtune-run: /proc is a kernel pseudo-filesystem"),
    ("/proc/self/jaxtune-run", "/proc is a kernel pseudo-filesystem"),
    ("/sys/jaxtune-run", "output_dir /sys/jaxtune-run: /sys is a kernel pseudo-filesystem"),
    ("{tmp}/dangling/run", "{tmp}/dangling is a broken symbolic link"),
])
def test_an_unusable_output_dir_is_one_line_before_any_loading(tiny, tmp_path, where, message):
    fill = lambda s: s.format(tmp=tmp_path)  # noqa: E731
    (tmp_path / "afile").write_text("mine\n")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    proc = cli("run", _nowhere_recipe(tmp_path, fill(where)), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc)
    assert fill(message) in line and line.endswith("choose another output_dir"), line
    assert (tmp_path / "afile").read_text() == "mine\n"
    assert sorted(os.listdir(tmp_path)) == ["afile", "dangling", "nowhere.yaml"]
    assert not Path(fill(where)).is_dir()


@pytest.mark.parametrize("below", [True, False], ids=["in-a-read-only-folder", "a-read-only-folder"])
def test_an_output_dir_without_write_permission_is_one_line_before_any_loading(tmp_path, below):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "keep.txt").write_text("mine\n")
    out = locked / "run" if below else locked
    recipe = _nowhere_recipe(tmp_path, out)
    locked.chmod(0o555)
    try:
        proc = subprocess.run([*without_dac_override(), sys.executable, "-m", "jaxtune.cli", "run", str(recipe)],
                              capture_output=True, text=True, timeout=120)
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc)
    why = f"no permission to create folders in {locked}" if below else "no permission to write in it"
    assert f"output_dir {out}: {why}" in line, line
    assert sorted(p.name for p in locked.iterdir()) == ["keep.txt"]


# ---------------------------------------------------------------------------------------------
# Item 8: a failed start leaves no folder behind and changes nothing that was there


@pytest.mark.parametrize("bad, message", [
    ({"data__train": "csv:{tmp}/missing.csv"}, "missing.csv"),
    ({"model__path": "{tmp}/no-model"}, "no-model"),
    ({"train__metric": "nonsense"}, "train.metric: 'nonsense' is not a validation metric"),
])
def test_a_failed_start_removes_the_folders_it_created(tiny, tmp_path, bad, message):
    root, recipe, env = tiny
    out = tmp_path / "new" / "deeper" / "run"
    changes = {k: v.format(tmp=tmp_path) for k, v in bad.items()}
    proc = cli("run", recipe(out, name="failed-start", **changes), env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message.format(tmp=tmp_path) in one_error_line(proc)
    assert not (tmp_path / "new").exists(), list((tmp_path / "new").rglob("*"))


def test_a_failed_start_leaves_the_users_empty_folder_empty(tiny, tmp_path):
    root, recipe, env = tiny
    out = tmp_path / "mine"
    out.mkdir()
    proc = cli("run", recipe(out, name="failed-in-mine", model__path=str(tmp_path / "no-model")), env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_error_line(proc)
    assert out.is_dir() and not any(out.iterdir())


@pytest.mark.parametrize("restart", [False, True], ids=["resume", "restart"])
def test_a_failed_start_changes_nothing_in_a_finished_run(tiny, finished, tmp_path, restart):
    root, recipe, env = tiny
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    proc = cli("run", recipe(out, name="failed-rerun", model__path=str(tmp_path / "no-model")),
               *(["--restart"] if restart else []), env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no-model" in one_error_line(proc)
    assert snapshot(out) == before
    assert os.listdir(tmp_path) == ["run"]  # no run.old-*
    if restart:
        assert f"--restart: moved the previous run back to {out}" in proc.stdout


# ---------------------------------------------------------------------------------------------
# Item 7: SIGTERM / SIGINT while the data or the model loads


def _stop_while_loading(proc, sig, ready) -> tuple[str, str]:
    """Wait until `ready()` (the run is loading), send `sig`, return (stdout, stderr)."""
    deadline = time.time() + 120
    try:
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the run never started loading"
            time.sleep(0.01)
        proc.send_signal(sig)
        return proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_loading_is_one_line_and_leaves_no_folder(tiny, big_csv, tmp_path, sig, code):
    root, recipe, env = tiny
    out = tmp_path / "new" / "run"
    path = recipe(out, name="signalled", data__train=f"csv:{big_csv}", data__cache_dir=str(tmp_path / "cache"))
    proc = popen("run", path, env=env)
    stdout, stderr = _stop_while_loading(proc, sig, out.exists)  # made just before loading starts
    assert proc.returncode == code, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"stopped by {sig.name} {STARTUP_STOP}", stderr[-3000:]
    assert "Traceback" not in stderr
    assert not (tmp_path / "new").exists()
    assert not list((tmp_path / "cache").rglob(".tmp-*"))  # the data cache's half-written build


def test_sigterm_while_a_finished_run_loads_changes_nothing(tiny, finished, big_csv, tmp_path):
    root, recipe, env = tiny
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    path = recipe(out, name="signalled-rerun", data__train=f"csv:{big_csv}",
                  data__cache_dir=str(tmp_path / "cache"))
    proc = popen("run", path, env=env)
    lines = []

    def noted():  # printed just before loading: "note: the recipe differs from the run's config.yaml"
        lines.append(proc.stdout.readline())
        return lines[-1].startswith("note: the recipe differs")

    stdout, stderr = _stop_while_loading(proc, signal.SIGTERM, noted)
    assert proc.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"stopped by SIGTERM {STARTUP_STOP}", stderr[-3000:]
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------
# Item 6: records are kept


def test_rerunning_a_finished_run_keeps_the_training_figures(tiny, finished, tmp_path):
    root, recipe, env = tiny
    out = copy_of(finished, tmp_path)
    first = json.loads((out / "summary.json").read_text())
    assert first["session"]["steps"] == first["steps"] == 24 and first["resumed_from"] is None
    assert 0 < first["wall_time_s"] < first["session"]["wall_time_s"]  # loading, test, export: not training
    assert "done in" in finished[1] and "trained 24 of 24 steps" in finished[1]
    config = (out / "config.yaml").read_text().replace(str(finished[0]), str(out))  # the copy's folder
    proc = cli("run", same_name(recipe(out, name="finished"), tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / "summary.json").read_text())
    assert again["wall_time_s"] == first["wall_time_s"]  # training: measured once, kept
    assert again["train_examples_per_s"] == first["train_examples_per_s"]
    assert again["session"]["steps"] == 0 and again["resumed_from"] == 24
    assert again["session"]["started"] > first["session"]["started"]
    assert again["test"] == first["test"] and again["best_step"] == first["best_step"]
    assert "tested the finished run of 24 steps" in proc.stdout
    assert (out / "config.yaml").read_text() == config and not (out / "history").exists()


def test_changed_settings_keep_the_previous_config_and_summary(tiny, finished, tmp_path):
    root, recipe, env = tiny
    out = copy_of(finished, tmp_path)
    old_config, old_summary = (out / "config.yaml").read_bytes(), (out / "summary.json").read_bytes()
    proc = cli("run", same_name(recipe(out, name="finished", train__log_every=3), tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: the recipe differs from the run's config.yaml: train.log_every 2 -> 3" in proc.stdout
    kept = list((out / "history").iterdir())
    assert len(kept) == 1 and sorted(p.name for p in kept[0].iterdir()) == ["config.yaml", "summary.json"]
    assert f"kept the run's previous config.yaml and summary.json in {kept[0]}" in proc.stdout
    assert (kept[0] / "config.yaml").read_bytes() == old_config  # as it was, old output_dir and all
    assert (kept[0] / "summary.json").read_bytes() == old_summary
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["log_every"] == 3
    assert json.loads((out / "summary.json").read_text())["session"]["steps"] == 0
