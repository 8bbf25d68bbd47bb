"""What every method is: typed parameters, named image roles, and a run function.

A method module defines a pydantic ``Params`` model (every field with a default, a range
where one makes sense, and a description: the panel builds its form from the JSON schema),
the roles it takes, and ``run(ctx, inputs, params) -> MethodResult``. It registers an
instance with :func:`analogon.methods.register`.

The engine (``analogon.server``/``analogon.cli``) resolves the model, decodes and places
the images, validates the parameters and calls ``run``; it never knows a method's insides.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..errors import AnalogonError, JobCancelled  # noqa: F401  (re-exported for methods)

RoleKind = Literal["image", "map", "mask"]

# The model variants (``ModelBundle.variant``, ``models.discovery.LABELS``) every method runs
# on: the base text-to-image models of each family ("sd2": SD 2.x before the loader decided
# base or v). A method that runs on more lists them in ``Method.variants``.
BASE_VARIANTS: tuple[str, ...] = ("sd1", "sd2", "sd2-base", "sd2-v", "sdxl")
# Why a variant is not enough for a method that does not list it ({method}: its title).
VARIANT_WHY_NOT: dict[str, str] = {
    "sdxl-refiner": "The SDXL refiner cannot run {method}: it has one text encoder (OpenCLIP "
                    "bigG, no CLIP-L), is trained only for the last fifth of the noise levels, and "
                    "{method} needs a whole text-to-image model. Use an SDXL base model (or any "
                    "SD 1.x / 2.x model); PIXELS can use the refiner.",
}


@dataclass(frozen=True)
class Role:
    """An image input of a method, as the panel shows it."""

    name: str
    title: str
    kind: RoleKind = "image"
    required: bool = True
    multiple: bool = False
    help: str = ""
    # The role whose size this one is placed onto (None: the image keeps its own size).
    canvas: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d


# Every method takes these two optional roles; the engine handles their final compositing.
EDIT_MAP_ROLE = Role(
    "edit_map", "Edit map", "map", required=False,
    help="Grey-scale: brighter = more change, black = keep exactly.",
)
MASK_ROLE = Role(
    "mask", "Mask", "mask", required=False,
    help="Only the selected area may change.",
)


class MethodParams(BaseModel):
    """Base of every method's parameter model: unknown keys are refused. The fields here are
    the shared way back into the document (``analogon.core.compositing`` and
    ``analogon.core.hires``), the same for every method."""

    model_config = ConfigDict(extra="forbid")

    hires: Literal["auto", "on", "off"] = Field(
        "auto", title="High-resolution pass",
        description="After the run at the model's own size, refine the changed area at (or "
                    "towards) the document's resolution, tile by tile, at low strength and graded "
                    "by the edit map, where the model drew new structure. auto: only where it "
                    "adds detail: a model of 256 px or more, a region more than 1.5× its working "
                    "size, and new structure in at least 2 % of the changed area (never on the "
                    "toy models).",
        json_schema_extra={"advanced": True})
    hires_strength: float = Field(
        0.3, ge=0.0, le=1.0, title="High-resolution strength",
        description="How much the high-resolution pass may redraw (0: nothing, 1: everything).",
        json_schema_extra={"advanced": True})
    hires_overlap: float = Field(
        0.25, ge=0.0, le=0.5, title="Tile overlap",
        description="Overlap of neighbouring tiles in the high-resolution pass, as a fraction of a "
                    "tile's side; the overlap is blended so that no seam shows.",
        json_schema_extra={"advanced": True})
    hires_max_pixels: int = Field(
        0, ge=0, le=67_108_864, title="Maximum pixels",
        description="The most pixels the high-resolution pass works at (it works at a lower "
                    "resolution, still above the model's own, when the changed area is larger). "
                    "0: automatic, 16 × the model's native area (2048² on SD 1.5).",
        json_schema_extra={"advanced": True, "unit": "px"})


@dataclass
class LayerImage:
    """One decoded input image: RGBA8, already placed on its canvas."""

    rgba: np.ndarray  # (H, W, 4) uint8
    sha: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)"""
        return self.rgba.shape[1], self.rgba.shape[0]


