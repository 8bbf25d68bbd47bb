"""Which layer plays which role of a method, by default: a room of the plugin with no state.

A method's description (from the backend) lists its roles: images, edit maps and masks, one of
them the *target* (the image that is edited and whose canvas the result lands on). Here the
document's layers are matched to them the way a painter would expect (:func:`default_roles`);
the controller keeps the choices per document and method.
"""
from __future__ import annotations

from . import document as kdoc

SELECTION = "@selection"  # the mask role's value for "the current selection"


def _norm(text: str) -> str:
    return (str(text).lower().replace("\u2032", "'").replace("\u2019", "'").replace("prime", "'")
            .replace(" ", "").replace("_", "").replace("-", ""))


def target_role(desc: dict) -> str:
    """The edited image's role: the method's ``target_role``, else its last required image."""
    if desc.get("target_role"):
        return desc["target_role"]
    req = [r for r in desc.get("roles", []) if r.get("kind") == "image" and r.get("required")]
    return req[-1]["name"] if req else ""


def selection_roles(desc: dict) -> set[str]:
    """The mask roles that may take the current selection: those placed on the edited
    image (a selection is a region of the canvas, not of another role's image)."""
    target = target_role(desc)
    return {r["name"] for r in desc.get("roles", [])
            if r.get("kind") == "mask" and r.get("canvas") == target}


def multiple_image_role(desc: dict) -> dict | None:
    """The image role that takes several layers (PIXELS' exemplars), if any."""
    return next((r for r in desc.get("roles", []) if r.get("kind") == "image" and r.get("multiple")), None)


def default_roles(desc: dict, doc, results: set[str] | list[str]) -> dict[str, list[str]]:
    """Sensible picks: a layer named like the role; the active layer as the target; the
    nearest layers above it for the other required images (never the background or a
    layer below the target, never an edit map or an earlier result); the nearest edit
    map above the target; the selection as the mask of the edited image only. ``results``:
    the ids of earlier results in the document."""
    out: dict[str, list[str]] = {}
    layers = kdoc.pickable_layers(doc)  # top first
    images = [n for n in layers if not kdoc.is_edit_map(n)]
    roles = desc.get("roles", [])
    target_name = target_role(desc)
    used: set[str] = set()
    for r in roles:
        if r.get("kind") != "image":
            continue
        keys = {_norm(r.get("name", "")), _norm(r.get("title", ""))}
        for n in images:
            if _norm(n.name()) in keys and kdoc.layer_id(n) not in used:
                out[r["name"]] = [kdoc.layer_id(n)]
                used.add(kdoc.layer_id(n))
                break
    active = doc.activeNode()
    target = None
    if target_name and target_name not in out:
        if active is not None and kdoc.layer_id(active) not in used and not kdoc.is_edit_map(active) \
                and any(kdoc.layer_id(active) == kdoc.layer_id(n) for n in images):
            target = active
        else:
            target = next((n for n in reversed(images) if kdoc.layer_id(n) not in used
                           and n.visible()), None)
        if target is not None:
            out[target_name] = [kdoc.layer_id(target)]
            used.add(kdoc.layer_id(target))
    elif target_name in out:
        target = kdoc.find_layer(doc, out[target_name][0])
    order = [kdoc.layer_id(n) for n in images]
    tpos = order.index(kdoc.layer_id(target)) if target is not None else 0
    above = [i for i in reversed(order[:tpos]) if i not in results]  # nearest first
    for r in roles:
        name = r["name"]
        if r.get("kind") != "image" or name in out or not r.get("required"):
            continue
        pick = next((i for i in above if i not in used), None)
        if pick is not None:
            out[name] = [pick]
            used.add(pick)
    sel_roles = selection_roles(desc)
    for r in roles:
        if r.get("kind") == "map" and r["name"] not in out:
            maps = [n for n in layers if kdoc.is_edit_map(n)]
            above_map = None
            if target is not None:
                all_ids = [kdoc.layer_id(n) for n in layers]
                t = all_ids.index(kdoc.layer_id(target)) if kdoc.layer_id(target) in all_ids else 0
                above_map = next((n for n in reversed(layers[:t]) if kdoc.is_edit_map(n)), None)
            pick = above_map or (maps[0] if maps else None)
            out[r["name"]] = [kdoc.layer_id(pick)] if pick is not None else []
        elif r.get("kind") == "mask" and r["name"] not in out:
            out[r["name"]] = [SELECTION] if r["name"] in sel_roles else []
    for r in roles:
        out.setdefault(r["name"], [])
    return out
