"""Loading a Cloud Function's ``functions/<name>/main.py`` in-process (no emulators)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

FUNCTIONS_DIR = Path(__file__).resolve().parents[2] / "functions"


def load_function(name: str, module_prefix: str = "fn_") -> ModuleType:
    """A fresh module object for ``functions/<name>/main.py`` (its own RUNTIME, ROUTER ...)."""
    spec = importlib.util.spec_from_file_location(f"{module_prefix}{name}", FUNCTIONS_DIR / name / "main.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
