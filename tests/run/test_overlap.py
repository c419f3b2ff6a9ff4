"""On one device the loop queues step n+1 before reading step n; the run is the same, bit for bit,
as one that reads every step first (`JAXTUNE_OVERLAP_STEPS=0`). Processes of the CLI, forked from one
that has imported jaxtune already (`_tiny_run.Warm`)."""

from __future__ import annotations

import os

import _tiny_run as tr
from jaxtune.runlog import TIMING_KEYS, read_metrics

ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def steady(lines):
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in lines]


def test_overlapped_steps_give_the_same_run_bit_for_bit(tmp_path_factory, tmp_path):
    recipe, _ = tr.shared_assets(tmp_path_factory)  # and the session's JAX compilation cache
    warm = tr.shared_warm(tmp_path_factory)  # `jaxtune` processes forked from one with jaxtune imported
    outs = {}
    for overlap in ("1", "0"):
        out = tmp_path / f"overlap-{overlap}"
        # checkpoints only at evaluations, so most steps are queued behind the previous one
        path = recipe(out, name=out.name, checkpoint={"keep": 2, "keep_best": 1})
        proc = warm.run("run", path, env={**ONE_DEVICE, "JAXTUNE_OVERLAP_STEPS": overlap})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "on 1 cpu device(s)" in proc.stdout
        outs[overlap] = out
    a, b = outs["1"], outs["0"]
    assert (a / "export" / "model.safetensors").read_bytes() == (b / "export" / "model.safetensors").read_bytes()
    ma, mb = steady(read_metrics(a)), steady(read_metrics(b))
    assert ma == mb and len([m for m in ma if m["split"] == "validation"]) == 4


def test_overlap_is_on_for_one_cpu_device_off_for_several_and_the_switch_is_checked(tmp_path_factory):
    code = "from jaxtune.run.loop import can_overlap_steps; print(can_overlap_steps())"
    warm = tr.shared_warm(tmp_path_factory)  # each `python -c CODE` forked from it: its own backend
    assert "JAXTUNE_OVERLAP_STEPS" not in os.environ and "JAXTUNE_OVERLAP_STEPS" not in warm.env

    def ask(**extra):
        return warm.run(code=code, env=extra, timeout=120)

    assert ask(**ONE_DEVICE).stdout.strip() == "True"
    assert ask().stdout.strip() == "False"  # the test session's 8 CPU devices
    assert ask(**ONE_DEVICE, JAXTUNE_OVERLAP_STEPS="0").stdout.strip() == "False"
    bad = ask(**ONE_DEVICE, JAXTUNE_OVERLAP_STEPS="yes")
    assert bad.returncode != 0 and "JAXTUNE_OVERLAP_STEPS='yes': use 0" in bad.stderr
