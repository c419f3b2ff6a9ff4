"""keep_host_memory(): XLA CPU's per-call temporaries stop costing fresh pages on every call."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from jaxtune import host_memory
from jaxtune.errors import JaxtuneError

# A jitted function whose (8192, 4096) f32 intermediate is a 128 MB temporary: more than glibc's
# largest mmap threshold (32 MB), so by default every call maps it afresh.
PROBE = """
import json, resource
from jaxtune.host_memory import keep_host_memory
kept = keep_host_memory()
import jax, jax.numpy as jnp
x, w, v = jnp.ones((8192, 256)), jnp.ones((256, 4096)) / 256, jnp.ones((4096, 8))
f = jax.jit(lambda x, w, v: (jnp.tanh(x @ w) @ v).sum())
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, w, v).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""
TEMP_PAGES = 8192 * 4096 * 4 // 4096


def probe(**env) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_kept_host_memory_makes_repeated_calls_fault_free():
    kept, default = probe(), probe(JAXTUNE_KEEP_HOST_MEMORY="0")
    assert kept["kept"] is True and default["kept"] is False
    # The premise: with glibc's defaults each call first-touches the whole temporary again.
    assert min(default["faults"][1:]) > 0.9 * TEMP_PAGES, default
    # Kept: after the first call the temporary's pages are reused (a few stray pages at most).
    assert max(kept["faults"][1:]) < 0.01 * TEMP_PAGES, kept


@pytest.mark.parametrize("env", [{"JAXTUNE_KEEP_HOST_MEMORY": "0"}, {"JAXTUNE_KEEP_HOST_MEMORY": "off"},
                                 {"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": "tpu,cpu"}])
def test_leaves_the_allocator_alone_when_opted_out_or_on_an_accelerator(monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert host_memory.keep_host_memory() is False  # returns before touching this process's malloc


def test_a_misspelt_switch_is_an_error_that_names_it(monkeypatch):
    monkeypatch.setenv("JAXTUNE_KEEP_HOST_MEMORY", "flase")
    with pytest.raises(JaxtuneError, match="JAXTUNE_KEEP_HOST_MEMORY='flase': expected 1 or 0"):
        host_memory.keep_host_memory()
    env = {**os.environ, "JAXTUNE_KEEP_HOST_MEMORY": "flase"}
    proc = subprocess.run([sys.executable, "-m", "jaxtune.cli", "ls"], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: JAXTUNE_KEEP_HOST_MEMORY='flase'"), proc.stderr


def test_the_console_script_keeps_host_memory_before_running_the_command(monkeypatch):
    from jaxtune import cli

    calls = []
    monkeypatch.setattr(host_memory, "keep_host_memory", lambda: calls.append("keep"))
    monkeypatch.setattr(cli, "main", lambda: calls.append("main"))
    cli.entry()
    assert calls == ["keep", "main"]
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["jaxtune"] == "jaxtune.cli:entry"
