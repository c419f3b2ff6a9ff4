"""SIGTERM / SIGINT during a run: finish the current step, save a checkpoint, return (exit 0).

A second SIGINT aborts at once. With several JAX processes the stop step is agreed through JAX's
preemption sync point (`multihost_utils.reached_preemption_sync_point`), so all hosts save the same
step; there SIGINT is turned into the SIGTERM that JAX's preemption notifier listens to.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

from jax.experimental import multihost_utils


class StopSignal:
    """SIGTERM / SIGINT -> stop after the current step. With several processes, JAX's preemption
    sync point decides the step (all hosts stop and save together)."""

    def __init__(self, multihost: bool):
        self.multihost = multihost
        self.received: Optional[str] = None
        self._old = {}
        signals = [signal.SIGINT] if multihost else [signal.SIGTERM, signal.SIGINT]
        for sig in signals:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, no graceful stop
                pass

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.multihost:  # JAX's notifier listens to SIGTERM; let it agree on a step
            self.received = name
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if self.received == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.received is None:
            print(f"\n{name}: finishing this step, then saving a checkpoint"
                  + (" (Ctrl-C again to abort)" if signum == signal.SIGINT else ""), flush=True)
        self.received = self.received or name

    def should_stop(self, step: int) -> bool:
        if self.multihost:
            if multihost_utils.reached_preemption_sync_point(step):
                self.received = self.received or "SIGTERM"
                return True
            return False
        return self.received is not None

    def close(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


__all__ = ["StopSignal"]
