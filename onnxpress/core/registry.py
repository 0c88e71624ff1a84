"""One registry of passes keyed by kebab-case name, filled by @register_pass.

Built-in passes live in ``onnxpress.passes`` and are imported on first lookup; user passes
arrive from a plugin file (``--plugin my_passes.py``) or the ``onnxpress.passes``
entry-point group. Registering a name twice is an error.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from onnxpress.core.errors import PluginError
from onnxpress.core.pass_base import Pass

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "onnxpress.passes"
_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

_PASSES: dict[str, type[Pass[Any]]] = {}
_loaded_builtins = False
_loaded_entry_points = False
_loaded_files: dict[Path, list[str]] = {}

PassT = TypeVar("PassT", bound=type)


def register_pass(name: str) -> Callable[[PassT], PassT]:
    """Class decorator: register a Pass subclass under a kebab-case ``name``."""

    def decorate(cls: PassT) -> PassT:
        _register(name, cls)
        return cls

    return decorate


def _register(name: str, cls: Any) -> None:
    if not _NAME_RE.match(name):
        raise PluginError(f"pass name '{name}' is not kebab-case (e.g. 'fold-batchnorm')")
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise PluginError(f"'{name}': {cls!r} is not a subclass of onnxpress.Pass")
    options_type = cls.options_type
    if not dataclasses.is_dataclass(options_type):
        raise PluginError(f"pass '{name}': options_type must be a dataclass")
    params = getattr(options_type, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise PluginError(f"pass '{name}': options_type {options_type.__name__} must be frozen")
    existing = _PASSES.get(name)
    if existing is not None and existing is not cls:
        where = f"{existing.__module__}.{existing.__qualname__}"
        raise PluginError(f"pass '{name}' is already registered by {where}")
    cls.name = name
    _PASSES[name] = cls


def load_builtins() -> None:
    global _loaded_builtins
    if not _loaded_builtins:
        _loaded_builtins = True
        importlib.import_module("onnxpress.passes")


def load_entry_points() -> None:
    """Import every module advertised in the ``onnxpress.passes`` entry-point group."""
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except (Exception, SystemExit) as exc:
            raise PluginError(
                f"entry point '{ep.name}' ({ep.value}) failed to load: {exc}"
            ) from exc
        if isinstance(obj, type) and issubclass(obj, Pass) and obj.name not in _PASSES:
            _register(ep.name, obj)
        logger.debug("loaded pass plugin entry point %s = %s", ep.name, ep.value)


def load_plugin_file(path: str | Path) -> list[str]:
    """Execute a Python file that registers passes; return the names it added."""
    file = Path(path)
    if not file.is_file():
        raise PluginError(
            f"{file}: plugin file not found"
            if not file.exists()
            else f"{file}: plugin is not a file"
        )
    key = file.resolve()
    if key in _loaded_files:
        return list(_loaded_files[key])
    before = set(_PASSES)
    module_name = f"onnxpress_plugin_{re.sub(r'[^0-9a-zA-Z_]', '_', file.stem)}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise PluginError(f"{file}: not a loadable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except PluginError as exc:
        raise PluginError(f"{file}: {exc}") from exc
    except SystemExit as exc:
        sys.modules.pop(module_name, None)
        raise PluginError(f"{file}: plugin called sys.exit({exc.code!r}) while loading") from None
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise PluginError(f"{file}: plugin raised {type(exc).__name__}: {exc}") from exc
    added = sorted(set(_PASSES) - before)
    _loaded_files[key] = added
    logger.debug("plugin %s registered %s", file, added)
    return added


def get_pass(name: str) -> type[Pass[Any]]:
    load_builtins()
    if name not in _PASSES:
        load_entry_points()
    try:
        return _PASSES[name]
    except KeyError:
        from difflib import get_close_matches

        hint = get_close_matches(name, list(_PASSES), n=1)
        suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise PluginError(f"unknown pass '{name}'{suffix}") from None


def all_passes() -> dict[str, type[Pass[Any]]]:
    load_builtins()
    load_entry_points()
    return dict(sorted(_PASSES.items()))


def unregister(name: str) -> None:
    """Remove a pass; meant for tests that register throwaway passes."""
    _PASSES.pop(name, None)
