"""Checkpoints damaged for real on a tiny run: every file kind of a step cut short at several
points, resumed and read back; and a disk that fills up during a save.

The promise (README, Runs): a damaged newest checkpoint is moved to `checkpoints.corrupt/` with
one warning and the run resumes from the one before; `jaxtune eval / export / predict` on a
damaged checkpoint stop with one line naming it (tests/test_failures.py runs those through the
CLI); a failed save keeps the previous checkpoint and stops with one line.

The sweep over files runs in one subprocess (as `jaxtune` would: `quiet_orbax()`, its stderr
caught per case at the file-descriptor level), not one CLI run per case: the code paths are the
CLI's (`Checkpoints.restore_latest` as `jaxtune run` resumes, `inference.load` as eval/export/
predict load), and one real resume through the CLI (a fresh `python -m jaxtune.cli`, which reads
the cut files at its start-up) checks the whole run. The sweep and the full-disk run are processes
forked from one that has imported jaxtune already (`_tiny_run.Warm`).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

import _tiny_run as tr

TOTAL = 24  # the tiny recipe's train.steps; checkpoints kept at its end: 12 (best), 22, 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tr.shared_tiny(tmp_path_factory)


def state_arrays(step_dir) -> dict:
    """Every array of a step's TrainState, as numpy, by path."""
    import jax
    import orbax.checkpoint as ocp

    with warnings.catch_warnings():  # "Sharding info not provided": numpy is what we want
        warnings.simplefilter("ignore")
        tree = ocp.PyTreeCheckpointer().restore(Path(step_dir) / "state")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


# The files of a step that a restore reads, by kind (globs under checkpoints/<step>/): each one cut
# short makes the step damaged. The others (commit_success.txt, state/_sharding, the per-process
# state/ocdbt.process_0/ files that the finalized step's root database no longer refers to) are
# not read: cut short, the step still restores the same bits.
READ = ["_CHECKPOINT_METADATA", "metrics/metrics", "meta/metadata", "data/process_0-of-1.json",
        "state/_METADATA", "state/array_metadatas/process_0", "state/manifest.ocdbt", "state/d/*"]


