"""The method registry. Each method is one module that reads like its paper."""
from __future__ import annotations

import importlib
import logging
import threading

from .base import Method

_REGISTRY: dict[str, Method] = {}
# The built-in methods, imported on first use of the registry.
BUILTIN = ("pixels", "appearance", "dia", "difference")
_loaded = False
_loading = threading.RLock()  # the server asks from several threads at its start
# Built-in modules that could not be imported: name -> reason (shown by `analogon doctor`).
UNAVAILABLE: dict[str, str] = {}


def register(method: Method) -> Method:
    _REGISTRY[method.id] = method
    return method


def unregister(method_id: str) -> None:
    _REGISTRY.pop(method_id, None)


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    with _loading:  # a second caller waits for the whole registry, never sees half of it
        if not _loaded:
            _import_builtins()
            _loaded = True


def _import_builtins() -> None:
    for name in BUILTIN:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                UNAVAILABLE[name] = "not installed"
                logging.getLogger(__name__).warning("built-in method %r is not available", name)
            else:  # the module exists but needs something missing
                UNAVAILABLE[name] = f"cannot import {e.name}"
                logging.getLogger(__name__).exception("built-in method %r failed to import", name)
        except Exception as e:  # a broken method must not take the others down
            UNAVAILABLE[name] = f"{type(e).__name__}: {e}"
            logging.getLogger(__name__).exception("built-in method %r failed to import", name)


def get(method_id: str) -> Method:
    _load_builtins()
    try:
        return _REGISTRY[method_id]
    except KeyError:
        from ..errors import AnalogonError

        raise AnalogonError(
            "unknown_method", f"No method called {method_id!r}.",
            {"available": sorted(_REGISTRY)}, status=404,
        ) from None


def all_methods() -> list[Method]:
    _load_builtins()
    order = {m: i for i, m in enumerate(BUILTIN)}
    return sorted(_REGISTRY.values(), key=lambda m: (order.get(m.id, 99), m.id))
