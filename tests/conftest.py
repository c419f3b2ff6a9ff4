"""Test session setup: 8 fake CPU devices (and quick XLA compilation) for every test, set before jax is imported."""

import os

FAKE_DEVICES = "--xla_force_host_platform_device_count=8"
# LLVM's -O0 for XLA's CPU code: the test programs are tiny, so compiling them is most of their
# time (tests/models/test_llama.py: 31 s instead of 39 s). Bit-identity tests compare runs made
# under the same flags; parity tests hold their tolerances either way. Subprocesses inherit it
# with the rest of XLA_FLAGS (users' runs keep XLA's default, -O2).
FAST_COMPILE = "--xla_backend_optimization_level=0"
# Idempotent: pytest-xdist's workers inherit the controller's environment, where this already ran.
for flag in (FAKE_DEVICES, FAST_COMPILE):
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may download anything
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
