"""Running a recipe: assemble (`build`), open a session (`open_session`), loop (`train`).

    from jaxtune.run import run
    summary = run(load_recipe("quickstart", ["train.steps=20"]))

Modules, in the order a run uses them: `folder` (the run folder's files, shared with `jaxtune
eval/export/predict`), `build` (recipe -> Run: plan, data, model, task, optimizer, abstract
state; no printing), `session` (restore or create the state, say what will happen), `progress`
(the checkpointed bookkeeping and its pure updates), `actions` (log, evaluate, checkpoint,
finish), `signals` (SIGTERM / SIGINT), `loop` (the loop itself).
"""

from jaxtune.run.actions import NAN_ENV, NonFiniteLoss
from jaxtune.run.build import Run, build
from jaxtune.run.loop import run, train
from jaxtune.run.session import Session, open_session

__all__ = ["NAN_ENV", "NonFiniteLoss", "Run", "Session", "build", "open_session", "run", "train"]
