"""Resolve a user's import path: ``package.module:attr`` or ``path/to/file.py:attr``."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from slimdeploy.errors import InputError


def is_import_path(spec: object) -> bool:
    """True for ``module:attr`` and ``file.py:attr`` (not for ``torchvision:<builder>``)."""
    return isinstance(spec, str) and ":" in spec and not spec.startswith("torchvision:")


def resolve(spec: str, what: str) -> Any:
    """The callable ``spec`` names; ``what`` (e.g. ``model.name``) starts every one-line error."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise InputError(f"{what}: {spec!r} is not an import path; expected package.module:factory "
                         f"or path/to/file.py:factory")
    module = _load_file(target, what) if target.endswith(".py") else _import(target, spec, what)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{what}: {target} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{what}: {spec} is a {type(obj).__name__}, not a callable")
    return obj


def _import(name: str, spec: str, what: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise InputError(f"{what}: cannot import {name!r} for {spec!r} ({err})") from None
    except Exception as err:
        raise InputError(f"{what}: importing {name!r} raised {type(err).__name__}: {err}") from None


def _load_file(path: str, what: str):
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise InputError(f"{what}: file not found: {path}")
    name = f"slimdeploy_user_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # so classes defined there pickle/deepcopy by reference
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise InputError(f"{what}: running {path} raised {type(err).__name__}: {err}") from None
    return module
