"""A stand-in for `torchvision`, used only while `timm` is imported, and only when the real
torchvision cannot be imported.

Why it exists: timm (the reference for jaxtune's timm ResNet / VGG tests) imports torchvision at
import time, for its data transforms and datasets and for `FrozenBatchNorm2d`; the ResNet and VGG
forward passes, `timm.create_model` and timm's folder saving and loading use none of it. This
machine's torch is the CPU build, and PyPI's torchvision wheel is a CUDA build that fails to
import beside it ("operator torchvision::nms does not exist"), so timm is installed with
`pip install --no-deps timm` and no torchvision. While `torchvision_stand_in()` is active, a
meta-path finder serves every `torchvision.*` module as an empty module whose attributes are
dummy classes; when it exits, the finder and those modules are removed again, so that no other
test (or transformers' optional-dependency checks) ever sees a fake torchvision. timm stays
imported, holding the dummies it bound (which the tested code paths never call).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import sys
import types


class _Dummy(type):
    """A class whose every attribute is another dummy class (`transforms.InterpolationMode.BICUBIC`)."""

    def __getattr__(cls, name):
        return _Dummy(name, (), {})


class _StandInModule(types.ModuleType):
    __path__: list = []  # a package: `torchvision.ops.misc` imports too

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Dummy(name, (), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StandInModule(spec.name)

    def exec_module(self, module):
        pass


def _torchvision_modules() -> list[str]:
    return [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]


def real_torchvision_importable() -> bool:
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # absent, or a build that does not fit this torch
        for name in _torchvision_modules():  # what a failed import left half-initialised
            del sys.modules[name]
        return False


@contextlib.contextmanager
def torchvision_stand_in():
    """Serve a stand-in torchvision inside the block, unless the real one imports."""
    if real_torchvision_importable():
        yield
        return
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in _torchvision_modules():
            if isinstance(sys.modules[name], _StandInModule):
                del sys.modules[name]
