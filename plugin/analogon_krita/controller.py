"""The panel's brain, without widgets: observable state plus the work (read layers, run jobs,
insert results, variants, history, sequences). The link to the backend (where it is, starting
it, what it offers) is :mod:`link.connection`; history is :mod:`document.session`; which
layers play which role by default is :mod:`document.roles`; which variant a result group shows
is :mod:`document.variants`.

The docker binds widgets to this object; the tests drive it directly, in a fake Krita and in
the real one.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

from .document import document as kdoc
from .document import imaging
from .document import roles as roles_mod
from .document.canvas_preview import CanvasPreview
from .document.document import AdapterError, Rect
from .document.map_visibility import MapHider
from .document.roles import SELECTION
from .document.session import Pass, Session
from .document.variants import Variant, VariantResult, follow_name, shown
from .link import backend_options, remote
from .link.backend_process import ServerInfo
from .link.client import ImagePayload, ImageRef, JobResult, JobRunner, JobSpec
from .link.connection import Connection
from .qt import QObject, pyqtSignal
from .settings import Settings
from .ui import models_ui
from .ui.forms import Field, FormError, coerce_all, fields_from_schema

MAX_SEED = 2**31 - 1


@dataclass
class PreparedPass:
    spec: JobSpec
    doc: Any
    target: Any  # the node the result goes above (the source, or its latest result)
    roi: Rect
    from_selection: bool
    mask: bytes | None
    roles: dict[str, list[str]]
    index: int = 0
    count: int = 1
    source: Any = None  # the source layer itself (its opacity is the result's)
    stack: list = field(default_factory=list)  # results above the source that it is read with
    used: list = field(default_factory=list)  # every layer the pass reads
    maps: list = field(default_factory=list)  # the edit maps it reads


def _closed(doc) -> bool:
    """Whether Krita closed ``doc``: a closed document's object lives on without a root node."""
    try:
        return doc.rootNode() is None
    except RuntimeError:  # the C++ object is gone
        return True


def _linked(name: str) -> property:
    """A Controller attribute that is the link's (connection.Connection) ``name``."""
    return property(lambda self: getattr(self.link, name), lambda self, v: setattr(self.link, name, v))


def _thumbnail(rgba: bytes, w: int, h: int, size: int = 96):
    return imaging.thumbnail(rgba, w, h, size)


