"""Keep freed host memory mapped so that XLA on the CPU reuses it from step to step.

Why: XLA's CPU runtime allocates all of a step's temporaries as one block (1.5 GB for a MiniLM
train step at batch 32, sequence 128) and frees it when the step ends. glibc serves any block
over 32 MB with a fresh `mmap` and unmaps it on free, so every step first-touches 1.5 GB of new
pages: ~370k page faults and ~0.8 s of kernel time per step (~17% of its CPU time on 2 cores).
glibc's documented knobs fix it (`man mallopt`): one arena, so that XLA's worker threads allocate
from the main heap (other arenas cannot grow past 64 MB and fall back to `mmap`), no `mmap` for
large blocks, and no trimming of the heap's free top. The cost is resident memory: the process
keeps its high-water mark of host memory instead of returning freed blocks to the system.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform

from jaxtune.errors import JaxtuneError

OPT_OUT = "JAXTUNE_KEEP_HOST_MEMORY"  # set to 0 to leave glibc's defaults alone
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

kept = False  # whether keep_host_memory() switched the allocator in this process


def _jax_runs_on_cpu() -> bool:
    """True unless JAX_PLATFORMS or an installed accelerator plugin points JAX elsewhere."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return importlib.util.find_spec("jax_plugins") is None and importlib.util.find_spec("libtpu") is None


def keep_host_memory() -> bool:
    """Switch glibc's allocator to keep freed memory for reuse; True if it was switched.

    Call it first thing in the process, before JAX runs anything: JAX's CPU worker threads start
    then, and a thread that already allocated keeps its own arena. Does nothing (returns False)
    off glibc, when JAX will run on an accelerator, or when JAXTUNE_KEEP_HOST_MEMORY=0.
    """
    switch = os.environ.get(OPT_OUT, "1").strip().lower()
    if switch not in _ON + _OFF:
        raise JaxtuneError(f"{OPT_OUT}={os.environ[OPT_OUT]!r}: expected 1 or 0 (true/false, yes/no, on/off)")
    if switch in _OFF:
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or not _jax_runs_on_cpu():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1 disables trimming ("Setting M_TRIM_THRESHOLD to -1 disables trimming completely").
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    global kept
    kept = all(mallopt(param, value) == 1 for param, value in settings)
    return kept
