"""Analogon for Krita: example-based image editing from layers (docker "Analogon").

Loaded by Krita's Python plugin manager; outside Krita (tests, tools) importing the package
registers nothing.
"""
import os as _os

__version__ = "0.1.0"

try:
    import krita as _krita
except ImportError:
    _krita = None

if _krita is not None and hasattr(_krita, "DockWidgetFactory") and not _os.environ.get("ANALOGON_NO_REGISTER"):
    from .extension import register as _register

    _register()
