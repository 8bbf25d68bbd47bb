"""Running one method on one set of images: shared by the server's worker and `analogon run`.

A job is a method id, a params dict, image references by role, a model spec and a seed.
The engine
1. validates the params with the method's pydantic ``Params`` (defaults filled in),
2. checks the roles (known, required ones present, lists only where ``multiple``),
3. decodes the images and places them on their canvases (``Role.canvas``),
4. resolves the model (kept warm by a :class:`~analogon.models.ModelManager`),
5. runs ``method.run`` with a :class:`~analogon.methods.base.JobContext`,
   (which brings every result back onto the target through the one shared return path,
   ``core.hires.finish``: pixels where the edit map is black / outside the mask are the
   target's own bytes, and each result also comes as a layer carrying only the change).
It reports the seed and the full parameters actually used.
"""
from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
from pydantic import ValidationError

from .errors import AnalogonError
from .methods import get as get_method
from .methods.base import Inputs, JobContext, LayerImage, Method, MethodParams, ResultImage

SHA_RE = re.compile(r"[0-9a-f]{64}")
MAX_SEED = 2**32 - 1


class ImageSource(Protocol):
    """Where the engine reads images by SHA-256 (the server's store, or files for the CLI)."""

    def load(self, sha: str) -> np.ndarray:  # (H, W, 4) uint8
        ...

    def __contains__(self, sha: str) -> bool:
        ...


@dataclass(frozen=True)
class ImageRef:
    """A reference to a stored image, optionally placed: scaled by ``scale`` and put with its
    top-left corner at (x, y) on the role's canvas."""

    sha: str
    x: int = 0
    y: int = 0
    scale: float = 1.0
    placed: bool = False  # given as {sha, x, y, scale}

    def to_json(self) -> Any:
        if not self.placed:
            return self.sha
        return {"sha": self.sha, "x": self.x, "y": self.y, "scale": self.scale}


@dataclass
class PreparedJob:
    """A validated job, ready for a worker: nothing is decoded or loaded yet."""

    method: Method
    params: MethodParams
    refs: dict[str, ImageRef | list[ImageRef]]
    model: str
    seed: int

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method.id,
            "model": self.model,
            "seed": self.seed,
            "params": self.params.model_dump(mode="json"),
            "images": {k: ([r.to_json() for r in v] if isinstance(v, list) else v.to_json())
                       for k, v in self.refs.items()},
        }


@dataclass
class EngineResult:
    images: list[ResultImage]
    seed: int
    params: dict[str, Any]
    model: str
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


# -- validation ------------------------------------------------------------------------

def validate_params(method: Method, params: dict[str, Any] | None) -> MethodParams:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise AnalogonError("invalid_params", "The parameters must be a JSON object.", status=422)
    try:
        return method.Params.model_validate(params)
    except ValidationError as e:
        errors = json.loads(e.json(include_url=False))
        parts = []
        for err in errors[:5]:
            where = ".".join(str(p) for p in err.get("loc", ())) or "params"
            parts.append(f"{where}: {err.get('msg')}")
        raise AnalogonError(
            "invalid_params",
            f"Some parameters of {method.title} are not valid: " + "; ".join(parts) + ".",
            errors, status=422,
        ) from None


def parse_ref(raw: Any, role: str) -> ImageRef:
    if isinstance(raw, str):
        sha, placed, x, y, scale = raw, False, 0, 0, 1.0
    elif isinstance(raw, dict) and "sha" in raw:
        unknown = set(raw) - {"sha", "x", "y", "scale"}
        if unknown:
            raise _image_error(f"The {role} image reference has unknown fields {sorted(unknown)}.", role)
        sha, placed = raw["sha"], True
        try:
            x, y = int(raw.get("x", 0)), int(raw.get("y", 0))
            scale = float(raw.get("scale", 1.0))
        except (TypeError, ValueError):
            raise _image_error(f"The {role} image placement must be numbers.", role) from None
        if not (0 < scale <= 64):
            raise _image_error(f"The {role} image scale {scale} is out of range (0, 64].", role)
    else:
        raise _image_error(f"The {role} image must be a SHA-256 string or {{sha, x, y, scale}}.", role)
    if not isinstance(sha, str) or not SHA_RE.fullmatch(sha):
        raise _image_error(f"The {role} image reference is not a SHA-256 hex digest.", role)
    return ImageRef(sha, x, y, scale, placed)


def _image_error(message: str, role: str | None = None, **detail: Any) -> AnalogonError:
    return AnalogonError("invalid_images", message, {"role": role, **detail}, status=422)


def check_roles(method: Method, images: dict[str, Any] | None) -> dict[str, ImageRef | list[ImageRef]]:
    """Image references by role, checked against the method's roles."""
    images = images or {}
    if not isinstance(images, dict):
        raise _image_error("The images must be a JSON object of role name to image reference.")
    roles = {r.name: r for r in method.all_roles()}
    unknown = sorted(set(images) - set(roles))
    if unknown:
        raise _image_error(
            f"{method.title} has no image role called {', '.join(map(repr, unknown))}; "
            f"it takes {', '.join(roles)}.", unknown[0], available=list(roles),
        )
    out: dict[str, ImageRef | list[ImageRef]] = {}
    for name, role in roles.items():
        raw = images.get(name)
        if raw is None or (isinstance(raw, list) and not raw):
            if role.required:
                raise _image_error(f"{method.title} needs a {role.title} image ({name}).", name)
            continue
        if isinstance(raw, list):
            if not role.multiple and len(raw) > 1:
                raise _image_error(f"{role.title} takes one image, not {len(raw)}.", name)
            refs = [parse_ref(r, name) for r in raw]
            out[name] = refs if role.multiple else refs[0]
        else:
            ref = parse_ref(raw, name)
            out[name] = [ref] if role.multiple else ref
    return out


