"""Which models the docker offers, and the choice remembered per method.

The backend's ``/v1/models`` lists its embedded models and every checkpoint it found (with
family, size, location and the methods that can use it). A painter is offered the
checkpoints a method can use, then *demo (toy world)*; the random-weight ``tiny-*`` models are
developer options (shown only with *Show developer models*). The choice is remembered per
method (setting ``model_by_method``); a method without one gets the backend's recommendation
(a checkpoint of the paper's family when there is one), else the demo.
"""
from __future__ import annotations

import json
from typing import Any

from ..qt import Qt, QtWidgets

DEMO = "toy-sd"


def _size(n: int | None) -> str:
    if not n:
        return ""
    for unit, div in (("GB", 1024**3), ("MB", 1024**2)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def offered(models: list[dict[str, Any]], method_id: str, show_developer: bool = False) -> list[dict[str, Any]]:
    """The models to list for a method, in order: usable checkpoints, the demo, then (greyed)
    the ones this method cannot use; developer models only on request."""
    usable, demo, other, dev = [], [], [], []
    for m in models:
        if m.get("developer"):
            if show_developer:
                dev.append(m)
            continue
        methods = m.get("methods")
        ok = methods is None or not method_id or method_id in methods
        if m.get("id") == DEMO:
            demo.append(m)
        elif ok:
            usable.append(m)
        else:
            other.append(m)
    return usable + demo + other + dev


def usable(model: dict[str, Any], method_id: str) -> bool:
    methods = model.get("methods")
    return methods is None or not method_id or method_id in methods


def label(m: dict[str, Any]) -> str:
    """"dreamshaper — SD 1.x, 2.0 GB, ComfyUI"."""
    if m.get("source") == "embedded":
        return m.get("label") or m["id"]
    bits = [m.get("label") or m.get("family") or "", _size(m.get("size_bytes")), m.get("location", "")]
    return f"{m.get('name') or m['id']} \u2014 " + ", ".join(b for b in bits if b)


def tooltip(m: dict[str, Any], method_id: str) -> str:
    lines = [m["id"]]
    if m.get("note"):
        lines.append(m["note"])
    if not usable(m, method_id):
        lines.append(f"The {method_id} method cannot use this model.")
    return "\n".join(lines)


def remembered(settings, method_id: str) -> str:
    try:
        table = json.loads(settings.get("model_by_method", "") or "{}")
    except ValueError:
        table = {}
    return str(table.get(method_id, "")) if isinstance(table, dict) else ""


def remember(settings, method_id: str, model: str) -> None:
    try:
        table = json.loads(settings.get("model_by_method", "") or "{}")
    except ValueError:
        table = {}
    if not isinstance(table, dict):
        table = {}
    table[method_id] = model
    settings.set("model_by_method", json.dumps(table, sort_keys=True))


SMALL_GPU_BYTES = 6.5e9  # "6 GB" cards report a little less or more


def small_machine(health: dict[str, Any] | None) -> str:
    """Why this machine wants the SD 1.x family ("" when it does not): the backend runs on the
    CPU, or on a GPU with at most about 6 GB (``GET /v1/health``)."""
    health = health or {}
    device = str(health.get("device", ""))
    if device.startswith("cpu"):
        return "the backend runs on the CPU"
    total = (health.get("memory") or {}).get("gpu_total_bytes")
    if device.startswith(("cuda", "mps")) and total and total <= SMALL_GPU_BYTES:
        return f"the GPU has {total / 2**30:.0f} GB"
    return ""


def _light(models: list[dict[str, Any]], method_id: str) -> dict[str, Any] | None:
    """The first checkpoint of the SD 1.x family that the method can use."""
    return next((m for m in models if m.get("family") == "sd1" and m.get("source") != "embedded"
                 and not m.get("developer") and m.get("methods") and usable(m, method_id)), None)


def choose(models: list[dict[str, Any]], method_id: str, remembered_id: str,
           recommended: dict[str, str | None] | None = None, health: dict[str, Any] | None = None) -> str:
    """The model for a method: the remembered one (a path or id the backend may not list,
    e.g. typed in, is kept as it is), else the recommendation — on a small machine (CPU, a GPU
    of at most 6 GB) a checkpoint of the SD 1.x family when there is one —, else the demo,
    else ""."""
    if remembered_id:
        return remembered_id
    rec = (recommended or {}).get(method_id)
    if small_machine(health):
        light = _light(models, method_id)
        family = next((m.get("family") for m in models if m.get("id") == rec), None)
        if light is not None and family != "sd1":
            return light["id"]
    if rec:
        return rec
    if any(m.get("id") == DEMO for m in models):
        return DEMO
    return ""


def for_method(models: list[dict[str, Any]], method_id: str, settings, info: dict[str, Any],
               health: dict[str, Any] | None) -> str:
    """What a method gets when the painter switches to it (see :func:`choose`)."""
    return choose(models, method_id, remembered(settings, method_id), info.get("recommended"), health)


def why_chosen(models: list[dict[str, Any]], method_id: str, model_id: str, settings,
               info: dict[str, Any], health: dict[str, Any] | None) -> str:
    """A line under the model when the docker chose an SD 1.x checkpoint for this machine
    instead of the backend's recommendation ("" otherwise)."""
    why = small_machine(health)
    rec = (info.get("recommended") or {}).get(method_id)
    if not why or not rec or rec == model_id or remembered(settings, method_id):
        return ""
    chosen = next((m for m in models if m.get("id") == model_id), None)
    if chosen is None or chosen.get("family") != "sd1":
        return ""
    return (f"{chosen.get('name') or model_id} (SD 1.x) is chosen because {why}: larger models (SDXL, "
            "SD 2.x) would be slow here and may not fit in memory. Pick another to override.")


def help_text(models: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """What to do when there is no checkpoint to offer (empty when there is one)."""
    real = [m for m in models if not m.get("developer") and m.get("source") != "embedded" and m.get("methods")]
    if real:
        return ""
    where = info.get("models_dir") or "the Analogon models folder"
    return ("No Stable Diffusion checkpoint found. Put a .safetensors checkpoint (SD 1.5, SD 2.1 or "
            f"SDXL) into {where}, or add the folder where you keep them in the settings (\u2699 \u25b8 "
            "Models); ComfyUI, Automatic1111 / Forge and Krita AI Diffusion folders are found by "
            "themselves. Or \u2699 \u25b8 Models \u25b8 \u201cGet a model\u201d. Until then, \u201cdemo (toy world)\u201d "
            "shows how the methods work on the toy world.")


def fill_combo(combo: "QtWidgets.QComboBox", models: list[dict[str, Any]], method_id: str, current: str,
               show_developer: bool = False) -> None:
    """Fill an (editable) combo: item data is the model id; models this method cannot use are
    listed but not selectable."""
    combo.blockSignals(True)
    try:
        combo.clear()
        for m in offered(models, method_id, show_developer):
            combo.addItem(label(m), m["id"])
            i = combo.count() - 1
            combo.setItemData(i, tooltip(m, method_id), Qt.ItemDataRole.ToolTipRole)
            if not usable(m, method_id):
                item = combo.model().item(i) if hasattr(combo.model(), "item") else None
                if item is not None:
                    item.setEnabled(False)
        i = combo.findData(current)
        if i >= 0:
            combo.setCurrentIndex(i)
        else:
            combo.setEditText(current)
    finally:
        combo.blockSignals(False)
