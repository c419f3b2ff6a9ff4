"""SIGTERM / SIGINT during a run: finish the current step, save a checkpoint, return (exit 0).

Before the loop (while the data and the model load) `jaxtune run` has its own handler
(`jaxtune.cli.stop_during_startup`): it stops at once, as there is nothing to save. The loop's
handlers replace it and, when the loop is over, put back the handlers that were there before it
(a handler that carries `replaced`, a dict signal -> handler, hands those back).

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
                old = signal.signal(sig, self._handle)
                self._old[sig] = getattr(old, "replaced", {}).get(sig, old)  # start-up is over
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