def cuts(n: int) -> list[int]:
    return sorted({0, n // 2, n - 1})


# One process, many damaged copies of a run: for each case (a file of step 24 and where to cut
# it), what `jaxtune run` (restore_latest) and eval/export/predict (inference.load of step 24, and
# of the latest) make of it, and everything written to stderr meanwhile (fd 2, garbage collected).
SWEEP = r"""
import gc, json, os, shutil, sys
from pathlib import Path
import jax, numpy as np
import jaxtune.cli  # noqa: F401  (the CLI's imports and logging set-up)
from jaxtune.checkpoint import CheckpointDamaged, Checkpoints, quiet_orbax
from jaxtune.config import load_recipe
from jaxtune.inference import load
from jaxtune.run.build import build

quiet_orbax()
ref, work, cases = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
recipe = load_recipe(ref / "config.yaml")
run = build(recipe)
pristine = [np.asarray(x) for x in jax.tree.leaves(
    Checkpoints(ref / "checkpoints", recipe.checkpoint, read_only=True).restore(24, run.abstract).state)]

for line in cases.read_text().splitlines():
    case = json.loads(line)
    out = work / case["name"]
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("export", "tensorboard"))
    for rel, cut in case["cuts"]:
        f = out / "checkpoints" / "24" / rel
        f.write_bytes(f.read_bytes()[:cut])
    sys.stderr.flush()
    saved, err = os.dup(2), open(work / (case["name"] + ".stderr"), "w+")
    os.dup2(err.fileno(), 2)
    result = {"name": case["name"]}
    try:
        for key, kw in (("step", {"step": 24}), ("latest", {"best": False})):
            try:
                result[key] = "ok step %d" % load(out, **kw).step
            except CheckpointDamaged as e:
                result[key] = str(e)
        result["moved_by_load"] = (out / "checkpoints.corrupt").exists()
        ckpt = Checkpoints(out / "checkpoints", recipe.checkpoint, metric=recipe.train.metric,
                           mode=recipe.train.metric_mode)
        r = ckpt.restore_latest(run.abstract, run.data.train_iterator)
        ckpt.close()
        result["resumed"] = r.step
        result["same_bits"] = r.step == 24 and all(
            np.array_equal(a, np.asarray(b)) for a, b in zip(pristine, jax.tree.leaves(r.state)))
        result["moved"] = sorted(p.name.split("-")[0] for p in (out / "checkpoints.corrupt").glob("*"))
        del r
        gc.collect()
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
    err.seek(0)
    result["stderr"] = err.read()
    print(json.dumps(result), flush=True)
    shutil.rmtree(out)
"""


@pytest.fixture(scope="module")
def sweep(tiny, tmp_path_factory):
    """{case name: result} for every file kind a restore reads, cut at 0, half and all but
    one byte, plus one case with every file that no restore reads cut in half."""
    recipe, env, ref = tiny
    step_dir = ref / "checkpoints" / "24"
    cases = []
    for pattern in READ:
        (f,) = step_dir.glob(pattern)
        rel = str(f.relative_to(step_dir))
        cases += [{"name": f"{pattern.replace('/', '_').replace('*', 'x')}-{c}", "file": rel, "cuts": [[rel, c]]}
                  for c in cuts(f.stat().st_size)]
    read = {str(f.relative_to(step_dir)) for p in READ for f in step_dir.glob(p)}
    unread = sorted(str(f.relative_to(step_dir)) for f in step_dir.rglob("*") if f.is_file()
                    and str(f.relative_to(step_dir)) not in read)
    assert "state/_sharding" in unread and any(u.startswith("state/ocdbt.process_0/d/") for u in unread)
    cases.append({"name": "unread", "file": None,
                  "cuts": [[u, (step_dir / u).stat().st_size // 2] for u in unread]})
    work = tmp_path_factory.mktemp("sweep")
    (work / "cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))
    # `python -c SWEEP`, forked from a process that has imported jaxtune already (`_tiny_run.Warm`)
    proc = tr.shared_warm(tmp_path_factory).run(ref, work, work / "cases.jsonl", code=SWEEP, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert len(results) == len(cases)
    return ref, {c["name"]: (c, results[c["name"]]) for c in cases}


def test_every_file_a_restore_reads_cut_short_is_one_warning_and_a_fallback(sweep):
    for name, (case, r) in sweep[1].items():
        if case["file"] is None:
            continue
        culprit = f"/{case['name']}/checkpoints/24/{case['file']}"
        # eval / export / predict: one message naming the step, the file and the other steps; nothing moved
        for key in ("step", "latest"):
            msg = r[key]
            assert msg.startswith("checkpoint step 24 in ") and "cannot be restored (" in msg, (name, key, msg)
            assert culprit in msg and msg.endswith("; other checkpoints: 12, 22 (--step N)"), (name, key, msg)
        assert not r["moved_by_load"], name
        # resume: step 24 moved aside with one warning line naming the file, step 22 restored
        assert r["resumed"] == 22 and r["moved"] == ["24"], (name, r)
        lines = r["stderr"].splitlines()
        assert len(lines) == 1 and "checkpoint step 24 in " in lines[0] and culprit in lines[0], (name, r["stderr"][:3000])
        assert lines[0].endswith("; falling back to step 22") and "Traceback" not in r["stderr"], (name, lines[0])


def test_files_no_restore_reads_do_not_matter(sweep):
    case, r = sweep[1]["unread"]
    assert len(case["cuts"]) >= 5, case
    assert r["step"] == r["latest"] == "ok step 24", r
    assert r["resumed"] == 24 and r["same_bits"] and r["moved"] == [] and r["stderr"] == "", r


def test_resume_through_the_cli_with_every_file_of_the_newest_step_cut_short(tiny, tmp_path):
    """`jaxtune run` on a copy of a finished run whose step 24 has every file cut in half: one
    warning, step 24 moved aside, resumed from 22, and step 24 saved again with the same bits."""
    recipe, env, ref = tiny
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    for f in (out / "checkpoints" / "24").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    proc = tr.cli("run", recipe(out, name="cut-all"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    damaged = [line for line in proc.stderr.splitlines() if "cannot be restored" in line]
    assert len(damaged) == 1 and f"checkpoint step 24 in {out / 'checkpoints'} cannot be restored (" in damaged[0]
    assert f"{out / 'checkpoints' / '24'}/" in damaged[0] and damaged[0].endswith("falling back to step 22")
    assert "Traceback" not in proc.stderr and "JSONDecodeError" not in proc.stderr.replace(damaged[0], "")
    assert "resuming from step 22" in proc.stdout, proc.stdout
    assert [p.name.split("-")[0] for p in (out / "checkpoints.corrupt").iterdir()] == ["24"]
    a, b = state_arrays(ref / "checkpoints" / "24"), state_arrays(out / "checkpoints" / "24")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# A full disk during a save

# `jaxtune run`, with the process's file size limit (RLIMIT_FSIZE) lowered below a checkpoint's
# array file when step FULL_AT is saved (once the save before it is complete): its writes fail
# with EFBIG (SIGXFSZ ignored), as on a full disk. Smaller files (logs, metrics) still fit.
FULL_DISK_RUN = """
import resource, signal, sys
from jaxtune.checkpoint import Checkpoints
FULL_AT, LIMIT = int(sys.argv[2]), int(sys.argv[3])
real = Checkpoints.save
def save(self, step, *args, **kwargs):
    if step >= FULL_AT:
        self.wait()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return real(self, step, *args, **kwargs)
Checkpoints.save = save
from jaxtune.cli import entry
sys.argv = ["jaxtune", "run", sys.argv[1]]
entry()
"""


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_stops_with_one_line(
        tiny, tmp_path_factory, tmp_path):
    recipe, env, ref = tiny
    out = tmp_path / "full"
    limit = 20_000  # below the array file (~66 kB)
    # `python -c FULL_DISK_RUN`, forked from a process that has imported jaxtune (`_tiny_run.Warm`):
    # the file size limit is this process's own
    proc = tr.shared_warm(tmp_path_factory).run(recipe(out, name="full"), 8, limit, code=FULL_DISK_RUN, timeout=300)
    err = [line for line in proc.stderr.splitlines() if not line.startswith("WARNING:jaxtune:")]  # the new head
    assert proc.returncode == 1 and len(err) == 1, proc.stderr[-5000:]  # exit 1: the run stopped (2: bad input)
    assert err[0].startswith(f"error: could not save checkpoint step 8 in {out / 'checkpoints'} (")
    assert "File too large" in err[0] and "the newest complete checkpoint is step 6;" in err[0], err[0]
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 6], steps  # keep 2; step 8 never replaced them
    assert state_arrays(out / "checkpoints" / "6").keys() == state_arrays(ref / "checkpoints" / "24").keys()