def _check_seed(seed: Any) -> int:
    if seed is None:
        return secrets.randbelow(2**31)
    if isinstance(seed, bool) or not isinstance(seed, int) or not (0 <= seed <= MAX_SEED):
        raise AnalogonError("invalid_params", f"The seed must be a whole number from 0 to {MAX_SEED}.",
                            {"seed": seed}, status=422)
    return seed


def prepare(method_id: str, params: dict[str, Any] | None, images: dict[str, Any] | None,
            model: str | None, seed: int | None, default_model: str,
            source: ImageSource | None = None) -> PreparedJob:
    """Everything that can be checked before a job is queued. With ``source`` given, the
    referenced images must exist in it."""
    method = get_method(method_id)
    p = validate_params(method, params)
    refs = check_roles(method, images)
    if source is not None:
        missing = sorted({r.sha for v in refs.values() for r in (v if isinstance(v, list) else [v])
                          if r.sha not in source})
        if missing:
            raise AnalogonError(
                "image_not_found", "Some images are not uploaded: upload them first, then submit.",
                {"missing": missing}, status=404,
            )
    model = (model or "").strip() or default_model
    return PreparedJob(method=method, params=p, refs=refs, model=model, seed=_check_seed(seed))


# -- inputs ----------------------------------------------------------------------------

def decode_inputs(job: PreparedJob, source: ImageSource) -> Inputs:
    """Load every referenced image and place it on its canvas: a role with ``canvas`` is
    placed onto a transparent canvas the size of that role's image; a placed reference in a
    role without a canvas goes onto the target's canvas."""
    from .core.images import as_rgba, place, size_of

    method = job.method
    roles = {r.name: r for r in method.all_roles()}
    decoded: dict[str, LayerImage | list[LayerImage]] = {}

    def canvas_for(role_name: str, ref: ImageRef) -> str | None:
        role = roles[role_name]
        if role.canvas and role.canvas != role_name:
            return role.canvas
        if ref.placed and role_name != method.target_role:
            return method.target_role
        return None

    def load(ref: ImageRef) -> np.ndarray:
        return np.array(as_rgba(source.load(ref.sha)), copy=True)  # the method may edit it

    # images without a canvas first: they are the canvases of the others
    pending: list[tuple[str, list[ImageRef], bool]] = []
    for name, v in job.refs.items():
        refs = v if isinstance(v, list) else [v]
        if any(canvas_for(name, r) for r in refs):
            pending.append((name, refs, isinstance(v, list)))
        else:
            imgs = [LayerImage(load(r), r.sha) for r in refs]
            decoded[name] = imgs if isinstance(v, list) else imgs[0]
    for name, refs, is_list in pending:
        imgs = []
        for r in refs:
            cname = canvas_for(name, r)
            canvas_img = decoded.get(cname) if cname else None
            if isinstance(canvas_img, list):
                canvas_img = canvas_img[0] if canvas_img else None
            rgba = load(r)
            if cname and canvas_img is None:
                raise _image_error(
                    f"The {roles[name].title} image is placed on the {roles[cname].title} image, "
                    "which is missing.", name)
            if canvas_img is not None:
                rgba = place(rgba, size_of(canvas_img.rgba), r.x, r.y, r.scale)
            imgs.append(LayerImage(rgba, r.sha))
        decoded[name] = imgs if is_list else imgs[0]
    return Inputs(decoded)


# -- running ---------------------------------------------------------------------------

def execute(
    job: PreparedJob,
    *,
    source: ImageSource,
    models,  # analogon.models.ModelManager
    cache,  # analogon.core.cache.Cache
    progress: Callable[[str, int | None, int | None], None] | None = None,
    preview: Callable[[np.ndarray, int | None], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    on_model: Callable[[Any], None] | None = None,
) -> EngineResult:
    """Run a prepared job to the end. Raises AnalogonError / JobCancelled / anything the method raises."""
    from .errors import JobCancelled

    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def check():
        if cancelled is not None and cancelled():
            raise JobCancelled()

    inputs = decode_inputs(job, source)
    timings["decode"] = time.perf_counter() - t0
    check()
    t = time.perf_counter()
    if progress is not None:
        progress("loading model", None, None)
    bundle = models.get(job.model)
    timings["model"] = time.perf_counter() - t
    if on_model is not None:
        on_model(bundle)
    check()
    ctx = JobContext(bundle, cache, job.seed, progress=progress, preview=preview, cancelled=cancelled)
    t = time.perf_counter()
    result = job.method.run(ctx, inputs, job.params)
    timings["run"] = time.perf_counter() - t
    if not result.images:
        raise AnalogonError("no_result", f"{job.method.title} produced no image.", status=500)
    images = result.images
    timings["total"] = time.perf_counter() - t0
    return EngineResult(
        images=images, seed=job.seed, params=job.params.model_dump(mode="json"), model=job.model,
        info=_jsonable(result.info), timings={k: round(v, 4) for k, v in timings.items()},
    )


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return {"repr": repr(value)}


class MemorySource:
    """An ImageSource over arrays in memory (the CLI's files): ``add(rgba) -> sha``."""

    def __init__(self):
        self._images: dict[str, np.ndarray] = {}

    def add(self, rgba: np.ndarray) -> str:
        from .core.images import as_rgba, raw_image_id

        rgba = as_rgba(rgba)
        sha = raw_image_id(rgba.tobytes(), rgba.shape[1], rgba.shape[0])
        self._images[sha] = rgba
        return sha

    def load(self, sha: str) -> np.ndarray:
        return self._images[sha]

    def __contains__(self, sha: str) -> bool:
        return sha in self._images
