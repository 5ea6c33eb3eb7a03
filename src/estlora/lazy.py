"""torch, imported on first use: the families' facts, the settings and the command line's parser are
read by `estlora --help` and by every command before any tensor exists, and importing torch costs a
second or more on small machines. A module that needs torch only inside its functions takes this
stand-in, whose first attribute access imports the real module (once; later accesses are a dict
lookup)."""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """A module imported at its first attribute access."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str):
        module: ModuleType = importlib.import_module(self._name)
        return getattr(module, attribute)


torch = LazyModule("torch")
