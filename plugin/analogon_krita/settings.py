"""The plugin's settings, kept in Krita's own settings (kritarc, group "analogon")."""
from __future__ import annotations

import json
from typing import Any

GROUP = "analogon"

DEFAULTS = {
    "backend_command": "",  # empty: `analogon` on PATH or a usual virtual environment
    "backend_url": "",  # empty: the url in server.json, else http://127.0.0.1:7871
    "state_dir": "",  # where an external backend writes server.json (empty: the default)
    "autostart": "false",
    # a backend on another machine (link/remote.py): the address, the painter's token, and the TLS
    # certificate trusted for each address (JSON: {"https://host:port": "AB:CD:..."})
    "connection": "local",  # or "remote"
    "remote_url": "",
    "remote_token": "",
    "pinned_certificates": "{}",
    "model": "",
    "method": "",
    "seed": "0",
    "random_seed": "true",
    "padding": "32",
    "feather": "8",
    "image_format": "rgba",  # before upload_format: only its "png" is still read (remote.upload_format)
    "upload_format": "",  # auto, rgba, deflate, png; empty: auto (raw here, the smallest remotely)
    "progressive": "false",
    "model_by_method": "{}",  # the model last chosen for each method (models_ui)
    "folded": "[]",  # the docker's sections the painter folded (layers, parameters)
    "method_help": "false",  # the method's description shown under it
    # what the docker passes to the backend it starts (backend_options)
    "memory_preset": "auto",
    "device": "",
    "dtype": "",
    "cpu_offload": "false",
    "vae_tiling": "false",
    "max_pixels": "0",
    "model_folders": "[]",
    "show_developer_models": "false",
}


def _app():
    try:
        from krita import Krita

        return Krita.instance()
    except Exception:  # outside Krita (command line tools)
        return None


class Settings:
    def __init__(self, app: Any = None):
        self.app = app if app is not None else _app()
        self._memory: dict[str, str] = {}

    def get(self, key: str, default: str | None = None) -> str:
        if default is None:
            default = DEFAULTS.get(key, "")
        if self.app is None:
            return self._memory.get(key, default)
        value = self.app.readSetting(GROUP, key, default)
        return default if value is None else str(value)

    def set(self, key: str, value: Any) -> None:
        if isinstance(value, bool):
            value = "true" if value else "false"
        if self.app is None:
            self._memory[key] = str(value)
        else:
            self.app.writeSetting(GROUP, key, str(value))

    def get_bool(self, key: str) -> bool:
        return self.get(key).strip().lower() in ("1", "true", "yes", "on")

    def get_int(self, key: str) -> int:
        try:
            return int(float(self.get(key)))
        except ValueError:
            return int(float(DEFAULTS.get(key, "0") or 0))

    def get_json(self, key: str, default: Any = None) -> Any:
        raw = self.get(key, "")
        if not raw:
            return default
        try:
            return json.loads(raw)
        except ValueError:
            return default

    def set_json(self, key: str, value: Any) -> None:
        self.set(key, json.dumps(value, sort_keys=True))