class Controller(QObject):
    connectionChanged = pyqtSignal(str, str)  # state, message
    methodsChanged = pyqtSignal()
    modelsChanged = pyqtSignal()
    modelVariantChanged = pyqtSignal()  # the chosen model is of another variant: other fields
    methodChanged = pyqtSignal(str)
    paramsChanged = pyqtSignal(str)  # method id whose values changed outside the form
    rolesChanged = pyqtSignal()
    layersChanged = pyqtSignal()
    documentChanged = pyqtSignal()
    busyChanged = pyqtSignal(bool)
    progressChanged = pyqtSignal(str, int, int)  # stage, step, total (-1 unknown)
    previewChanged = pyqtSignal(object)
    errorChanged = pyqtSignal(str)
    messageChanged = pyqtSignal(str)
    historyChanged = pyqtSignal()
    variantsChanged = pyqtSignal()  # the variants of the latest result, or which one is picked
    resultAdded = pyqtSignal(object)  # Pass
    finished = pyqtSignal(str)  # "done" | "error" | "cancelled"

    _instance: "Controller | None" = None

    @classmethod
    def instance(cls) -> "Controller":
        if cls._instance is None:
            cls._instance = Controller()
        return cls._instance

    def __init__(self, settings: Settings | None = None, app: Any = None, parent: QObject | None = None):
        super().__init__(parent)
        self.settings = settings or Settings(app)
        self.app = app if app is not None else self.settings.app
        self.link = Connection(self.settings, self, idle=lambda: not self.busy)
        self.link.stateChanged.connect(self.connectionChanged)
        self.link.methodsLoaded.connect(self._on_methods_loaded)
        self.link.modelsLoaded.connect(self._on_models_loaded)
        self.model = self.settings.get("model")
        self.method_id = self.settings.get("method")
        self.params: dict[str, dict[str, Any]] = {}
        self.seed = self.settings.get_int("seed")
        self.random_seed = self.settings.get_bool("random_seed")
        self.progressive = self.settings.get_bool("progressive")
        self.busy = False
        self.stage = ""
        self.error = ""
        self.message = ""
        self.preview = None
        self.variants: list[Variant] = []  # the latest result's images when it has several
        self.picked = -1  # the variant shown in the result layer (-1: no variants)
        self._variant_result: VariantResult | None = None
        self._doc = None
        self._sessions: dict[str, Session] = {}
        self._layer_signature: tuple = ()
        self._runner: JobRunner | None = None
        self._queue: list[PreparedPass] = []
        self._current: PreparedPass | None = None
        self._insert_above = None
        self._chain: list = []  # the result layers of the running sequence, bottom first
        self._canvas_preview: CanvasPreview | None = None  # the running pass's preview layer
        self.maps = MapHider()  # the edit maps passes hid, shown again when a pass is undone
        self.last_result_had_layer = False  # whether the backend sent a result layer
        self._cancelling = False

    # == connection (the link to the backend: link/connection.py) =============================
    def _on_methods_loaded(self):
        ids = [m["id"] for m in self.methods]
        if self.method_id not in ids:
            self.method_id = "pixels" if "pixels" in ids else (ids[0] if ids else "")
        self.methodsChanged.emit()
        self.methodChanged.emit(self.method_id)
        self._ensure_roles()

    def _on_models_loaded(self):
        if not self.model:  # never the backend's developer default: a checkpoint or the demo
            self.model = models_ui.for_method(self.models, self.method_id, self.settings,
                                              self.link.models_info, self.health)
        self.modelsChanged.emit()

    # what the panel and the tests read (and the tests set), kept by the link
    connection = _linked("state")
    connection_message = _linked("message")
    connected = property(lambda self: self.link.connected)
    server = _linked("server")
    client = _linked("client")
    process = _linked("process")
    health = _linked("health")
    methods = _linked("methods")
    models = _linked("models")
    models_info = _linked("models_info")
    default_model = _linked("default_model")

    def server_address(self) -> ServerInfo:
        return self.link.address()

    def connect_backend(self, then: Callable[[bool], None] | None = None):
        self.link.connect(then)

    def start_backend(self):
        """Start a local backend with the memory settings and connect to it when ready."""
        self.link.start(self.model, backend_options.backend_args(self.settings))

    def log_path(self):
        return self.link.log_path()

    def stop_backend(self):
        self.link.stop()

    def start_monitoring(self):
        """Keep an eye on the backend (reconnects when it comes back)."""
        self.link.start_monitoring(self.start_backend if self.settings.get_bool("autostart") else None)

    def shutdown(self):
        """Krita is closing: stop a job and a backend we started."""
        if self._runner is not None:
            self._runner.cancel()
        self.link.shutdown()

    # == document & layers ===============================================================
    def document(self):
        if self._doc is not None and not _closed(self._doc):
            return self._doc
        self._doc = None  # closed (Krita keeps the object; its root node is gone)
        return self.app.activeDocument() if self.app is not None else None

    def _doc_key(self, doc) -> str:
        if doc is None:
            return ""
        try:
            return str(doc.rootNode().uniqueId())
        except Exception:
            return str(id(doc))

    # == sessions (one per document) =====================================================
    def session(self, doc=None) -> Session:
        """The roles and history of ``doc`` (default: the current document), read from the
        document's annotation the first time."""
        doc = doc if doc is not None else self.document()
        key = self._doc_key(doc)
        s = self._sessions.get(key)
        if s is None:
            s = self._sessions[key] = Session(key)
        if not s.loaded and doc is not None:
            s.load(doc)
        return s

    @property
    def history(self) -> list[Pass]:
        """The current document's passes, newest first."""
        return self.session().history

    def _save_history(self, doc):
        self.session(doc).save(doc)

    def set_document(self, doc):
        """Follow the active document (the docker calls this on canvasChanged)."""
        if self._doc_key(doc) == self._doc_key(self._doc) and doc is not None:
            self._doc = doc
            return
        self._doc = doc
        self._layer_signature = ()
        self.documentChanged.emit()
        self.refresh_layers(force=True)
        self._ensure_roles()
        self.historyChanged.emit()

    def layers(self) -> list[tuple[str, str]]:
        """(id, name) of the layers a role may use, top first; nested names with their group."""
        doc = self.document()
        return [(kdoc.layer_id(n), str(n.name())) for n in kdoc.pickable_layers(doc)] if doc else []

    def refresh_layers(self, force: bool = False) -> bool:
        """Re-read the document's layers (the panel polls this), and follow Krita's Undo or
        Redo of a variant pick or of a pass (its edit maps shown again); whether the layers
        changed."""
        self._follow_variants()
        self.maps.follow()
        doc = self.document()
        sig = tuple((kdoc.layer_id(n), str(n.name()), bool(n.visible()))
                    for n in kdoc.pickable_layers(doc)) if doc else ()
        if sig != self._layer_signature or force:
            self._layer_signature = sig
            self._drop_missing_roles()
            self.layersChanged.emit()
            return True
        return False

    # == methods, roles, params ==========================================================
    def method(self, method_id: str | None = None) -> dict[str, Any] | None:
        mid = method_id or self.method_id
        return next((m for m in self.methods if m.get("id") == mid), None)

    def set_method(self, method_id: str):
        if method_id == self.method_id:
            return
        self.method_id = method_id
        self.settings.set("method", method_id)
        # the model last used with this method, else the one for it on this machine (models_ui)
        chosen = models_ui.for_method(self.models, method_id, self.settings, self.link.models_info, self.health)
        if chosen and chosen != self.model:
            self.model = chosen
            self.settings.set("model", chosen)
            self.modelsChanged.emit()
        self.methodChanged.emit(method_id)
        self._ensure_roles()

    def target_role(self, desc: dict | None = None) -> str:
        return roles_mod.target_role(desc or self.method() or {})

    def fields(self, method_id: str | None = None) -> list[Field]:
        desc = self.method(method_id)
        return fields_from_schema(desc.get("params")) if desc else []

    def param_values(self, method_id: str | None = None) -> dict[str, Any]:
        mid = method_id or self.method_id
        if mid not in self.params:
            saved = self.settings.get_json(f"params.{mid}", {}) or {}
            values = {f.name: f.default for f in self.fields(mid)}
            for k, v in saved.items():
                if k in values:
                    values[k] = v
            self.params[mid] = values
        return self.params[mid]

    def set_param(self, name: str, value: Any, method_id: str | None = None):
        self.param_values(method_id)[name] = value

    def apply_suggestions(self, suggestions: dict[str, Any], method_id: str | None = None) -> list[str]:
        """Fill the method's empty fields with what the backend suggests (e.g. the captions its
        captioner wrote); what the user typed is never overwritten. Returns the names filled."""
        values = self.param_values(method_id)
        filled = [k for k, v in (suggestions or {}).items()
                  if k in values and values[k] in (None, "") and v not in (None, "")]
        for k in filled:
            values[k] = suggestions[k]
        if filled:
            self.paramsChanged.emit(method_id or self.method_id)
        return filled

    def reset_params(self, method_id: str | None = None):
        mid = method_id or self.method_id
        self.params[mid] = {f.name: f.default for f in self.fields(mid)}
        self.settings.set_json(f"params.{mid}", self.params[mid])

    def _roles_store(self) -> dict[str, dict[str, list[str]]]:
        return self.session().roles

    def roles(self, method_id: str | None = None) -> dict[str, list[str]]:
        mid = method_id or self.method_id
        store = self._roles_store()
        if mid not in store:
            store[mid] = self.default_roles(self.method(mid))
        return store[mid]

    def set_role(self, role: str, layer_ids: list[str] | str | None, method_id: str | None = None):
        if layer_ids is None:
            layer_ids = []
        elif isinstance(layer_ids, str):
            layer_ids = [layer_ids]
        self.roles(method_id)[role] = list(layer_ids)
        desc = self.method(method_id) or {}
        kind = next((r.get("kind") for r in desc.get("roles", []) if r.get("name") == role), "")
        if kind == "map" and self.document() is not None:  # a picked map is shown to paint on
            for lid in layer_ids:
                node = kdoc.find_layer(self.document(), lid)
                if node is not None and not node.visible():
                    node.setVisible(True)
        self.rolesChanged.emit()

    def _ensure_roles(self):
        if self.method():
            self.roles()
        self.rolesChanged.emit()

    def _drop_missing_roles(self):
        doc = self.document()
        if doc is None:
            return
        ids = {kdoc.layer_id(n) for n in kdoc.pickable_layers(doc)}
        for roles in self._roles_store().values():
            for name, chosen in roles.items():
                roles[name] = [c for c in chosen if c == SELECTION or c in ids]

    def selection_roles(self, desc: dict | None = None) -> set[str]:
        return roles_mod.selection_roles(desc or self.method() or {})

    def default_roles(self, desc: dict | None) -> dict[str, list[str]]:
        doc = self.document()
        if not desc or doc is None:
            return {}
        return roles_mod.default_roles(desc, doc, self.session(doc).result_ids())

    def multiple_image_role(self, desc: dict | None = None) -> dict | None:
        return roles_mod.multiple_image_role(desc or self.method() or {})

    # == settings ========================================================================
    def set_model(self, model: str):
        before = self.model_variant()
        self.model = model.strip()
        self.settings.set("model", self.model)
        if self.method_id:
            models_ui.remember(self.settings, self.method_id, self.model)
        if self.model_variant() != before:  # the form shows other fields (see forms.for_model)
            self.modelVariantChanged.emit()

    def model_variant(self) -> str | None:
        """The chosen model's variant as the backend listed it (None: not listed)."""
        entry = next((m for m in self.models if m.get("id") == self.model), None)
        return entry.get("variant") if entry else None

    def set_seed(self, seed: int, random_seed: bool | None = None):
        self.seed = max(0, min(MAX_SEED, int(seed)))
        if random_seed is not None:
            self.random_seed = bool(random_seed)
        self.settings.set("seed", self.seed)
        self.settings.set("random_seed", self.random_seed)

    def set_progressive(self, on: bool):
        self.progressive = bool(on)
        self.settings.set("progressive", self.progressive)

    # == errors & messages ===============================================================
    def set_error(self, text: str):
        self.error = text
        self.errorChanged.emit(text)

    def set_message(self, text: str):
        self.message = text
        self.messageChanged.emit(text)

    def _set_busy(self, busy: bool):
        if busy != self.busy:
            self.busy = busy
            self.busyChanged.emit(busy)

    # == edit maps =======================================================================
    def new_edit_map(self):
        """Create an edit map above the current target layer and pick it for the edit map role."""
        self.set_error("")
        doc = self.document()
        try:
            kdoc.check_document(doc)
            target = None
            tid = (self.roles().get(self.target_role()) or [None])[0] if self.method() else None
            target = kdoc.find_layer(doc, tid) if tid else doc.activeNode()
            if target is None:
                raise AdapterError("Pick the layer to edit first.")
            node = kdoc.create_edit_map(doc, target)
        except AdapterError as e:
            self.set_error(e.message)
            return None
        self.refresh_layers(force=True)
        if self.method():
            for r in self.method().get("roles", []):
                if r.get("kind") == "map":
                    self.set_role(r["name"], [kdoc.layer_id(node)])
                    break
        self.set_message("Paint the edit map: white = change, black = keep.")
        return node

    # == generating ======================================================================
    def prepare(self, method_id: str | None = None) -> list[PreparedPass]:
        """Read everything a run needs from the document; AdapterError/FormError with a
        readable message when something is missing or unusable (nothing is sent then)."""
        desc = self.method(method_id)
        if desc is None:
            raise AdapterError("Choose a method (the list comes from the backend: connect first).")
        doc = self.document()
        kdoc.check_document(doc)
        params = coerce_all(self.fields(desc["id"]), self.param_values(desc["id"]))
        roles = {k: list(v) for k, v in self.roles(desc["id"]).items()}
        padding = self.settings.get_int("padding")
        feather = self.settings.get_int("feather")
        roi, from_sel = kdoc.region_of_interest(doc, padding)
        target_name = self.target_role(desc)
        fmt = remote.upload_format(self.settings)
        images: dict[str, Any] = {}
        target_node = None
        anchor, source, stack, used, maps = None, None, [], [], []
        target_ids = set((roles.get(target_name) or [])[:1])
        for role in desc.get("roles", []):
            name, title = role["name"], role.get("title") or role["name"]
            chosen = roles.get(name) or []
            if role.get("kind") == "mask":
                if chosen and chosen[0] == SELECTION:
                    if name not in self.selection_roles(desc):
                        raise AdapterError(f"\u201c{title}\u201d is a mask of another image than the "
                                           "edited one: pick a layer for it, or (none).")
                    mask = kdoc.selection_mask(doc, roi) if from_sel else None
                    if mask is not None:
                        images[name] = ImageRef(ImagePayload.from_rgba(kdoc.mask_to_rgba(mask, roi.w, roi.h),
                                                                       roi.w, roi.h, fmt))
                    continue
            if role.get("kind") == "image" and name != target_name and target_ids & set(chosen):
                raise AdapterError(f"The edited layer cannot also be \u201c{title}\u201d: pick another "
                                   "layer for it.")
            if not chosen:
                if role.get("required"):
                    raise AdapterError(f"Pick a layer for \u201c{title}\u201d.")
                continue
            refs = []
            for lid in chosen if role.get("multiple") else chosen[:1]:
                node = kdoc.find_layer(doc, lid)
                if node is None:
                    raise AdapterError(f"The layer chosen for \u201c{title}\u201d no longer exists. Pick another one.")
                is_target = name == target_name
                if is_target:
                    anchor = node
                    source, stack = self._source_stack(doc, node)
                    ri = kdoc.role_image(doc, source, role, roi, True, stack)
                    target_node = node
                    used += [source] + stack
                else:
                    ri = kdoc.role_image(doc, node, role, roi, False)
                    used.append(node)
                    if role.get("kind") == "map":
                        maps.append(node)
                payload = ImagePayload.from_rgba(ri.rgba, ri.width, ri.height, fmt)
                refs.append(ImageRef(payload, ri.x, ri.y))
            images[name] = refs if role.get("multiple") else refs[0]
        if target_node is None:
            raise AdapterError("Pick the layer to edit (the target) first.")
        # earlier results of the same source count as used: the new one goes above them
        sid = kdoc.layer_id(source)
        for e in self.session(doc).history:
            if e.source_ids and e.source_ids[0] == sid:
                n = kdoc.find_layer(doc, e.layer_id)
                if n is not None:
                    used.append(n)
        mask = kdoc.feathered_mask(doc, roi, feather) if from_sel else None
        seed = random.randint(0, MAX_SEED) if self.random_seed else self.seed
        model = self.model or None
        extra = dict(source=source, stack=stack, used=used, maps=maps)
        base = PreparedPass(JobSpec(desc["id"], images, params, model, seed), doc, anchor, roi,
                            from_sel, mask, roles, **extra)
        multi = self.multiple_image_role(desc)
        if not (self.progressive and multi and isinstance(images.get(multi["name"]), list)
                and len(images[multi["name"]]) > 1):
            return [base]
        # One pass per exemplar; each result is the next pass's target.
        exemplars = images[multi["name"]]
        maps_role = next((r["name"] for r in desc.get("roles", []) if r.get("kind") == "map" and r.get("multiple")), None)
        maps = images.get(maps_role) if maps_role else None
        passes = []
        for i, ex in enumerate(exemplars):
            imgs = dict(images)
            imgs[multi["name"]] = [ex]
            if isinstance(maps, list) and len(maps) == len(exemplars):
                imgs[maps_role] = [maps[i]]
            spec = JobSpec(desc["id"], imgs, params, model, seed)
            sub_roles = dict(roles)
            sub_roles[multi["name"]] = [roles[multi["name"]][i]]
            passes.append(PreparedPass(spec, doc, anchor, roi, from_sel, mask, sub_roles, i,
                                       len(exemplars), **extra))
        return passes

    def _source_stack(self, doc, node) -> tuple[Any, list]:
        """(source layer, results above it) for a chosen target: a result layer of an earlier
        pass stands for the picture of that pass's source with its results (what *Use as next
        source* picks), so that the next pass sees the whole picture."""
        entry = self.session(doc).entry_for_layer(kdoc.layer_id(node))
        if entry is None or not entry.source_ids:
            return node, []
        nodes = [kdoc.find_layer(doc, i) for i in entry.source_ids]
        if any(n is None for n in nodes):  # a layer of the chain was removed: the layer alone
            return node, []
        return nodes[0], nodes[1:] + [node]

    def generate(self, method_id: str | None = None) -> bool:
        """What the Generate button does. Returns False when nothing was started (the
        reason is in ``error``)."""
        if self.busy:
            return False
        self.set_error("")
        self.set_message("")
        if not self.connected:
            self.connect_backend(lambda ok: self._generate_connected(ok, method_id))
            return True
        return self._generate_connected(True, method_id)

    def _generate_connected(self, ok: bool, method_id: str | None) -> bool:
        if not ok:
            from .install import installer  # what is missing and what to press (ui/lead.py)
            from .ui import lead

            self.set_error(lead.refusal(lead.facts(self.link, installer.shared())))
            self.finished.emit("error")
            return False
        try:
            passes = self.prepare(method_id)
        except (AdapterError, FormError) as e:
            self.set_error(str(e))
            self.finished.emit("error")
            return False
        mid = passes[0].spec.method
        self.settings.set_json(f"params.{mid}", self.param_values(mid))
        self._queue = passes
        self._insert_above = passes[0].target
        self._chain = []
        self._set_variants([], None)
        self._cancelling = False
        self._on_preview(None)  # the previous job's thumbnail goes
        self._set_busy(True)
        self._run_next()
        return True

    def _run_next(self):
        if not self._queue:
            return self._end("done")
        prepared = self._queue.pop(0)
        self._current = prepared
        spec = prepared.spec
        if prepared.index > 0 and self._chain:
            # the next pass's source: the source with the results so far, as the canvas shows it
            try:
                rgba = kdoc.read_stack([prepared.source] + prepared.stack + self._chain, prepared.roi)
            except AdapterError as e:
                return self._on_failed(e.message)
            fmt = remote.upload_format(self.settings)
            spec.images[self.target_role(self.method(spec.method))] = ImageRef(
                ImagePayload.from_rgba(rgba, prepared.roi.w, prepared.roi.h, fmt))
        last = prepared.index == prepared.count - 1
        self._canvas_preview = CanvasPreview(
            prepared.doc, self._insert_above, prepared.roi, prepared.mask,
            list(prepared.used) + list(self._chain),
            group=last and bool(spec.params.get("sweep")))  # a sweep's result is a group
        runner = JobRunner(self.client, spec, self)
        self._runner = runner
        prefix = f"pass {prepared.index + 1}/{prepared.count}: " if prepared.count > 1 else ""
        runner.stage.connect(lambda s: self._on_stage(prefix + s))
        runner.progress.connect(lambda s, a, b: self._on_progress(prefix + s, a, b))
        runner.uploading.connect(lambda s, a, b: self._on_progress(prefix + s, a, b))
        runner.preview.connect(self._on_preview)
        runner.done.connect(self._on_done)
        runner.failed.connect(self._on_failed)
        runner.cancelled.connect(self._on_cancelled)
        runner.start()

    def _on_stage(self, stage: str):
        self.stage = stage
        self.progressChanged.emit(stage, -1, -1)

    def _on_progress(self, stage: str, step: int, total: int):
        self.stage = stage
        self.progressChanged.emit(stage, step, total)

    def _on_preview(self, image):
        self.preview = image
        if image is not None and self._canvas_preview is not None and not self._cancelling:
            try:
                self._canvas_preview.show(image)
            except Exception as e:  # a preview is never worth failing the job
                self.set_message(f"(No preview on the canvas: {e})")
        self.previewChanged.emit(image)

    def _on_done(self, result: JobResult):
        prepared = self._current
        if self._cancelling or prepared is None:
            return self._on_cancelled()
        if not result.images:
            return self._on_failed("The backend finished without a result image.")
        doc = prepared.doc
        seed = result.seed if result.seed is not None else prepared.spec.seed
        desc = self.method(prepared.spec.method) or {}
        several = len(result.images) > 1
        names = [self._result_name(prepared, seed, label, k, several)
                 for k, (_, _, _, label, _) in enumerate(result.images)]
        rgba, w, h, _, sha = result.images[0]
        layers = list(result.layers) + [None] * (len(result.images) - len(result.layers))
        self.last_result_had_layer = any(lay is not None for lay in layers)
        # what goes into the document: the result layer (transparent where nothing changes),
        # or the finished image from a backend that sends no layer
        pixels = [(lay[0], lay[1], lay[2]) if lay else (px, pw, ph)
                  for lay, (px, pw, ph, _, _) in zip(layers, result.images)]
        above = self._insert_above
        show_variants = several and prepared.index == prepared.count - 1  # the last pass's only
        used = list(prepared.used) + list(self._chain)
        opacity = int(prepared.source.opacity()) if prepared.source is not None else None
        preview, self._canvas_preview = self._canvas_preview, None
        try:  # one layer per pass: the first image; the others are variants to pick from
            node = preview.take_result(*pixels[0], names[0], 255 if opacity is None else opacity,
                                       show_variants) if preview is not None else None
            if node is None:
                node = kdoc.insert_result(doc, above, *pixels[0], prepared.roi, names[0],
                                          prepared.mask, used=used, opacity=opacity,
                                          variants=show_variants)
        except AdapterError as e:
            return self._on_failed(e.message)
        except Exception as e:  # never lose the session over an odd host error
            return self._on_failed(f"Could not add the result layer: {e}")
        hidden = self.maps.hide(doc, node, prepared.maps)
        self._insert_above = node
        self._chain.append(node)
        source_ids = [kdoc.layer_id(n) for n in [prepared.source] + prepared.stack + self._chain[:-1]
                      if n is not None]
        entry = Pass(prepared.spec.method, desc.get("title", prepared.spec.method),
                     dict(result.params or prepared.spec.params), seed, prepared.spec.model or "",
                     prepared.roles, kdoc.layer_id(node), str(node.name()), prepared.roi.to_list(),
                     prepared.from_selection, _thumbnail(rgba, w, h), sha,
                     (prepared.index, prepared.count) if prepared.count > 1 else None, result.timings,
                     source_ids, [kdoc.layer_id(n) for n in prepared.maps])
        self.apply_suggestions((result.info or {}).get("param_suggestions") or {},
                               prepared.spec.method)
        session = self.session(doc)
        session.history.insert(0, entry)
        session.save(doc)
        self.historyChanged.emit()
        self.refresh_layers(force=True)
        self.resultAdded.emit(entry)
        note = (" The edit map was hidden (pick it, or New edit map, to paint on it again)."
                if hidden else "")
        # what the backend says about this result (e.g. a fallback it took), for the painter
        for text in (result.info or {}).get("notes") or []:
            note += " " + str(text)
        if show_variants:
            variants = []
            for k, (px, vw, vh, label, vsha) in enumerate(result.images):
                thumb = entry.thumbnail if k == 0 else _thumbnail(px, vw, vh)
                lp, lw, lh = pixels[k]
                variants.append(Variant(label or f"#{k + 1}", thumb, vsha, names[k], lp, lw, lh))
            above_id = kdoc.layer_id(above) if above is not None else ""
            where = VariantResult(doc, prepared.target, prepared.roi, prepared.mask, entry,
                                  above_id)
            children = list(node.childNodes()) if node.type() == "grouplayer" else []
            if children:
                where.showing(node, 0, children[-1])
            self._set_variants(variants, where)
            self.set_message(f"Added the layer \u201c{entry.layer_name}\u201d. It shows the first "
                             f"of {len(variants)} variants: click another in Variants to show it there."
                             + note)
        else:
            self.set_message(f"Added the layer \u201c{entry.layer_name}\u201d." + note)
        self._run_next()

    @staticmethod
    def _result_name(prepared: PreparedPass, seed, label: str, k: int, several: bool) -> str:
        suffix = f"(pass {prepared.index + 1}/{prepared.count})" if prepared.count > 1 else ""
        if several:
            suffix = f"{suffix} {label or f'#{k + 1}'}".strip()
        return kdoc.result_layer_name(prepared.spec.method, seed, suffix)

    def _on_failed(self, message: str):
        self._queue = []
        self.set_error(message)
        self._end("error")

    def _on_cancelled(self):
        self._queue = []
        self.set_message("Cancelled. No layer was added." if not self.history or self._current is None
                         or self._current.index == 0 else "Cancelled; the passes already done were kept.")
        self._end("cancelled")

    def _end(self, how: str):
        preview, self._canvas_preview = self._canvas_preview, None
        if preview is not None:  # cancelled or failed: the preview goes
            try:
                preview.discard()
            except Exception:  # a closed document
                pass
        self._runner = None
        self._current = None
        self._cancelling = False
        self.stage = ""
        self._set_busy(False)
        self.progressChanged.emit("", -1, -1)
        self.finished.emit(how)

    def cancel(self):
        if not self.busy:
            return
        self._cancelling = True
        self._queue = []
        if self._runner is not None:
            self._runner.cancel()
        else:
            self._end("cancelled")

    # == variants ========================================================================
    def _set_variants(self, variants: list[Variant], where: VariantResult | None):
        if not variants and not self.variants and self._variant_result is None:
            return
        self.variants = list(variants)
        self.picked = 0 if variants else -1
        self._variant_result = where if variants else None
        self.variantsChanged.emit()

    def _variant_anchor(self, doc, *ids: str):
        """The node a new variant layer goes above: the first of ``ids`` still in the
        document, else where the result layer was put, else the pass's target, else the top
        of the stack."""
        for lid in (*ids, self._variant_result.above_id):
            node = kdoc.find_layer(doc, lid) if lid else None
            if node is not None:
                return node
        target = self._variant_result.target
        if target is not None and kdoc.find_layer(doc, kdoc.layer_id(target)) is not None:
            return target
        top = list(doc.rootNode().childNodes())
        return top[-1] if top else None

    def _on_variant(self, index: int, failure: str, action) -> str | None:
        """Run ``action(variant, where)`` on the latest result's variant ``index``; its message,
        or None when there is nothing to do or it failed (the error is shown)."""
        where = self._variant_result
        if where is None or not 0 <= index < len(self.variants) or self.busy:
            return None
        self.set_error("")
        try:
            kdoc.check_document(where.doc)
            return action(self.variants[index], where)
        except AdapterError as e:
            self.set_error(e.message)
        except Exception as e:  # a closed document, an odd host error
            self.set_error(f"{failure}: {e}")
        return None

    def pick_variant(self, index: int) -> bool:
        """Show variant ``index`` in the result group of the latest result (one new layer on
        top of the group, so that one undo brings the previous variant back; the group is
        renamed after it), and make it that pass's result in the history (a later pass that
        takes the result as its source reads the group as the canvas shows it). When that
        group was deleted, a new result is added instead."""
        def show(v: Variant, where: VariantResult) -> str:
            node = where.group()
            if node is not None:
                layer = kdoc.show_variant(where.doc, node, v.rgba, v.width, v.height, where.roi,
                                          v.layer_name, where.mask)
                where.showing(node, index, layer)
                return f"\u201c{v.layer_name}\u201d now shows {v.label}."
            node = kdoc.insert_result(where.doc, self._variant_anchor(where.doc), v.rgba, v.width,
                                      v.height, where.roi, v.layer_name, where.mask, variants=True)
            where.entry.layer_id = kdoc.layer_id(node)
            where.layers.clear()
            where.showing(node, index, list(node.childNodes())[-1])
            return f"The result layer was removed; added \u201c{node.name()}\u201d."

        what = self._on_variant(index, "Could not show the variant", show)
        if what is None:
            return False
        self._now_showing(index, self._variant_result.group_name)
        self.refresh_layers(force=True)
        self.set_message(what)
        return True

    def _now_showing(self, index: int, name: str) -> None:
        """The result group shows variant ``index`` (named ``name``): the strip highlights it,
        and the pass's history entry takes its thumbnail, image and name."""
        v, entry = self.variants[index], self._variant_result.entry
        entry.result_sha, entry.thumbnail = v.sha, v.thumbnail
        entry.layer_name = name or v.layer_name
        self.picked = index
        self.variantsChanged.emit()
        session = self.session(self._variant_result.doc)
        if any(e is entry for e in session.history):
            session.save(self._variant_result.doc)
            self.historyChanged.emit()

    def _follow_variants(self) -> bool:
        """Krita's own Undo or Redo of a pick changes the variant the result group shows:
        follow it (the strip, the history entry, and the group's name while the plugin's)."""
        where = self._variant_result
        if where is None or self.busy:
            return False
        try:
            index = shown(where)
            if index is None or index == self.picked or not 0 <= index < len(self.variants):
                return False
            self._now_showing(index, follow_name(where, index))
        except Exception:  # a closed document, an odd host error: a poll never raises
            return False
        return True

    def add_variant_as_layer(self, index: int) -> bool:
        """Keep variant ``index`` as an additional result layer above the result layer (the
        result layer itself is left as it is)."""
        def add(v: Variant, where: VariantResult) -> str:
            above = self._variant_anchor(where.doc, where.added_id, where.entry.layer_id)
            node = kdoc.insert_result(where.doc, above, v.rgba, v.width, v.height, where.roi,
                                      v.layer_name, where.mask)
            where.added_id = kdoc.layer_id(node)
            return f"Added the layer \u201c{v.layer_name}\u201d."

        what = self._on_variant(index, "Could not add the variant", add)
        if what is None:
            return False
        self.refresh_layers(force=True)
        self.set_message(what)
        return True

    # == history =========================================================================
    def apply_again(self, index: int) -> bool:
        """Run a pass of the history again: same method, parameters, seed and layers."""
        try:
            entry = self.history[index]
        except IndexError:
            return False
        if self.method(entry.method) is None:
            self.set_error(f"The backend no longer offers the method \u201c{entry.method}\u201d.")
            return False
        self.set_method(entry.method)
        self.params[entry.method] = {k: v for k, v in entry.params.items()
                                     if k in {f.name for f in self.fields(entry.method)}}
        for role, ids in entry.roles.items():
            self.roles(entry.method)[role] = list(ids)
        self.rolesChanged.emit()
        if entry.seed is not None:
            self.set_seed(entry.seed, False)
        if entry.model:
            self.set_model(entry.model)
        return self.generate(entry.method)

    def use_as_source(self, index: int) -> bool:
        """Make a pass's result layer the target of the next pass."""
        try:
            entry = self.history[index]
        except IndexError:
            return False
        doc = self.document()
        if kdoc.find_layer(doc, entry.layer_id) is None:
            self.set_error(f"The layer \u201c{entry.layer_name}\u201d was removed.")
            return False
        target = self.target_role()
        if not target:
            return False
        self.set_role(target, [entry.layer_id])
        self.set_message(f"\u201c{entry.layer_name}\u201d is now the {target}.")
        return True
