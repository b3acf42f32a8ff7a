"""Package faces that cost nothing to import.

Each package's ``__init__.py`` names its public API in ``__all__`` and maps each name to the module that
defines it; the module is imported on first use of the name (PEP 562 module ``__getattr__``). So
``from inference import ExpertWhisper`` works, while ``whisper-experts --help`` or ``import registry.packs``
load none of the model code.
"""

from __future__ import annotations

import importlib
import sys
from typing import Mapping


def lazy_attribute(package: str, exports: Mapping[str, str], name: str):
    """``package.name``, imported from ``exports[name]`` (a module path) and kept on the package."""
    if name not in exports:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(exports[name]), name)
    setattr(sys.modules[package], name, value)
    return value


def exports_of(modules: Mapping[str, str]) -> dict[str, str]:
    """``{"module": "name name ...", ...}`` -> ``{name: module}``."""
    return {name: module for module, names in modules.items() for name in names.split()}


def lazy_face(package: str, exports: Mapping[str, str]):
    """The ``__getattr__`` and ``__dir__`` of a package whose public names are ``exports`` (name -> module)."""

    def __getattr__(name: str):
        return lazy_attribute(package, exports, name)

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