_UNSET: Any = object()


@dataclass
class Inputs:
    """The job's images by role name. Multiple roles hold lists."""

    images: dict[str, LayerImage | list[LayerImage]]
    _change: Any = field(default=_UNSET, init=False, repr=False, compare=False)

    def get(self, name: str) -> LayerImage | None:
        v = self.images.get(name)
        if isinstance(v, list):
            return v[0] if v else None
        return v

    def all(self, name: str) -> list[LayerImage]:
        v = self.images.get(name)
        if v is None:
            return []
        return v if isinstance(v, list) else [v]

    def __contains__(self, name: str) -> bool:
        return bool(self.all(name))

    def change_map(self) -> np.ndarray | None:
        """The job's change map (``core.compositing.job_change_map``: its edit maps and masks
        at the target's full resolution), computed once: the method and the return path both
        read it, so neither may write into it."""
        if self._change is _UNSET:
            from ..core.compositing import job_change_map

            self._change = job_change_map(self)
        return self._change


@dataclass
class ResultImage:
    """One result. From a method's ``generate``: the model's picture at its working size of
    ``box`` (None: the whole target), and ``base``, the full-resolution picture of that box the
    model started from (None: the target's own pixels). After :meth:`Method.run`: ``rgba`` is
    the finished image at the target's size (its own bytes wherever nothing may change) and
    ``layer`` only the change (alpha 0 wherever nothing may change)."""

    rgba: np.ndarray  # (h, w, 3|4) uint8
    label: str = ""
    box: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) on the target
    base: np.ndarray | None = None  # (y1-y0, x1-x0, 4) uint8
    layer: np.ndarray | None = None  # (H, W, 4) uint8, set by Method.run


@dataclass
class MethodResult:
    images: list[ResultImage]
    # Parameters worth reporting beyond the validated params (e.g. resolved prompts, sizes).
    info: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class. Subclasses set the class attributes and implement :meth:`run`."""

    id: ClassVar[str]
    title: ClassVar[str]
    description: ClassVar[str] = ""
    help: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]]
    roles: ClassVar[tuple[Role, ...]]
    # The role whose image is the edit target: results have its size, and edit_map/mask are
    # placed on its canvas and composited against it.
    target_role: ClassVar[str]
    # Parameters `analogon demo` uses on the embedded tiny models (fast settings).
    demo_params: ClassVar[dict[str, Any]] = {}
    # The model variants it runs on (see BASE_VARIANTS); checked once, in :meth:`run`.
    variants: ClassVar[tuple[str, ...]] = BASE_VARIANTS

    def refusal(self, variant: str | None) -> str | None:
        """Why this method cannot run on a model of ``variant`` (None: it can, or the variant
        is not known)."""
        if not variant or variant in self.variants:
            return None
        why = VARIANT_WHY_NOT.get(variant)
        if why is None:
            usable = ", ".join(v for v in self.variants if v != "sd2")
            why = f"{{method}} does not run on a {variant} model; it runs on: {usable}."
        return why.format(method=self.title)

    def check_model(self, bundle: Any) -> None:
        """Raise a clear InputError when the loaded model is not one this method runs on."""
        why = self.refusal(getattr(bundle, "variant", None))
        if why is not None:
            from . import all_methods

            others = [m.id for m in all_methods() if m.refusal(bundle.variant) is None]
            raise AnalogonError("unsupported_model", why,
                                {"variant": bundle.variant, "method": self.id, "methods": others},
                                status=400)

    def all_roles(self) -> tuple[Role, ...]:
        names = {r.name for r in self.roles}
        extra = tuple(r for r in (EDIT_MAP_ROLE, MASK_ROLE) if r.name not in names)
        extra = tuple(dataclasses.replace(r, canvas=self.target_role) for r in extra)
        return self.roles + extra

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "help": self.help,
            "target_role": self.target_role,
            "roles": [r.to_json() for r in self.all_roles()],
            "params": self.Params.model_json_schema(),
        }

    def generate(self, ctx: "JobContext", inputs: Inputs, params: MethodParams) -> MethodResult:
        """The method itself: results at the model's working size (see :class:`ResultImage`)."""
        raise NotImplementedError

    def run(self, ctx: "JobContext", inputs: Inputs, params: MethodParams) -> MethodResult:
        """``generate``, then every result brought back onto the target by the one shared
        return path (``analogon.core.hires.finish``): the finished image and the change as a
        layer, at the target's full resolution."""
        from ..core.hires import finish

        self.check_model(ctx.model)
        target = inputs.get(self.target_role)
        if target is not None and ctx.wants_preview:
            ctx.frame_previews(target.size, inputs.change_map())
        result = self.generate(ctx, inputs, params)
        return finish(ctx, self, inputs, params, result)


