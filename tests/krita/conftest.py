"""The plugin package for the tests here that read its modules in this process (run alone,
``pytest tests/krita``, as well as in the whole suite)."""
import sys
from pathlib import Path

PLUGIN = str(Path(__file__).resolve().parent.parent.parent / "plugin")
if PLUGIN not in sys.path:
    sys.path.insert(0, PLUGIN)