def methods_for_variant(variant: str | None, method_ids) -> list[str]:
    """The ids among ``method_ids`` whose method runs on ``variant`` (unknown ids: the base
    variants only). The one rule behind model listings and :meth:`Method.check_model`."""
    from . import get

    out = []
    for mid in method_ids:
        try:
            variants = get(mid).variants
        except AnalogonError:
            variants = BASE_VARIANTS
        if not variant or variant in variants:
            out.append(mid)
    return out


ProgressFn = Callable[[str, int | None, int | None], None]
PreviewFn = Callable[[np.ndarray, int | None], None]


class JobContext:
    """What a running method may use: the model, the cache, the seed, and the job's voice.

    ``progress``/``preview``/``check_cancelled`` are cheap; call ``check_cancelled`` at least
    once per denoising step (``step_callback`` does both).
    """

    def __init__(
        self,
        model: Any,  # analogon.models.ModelBundle
        cache: Any,  # analogon.core.cache.Cache
        seed: int,
        progress: ProgressFn | None = None,
        preview: PreviewFn | None = None,
        cancelled: Callable[[], bool] | None = None,
    ):
        self.model = model
        self.cache = cache
        self.seed = int(seed)
        self._progress = progress
        self._preview = preview
        self._cancelled = cancelled
        self.stage = ""
        self.preview_frame: Any = None  # core.previews.PreviewFrame, set by Method.run

    # -- voice ------------------------------------------------------------------------
    def progress(self, stage: str, step: int | None = None, total: int | None = None) -> None:
        self.stage = stage
        self.check_cancelled()
        if self._progress is not None:
            self._progress(stage, step, total)

    @property
    def wants_preview(self) -> bool:
        """Whether anyone listens to previews (make none otherwise: ``core.previews``)."""
        return self._preview is not None

    def frame_previews(self, size: tuple[int, int], change: np.ndarray | None) -> None:
        """Previews from now on show the result-to-be on a target of ``size`` (width,
        height): the method's picture where ``change`` (the job's change map) allows it,
        transparent where it keeps (``core.previews.PreviewFrame``)."""
        from ..core.previews import PreviewFrame

        self.preview_frame = PreviewFrame(tuple(size), change)

    def preview_box(self, box: tuple[int, int, int, int] | None) -> None:
        """The method's pictures cover ``box`` (x0, y0, x1, y1) of the target (None: all)."""
        if self.preview_frame is not None:
            self.preview_frame.box = None if box is None else tuple(int(v) for v in box)

    def preview(self, rgb: np.ndarray, step: int | None = None) -> None:
        """Send a preview: the method's picture (RGB, of its box), composed onto the target
        through the change map when the frame is known (RGBA then)."""
        if self._preview is not None:
            if self.preview_frame is not None:
                rgb = self.preview_frame.compose(rgb)
            self._preview(rgb, step)

    def check_cancelled(self) -> None:
        if self._cancelled is not None and self._cancelled():
            raise JobCancelled()

    def step_callback(self, stage: str, total: int) -> Callable[[int], None]:
        """A per-step callback for sampler loops: reports progress and honours cancel."""

        def cb(step: int) -> None:
            self.progress(stage, step, total)

        return cb

    # -- randomness -------------------------------------------------------------------
    def generator(self, device: Any = "cpu", offset: int = 0):
        import torch

        g = torch.Generator(device=str(device) if str(device) != "mps" else "cpu")
        g.manual_seed(self.seed + offset)
        return g
