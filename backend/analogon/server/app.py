"""The FastAPI application: see docs/protocol.md for the contract it implements."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from .. import __version__, engine
from ..errors import AnalogonError
from .jobs import ANYONE, TERMINAL, JobQueue
from .store import (
    PNG, RGBA, ImageStore, Limits, bad_image, check_encoding, check_sha, check_size, too_large,
)
from .uploads import UploadSessions, not_found

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7871
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "[::1]"}
KEEPALIVE_S = 15.0
MAX_JSON_BYTES = 1024 * 1024  # a job body is a few hundred bytes
MAX_JSON_DEPTH = 64
MAX_JSON_INT = 2**53  # I-JSON (RFC 7493): integers a double holds exactly
FIRST_SCAN_WAIT_S = 3.0  # GET /v1/models before the first scan of the model folders has ended
MAX_SCAN_WAIT_S = 10.0
_HOST_RE = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:[0-9]{1,5})?")
_EVENT_ID_RE = re.compile(r"[0-9]{1,18}")
_DIGITS_RE = re.compile(r"[0-9]{1,9}")
_OFFSET_RE = re.compile(r"[0-9]{1,18}")


def default_state_dir() -> Path:
    env = os.environ.get("ANALOGON_STATE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "analogon"


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "analogon"


@dataclass
class Settings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    state_dir: Path | None = None  # None: default_state_dir()
    default_model: str = "tiny-sd"
    device: str | None = None
    dtype: str | None = None
    cpu_offload: bool = False
    vae_tiling: bool = False
    cache_dir: Path | None = None  # None: default_cache_dir(); "" -> memory only
    cache_disk_cap_bytes: int = 4 * 1024**3
    allow_remote: bool = False
    token: str | None = None  # None: a fresh random token
    limits: Limits = field(default_factory=Limits)
    warm_models: int = 1
    image_store_cap_bytes: int = 8 * 1024**3
    result_max_age_s: float | None = 7 * 24 * 3600.0  # None: results stay until the cap
    header_timeout_s: float = 10.0  # a client must send its request line and headers within this
    body_timeout_s: float = 30.0  # and, once its headers are in, some of its body at least this often
    job_memory_bytes: int | None = None  # None: what the machine has free when a job is submitted
    max_working_pixels: int | None = None  # caps the high-resolution pass (memory preset)
    memory_preset: str = "none"  # the preset the settings above came from (analogon.memory)
    model_dirs: list[Path] = field(default_factory=list)  # searched for checkpoints (--models-dir)
    scan_usual_places: bool = True  # ComfyUI, A1111/Forge, Krita AI Diffusion, the HF cache
    scan_budget: Any = None  # one scan's models.discovery.Budget; None: its defaults
    # SD 2.x prediction type per model spec ("*": all): epsilon | v_prediction (--prediction)
    predictions: dict[str, str] = field(default_factory=dict)
    # TLS (server.tls): the user's certificate and key, or a self-signed one made in <state>/tls
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    tls_self_signed: bool = False
    insecure: bool = False  # listen beyond loopback without TLS (--insecure)
    # one worker per device, all drawing from one queue; None: one worker on `device`
    devices: list[str] | None = None
    # painters' tokens (server.painters): the file, and the limits of a token that sets none
    tokens_file: Path | None = None  # None: <state>/tokens.json
    painter_max_queued: int = 16
    painter_max_stored_bytes: int = 2 * 1024**3
    painter_keep_s: float = 600.0  # a painter's uploads used this recently are never released
    # raw RGBA downloads gzip-compressed for a client that accepts it: "auto" (clients beyond
    # loopback: a network, where 4 bytes a pixel cost time), "always" or "never"
    compress_downloads: str = "auto"
    # resumable uploads (server.uploads): the largest chunk one PUT takes, how long an unfinished
    # upload is kept after its last chunk, and how often expired ones are looked for
    upload_chunk_max_bytes: int = 16 * 1024**2
    upload_max_age_s: float = 24 * 3600.0
    upload_sweep_s: float = 600.0

    def resolved_state_dir(self) -> Path:
        return Path(self.state_dir) if self.state_dir else default_state_dir()


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_json_safe(str(k)): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int)):
        return value
    return _json_safe(repr(value))


def _json_bytes(content: Any) -> bytes:
    """Strict JSON (no NaN, valid UTF-8): what cannot be written so is made safe first (an
    error's detail may quote the caller's input)."""
    try:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except (ValueError, TypeError, UnicodeEncodeError):
        return json.dumps(_json_safe(content), ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8")


class SafeJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return _json_bytes(content)


def error_response(status: int, code: str, message: str, detail: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return SafeJSONResponse({"code": code, "message": message, "detail": detail}, status_code=status,
                            headers=headers)


PRINCIPAL = "analogon.principal"  # the scope key where the guard puts who is asking


class GuardMiddleware:
    """Loopback Host check and bearer-token check, before anything else runs. The token is
    the backend's own or a painter's (``tokens``: server.painters.Tokens); who it is goes into
    the request's scope (``PRINCIPAL``). Health needs no token, but is told who asks when one
    is given."""

    def __init__(self, app, token: str, allow_remote: bool, tokens=None):
        from .painters import Tokens

        self.app = app
        self.tokens = tokens if tokens is not None else Tokens(token, None)
        self.allow_remote = allow_remote

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not self.allow_remote and not _is_loopback_host(headers.get("host", "")):
            resp = error_response(403, "forbidden_host", "This backend only answers requests addressed "
                                  "to 127.0.0.1 or localhost.", {"host": headers.get("host")})
            return await resp(scope, receive, send)
        from .painters import Principal

        auth = headers.get("authorization", "")
        given = auth[7:].strip().encode("latin-1") if auth[:7].lower() == "bearer " else b""
        who = self.tokens.authenticate(given)
        if isinstance(who, Principal):
            scope[PRINCIPAL] = who
        elif not (scope["path"] == "/v1/health" and scope["method"] in ("GET", "HEAD")):
            if who is not None:  # a revoked painter's token
                message = (f"This token (painter {who.name}) was revoked. Ask the server's owner for a "
                           "new one (analogon tokens create).")
            elif given or auth:
                message = "Missing or wrong token. The token is in server.json in the backend's state folder."
            else:
                message = "This request needs the backend's token (Authorization: Bearer ...)."
            resp = error_response(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def _is_loopback_host(host: str) -> bool:
    """``name[:port]`` where name is a loopback name, and nothing else (RFC 9110 Host)."""
    m = _HOST_RE.fullmatch(host.strip().lower())
    return m is not None and m.group(1) in LOOPBACK_NAMES


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: StrictStr = Field(description="Method id, from /v1/methods.")
    model: StrictStr | None = Field(None, description="Model spec; absent: the server's default model.")
    seed: StrictInt | None = Field(None, ge=0, le=engine.MAX_SEED, description="Absent or null: random.")
    params: dict[str, Any] = Field(default_factory=dict)
    images: dict[str, Any] = Field(default_factory=dict,
                                   description="Role name -> sha, {sha,x,y,scale}, or a list of those.")


class _BadJson(Exception):
    pass


def parse_json_body(body: bytes) -> Any:
    """The body as I-JSON (RFC 7493): UTF-8, no NaN/Infinity, numbers a double holds, no lone
    surrogates, no name twice in one object, nesting at most 64 deep. Anything else is
    ``400 bad_json``."""
    def bad_constant(name: str):
        raise _BadJson(f"{name} is not a JSON number")

    def parse_float(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise _BadJson(f"the number {text[:40]} is out of range")
        return value

    def parse_int(text: str) -> int:
        if len(text) > 20 or abs(int(text)) > MAX_JSON_INT:
            raise _BadJson(f"the whole number {text[:40]} is out of range (at most 2^53)")
        return int(text)

    def unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for name, value in pairs:
            if name in obj:
                raise _BadJson(f"the name {name[:40]!r} is given twice in one object")
            obj[name] = value
        return obj

    try:
        text = body.decode("utf-8")
        value = json.loads(text, parse_constant=bad_constant, parse_float=parse_float, parse_int=parse_int,
                           object_pairs_hook=unique_names)
        _check_json_value(value)
    except UnicodeDecodeError:
        raise AnalogonError("bad_json", "The request body is not UTF-8 text.", status=400) from None
    except RecursionError:
        raise AnalogonError("bad_json", "The request body is nested too deeply.", status=400) from None
    except _BadJson as e:
        raise AnalogonError("bad_json", f"The request body is not portable JSON: {e}.", status=400) from None
    except ValueError as e:
        raise AnalogonError("bad_json", "The request body is not valid JSON.",
                            {"error": str(e)[:200]}, status=400) from None
    return value


def _check_json_value(value: Any) -> None:
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _BadJson(f"it is nested more than {MAX_JSON_DEPTH} deep")
        if isinstance(v, str):
            _check_text(v)
        elif isinstance(v, dict):
            for k, item in v.items():
                _check_text(k)
                stack.append((item, depth + 1))
        elif isinstance(v, list):
            stack.extend((item, depth + 1) for item in v)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _BadJson("a string holds a lone surrogate (not Unicode text)") from None


class UploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: StrictStr = Field(description="The image's id, as for PUT /v1/images/{sha}.")
    content_type: StrictStr = Field(description=f"{PNG} or {RGBA}.")
    length: StrictInt = Field(ge=1, le=MAX_JSON_INT, description="The body's bytes in all, as sent.")
    width: StrictInt | None = Field(None, ge=1, le=10**9, description="Raw RGBA: the width in pixels.")
    height: StrictInt | None = Field(None, ge=1, le=10**9, description="Raw RGBA: the height in pixels.")
    encoding: StrictStr | None = Field(None, description="deflate: a raw RGBA body compressed as a zlib "
                                                         "stream; absent: none.")


class DownloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(description="A recommended model's id, from /v1/downloads/catalog.")


class VerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr = Field(description="A recommended model's id, from /v1/downloads/catalog.")
    path: StrictStr | None = Field(None, description="A checkpoint the scan found of its family "
                                   "(its id in on_disk); absent: the file in the models folder.")


def memory_info() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        from ..memory import system_memory

        out.update(system_memory())
    except Exception:  # pragma: no cover - psutil missing or refusing
        pass
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            out.update(gpu_total_bytes=total, gpu_free_bytes=free,
                       gpu_allocated_bytes=torch.cuda.memory_allocated())
    except Exception:  # pragma: no cover
        pass
    return out


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application. Its state (store, models, queue) lives in ``app.state``; the worker
    starts with the app's lifespan (or ``app.state.queue.start()`` by hand)."""
    from contextlib import asynccontextmanager

    from ..core.cache import Cache
    from ..methods import UNAVAILABLE, all_methods
    from ..models import LoadOptions, ModelManager, discovery, pick_device, pick_dtype
    from ..models.download import Downloads, catalog
    from . import memory, openapi

    from . import painters, tls
    from .workers import ModelPool, check_devices

    settings = settings or Settings()
    token = settings.token or secrets.token_urlsafe(32)
    state_dir = settings.resolved_state_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    device_list = [pick_device(d) for d in (check_devices(list(settings.devices)) if settings.devices
                                            else [settings.device])]
    options = [LoadOptions(device=str(d) if settings.devices else settings.device, dtype=settings.dtype,
                           cpu_offload=bool(settings.cpu_offload), vae_tiling=bool(settings.vae_tiling),
                           max_working_pixels=settings.max_working_pixels,
                           predictions=dict(settings.predictions)) for d in device_list]
    device = device_list[0]
    dtype = pick_dtype(device, settings.dtype)
    store = ImageStore(state_dir / "images", settings.limits, disk_cap_bytes=settings.image_store_cap_bytes,
                       result_max_age_s=settings.result_max_age_s)
    try:  # holding the state folder (the store's lock): a self-signed certificate is made once
        tls_info = tls.prepare(settings, state_dir)
        uploads = UploadSessions(store.folder / "uploads", settings.upload_max_age_s,
                                 min(settings.upload_chunk_max_bytes, settings.limits.max_body_bytes),
                                 cap_bytes=settings.image_store_cap_bytes)
    except BaseException:
        store.close()
        raise
    if store.removed_at_start["tmp"] or store.removed_at_start["damaged"]:
        log.warning("image store: removed %(tmp)d half-written and %(damaged)d damaged files left by "
                    "a previous run", store.removed_at_start)
    if settings.cache_dir == "" or settings.cache_dir == Path(""):
        cache = Cache(None)
    else:
        cache = Cache(settings.cache_dir or default_cache_dir(), disk_cap_bytes=settings.cache_disk_cap_bytes)
    from ..core import previews

    # each model's latent-preview fit starts when it loads, in the background (core.previews);
    # one manager per device: a device's modules are its own
    managers = [ModelManager(settings.warm_models, o, on_load=lambda b: previews.prepare(b, cache))
                for o in options]
    models = ModelPool(managers)
    tokens = painters.Tokens(token, Path(settings.tokens_file) if settings.tokens_file
                             else state_dir / painters.TOKENS_FILE,
                             settings.painter_max_queued, settings.painter_max_stored_bytes)
    claims = painters.Claims(store, settings.painter_keep_s)
    scanner = discovery.Scanner(lambda stop: discovery.run_scan(
        settings.model_dirs, [m.id for m in all_methods()], include_usual=settings.scan_usual_places,
        budget=settings.scan_budget, stop=stop))
    if len(managers) > 1:
        import threading

        from .workers import SerialLoads

        loads = threading.Lock()
        worker_models = [SerialLoads(m, loads) for m in managers]
    else:
        worker_models = managers
    queue = JobQueue(store, models, cache, workers=[(str(d), m) for d, m in zip(device_list, worker_models)],
                     is_active=tokens.active)
    budget = memory.Budget(device, dtype, settings.job_memory_bytes)

    async def begin_shutdown() -> None:
        """Before the server waits for open connections: end every job that has not ended
        (an ``error`` event, code ``shutting_down``), so that event streams end too."""
        if app.state.closing:
            return
        app.state.closing = True
        await asyncio.to_thread(queue.stop)

    async def sweep_uploads() -> None:
        while True:
            await asyncio.sleep(settings.upload_sweep_s)
            try:
                uploads.sweep()
            except OSError as e:  # pragma: no cover - the folder went away
                log.warning("uploads: the sweep failed: %s", e)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        scanner.start()
        app.state.closing = False
        sweeper = asyncio.create_task(sweep_uploads())
        try:
            yield
        finally:
            sweeper.cancel()
            app.state.downloads.stop_all()
            await begin_shutdown()
            await asyncio.to_thread(scanner.stop)
            store.close()

    app = FastAPI(
        title="Analogon backend", version=__version__, lifespan=lifespan,
        description="Example-based image editing for Krita. See docs/protocol.md.",
        docs_url=None, redoc_url=None, default_response_class=SafeJSONResponse,
    )
    app.state.settings = settings
    app.state.token = token
    app.state.tokens = tokens
    app.state.claims = claims
    app.state.tls = tls_info
    app.state.store = store
    app.state.uploads = uploads
    app.state.models = models
    app.state.cache = cache
    app.state.queue = queue
    app.state.budget = budget
    app.state.scanner = scanner
    app.state.closing = False
    app.state.begin_shutdown = begin_shutdown
    app.add_middleware(GuardMiddleware, token=token, allow_remote=settings.allow_remote, tokens=tokens)

    def who(request: Request) -> painters.Principal:
        return request.scope.get(PRINCIPAL) or painters.SERVER

    def owner_filter(request: Request) -> Any:
        """What the caller may see of the jobs: ANYONE for the backend's own token."""
        p = who(request)
        return ANYONE if p.is_server else p.owner

    def image_visible(request: Request, sha: str) -> bool:
        p = who(request)
        if p.is_server:
            return True
        if claims.claimed(p.owner, sha):
            claims.touch(p.owner, [sha])
            return True
        return queue.results_visible_to(p.owner, sha)

    def custom_openapi() -> dict[str, Any]:
        ms = all_methods()
        key = tuple((m.id, id(m)) for m in ms)
        cached = getattr(app.state, "_openapi", None)
        if cached is None or cached[0] != key:
            from fastapi.openapi.utils import get_openapi

            base = get_openapi(title=app.title, version=app.version, description=app.description,
                               routes=app.routes)
            cached = (key, openapi.build(base, ms))
            app.state._openapi = cached
        return cached[1]

    app.openapi = custom_openapi  # type: ignore[method-assign]

    # -- errors -------------------------------------------------------------------------
    @app.exception_handler(AnalogonError)
    async def _analogon_error(request: Request, exc: AnalogonError):
        return error_response(exc.status, exc.code, exc.message, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = json.loads(_json_bytes(exc.errors()))
        for e in errors:
            e.pop("url", None)
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "bad_json", "The request body is not valid JSON.", errors)
        return error_response(422, "invalid_params", _validation_message(errors), errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(app, request.scope))
        codes = {404: ("not_found", "There is nothing at this address."),
                 405: ("method_not_allowed", "This address does not take this kind of request.")}
        code, message = codes.get(exc.status_code, (f"http_{exc.status_code}", str(exc.detail)))
        return error_response(exc.status_code, code, message, None, headers=headers or None)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"The backend failed: {type(exc).__name__}: {exc}")

    # -- service ------------------------------------------------------------------------
    @app.head("/v1/health")
    def health_head():
        return Response(status_code=200)

    @app.get("/v1/health")
    def health(request: Request) -> dict[str, Any]:
        out = {
            "status": "ok", "version": __version__, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "memory": memory_info(),
            "loaded_models": models.loaded(), "default_model": settings.default_model,
            "queue": queue.queue_length(), "pid": os.getpid(),
            "limits": {**settings.limits.to_json(), "upload_chunk_max_bytes": uploads.chunk_max,
                       "upload_max_age_s": uploads.max_age_s},
            "devices": [str(d) for d in device_list], "workers": queue.workers_json(),
            "tls": {"enabled": tls_info is not None},
        }
        p = request.scope.get(PRINCIPAL)
        out["authenticated"] = p is not None
        if p is not None:  # told only to a client with a valid token
            if tls_info is not None:
                out["tls"] = tls_info.to_json()
            out["painter"] = None if p.is_server else {
                "name": p.owner, "max_queued": tokens.max_queued(p.painter),
                "max_stored_bytes": tokens.max_stored_bytes(p.painter),
                "active_jobs": queue.active_count(p.owner), "stored_bytes": claims.stored_bytes(p.owner)}
        return out

    # -- recommended models -------------------------------------------------------------
    downloads = Downloads(discovery.models_dir(), endpoint=os.environ.get("HF_ENDPOINT") or None,
                          on_done=scanner.refresh)
    app.state.downloads = downloads

    def on_disk(entry) -> list[dict[str, Any]]:
        """Checkpoints the scan found of the entry's family; ``same_file``: its name and size
        are the publisher's file's (Verify tells for sure)."""
        result, _ = scanner.latest()
        out = []
        for c in (result.checkpoints if result is not None else []):
            if (c.family or "").split("-")[0] != entry.family or c.variant and c.variant.endswith(
                    ("inpainting", "refiner")):
                continue
            same = Path(c.id).name == entry.filename and c.size_bytes == entry.size_bytes
            out.append({"id": c.id, "name": c.name, "location": c.location, "same_file": same})
        return out

    @app.get("/v1/downloads/catalog")
    def download_catalog() -> dict[str, Any]:
        return {"models_dir": str(downloads.models_dir),
                "models": [{**e.to_json(), "installed": (downloads.models_dir / e.filename).exists(),
                            "on_disk": on_disk(e)}
                           for e in catalog()]}

    @app.post("/v1/downloads/verify")
    async def verify_download(request: Request) -> dict[str, Any]:
        """The SHA-256 of a recommended model's file on disk against the publisher's."""
        owner_only(request, "Verifying a model file")
        req = await _json_request(request, VerifyRequest, "A verification")
        from ..models.download import find, verify

        entry = find(req.model)
        path = Path(req.path) if req.path else downloads.models_dir / entry.filename
        if req.path and not any(Path(c["id"]) == path for c in on_disk(entry)):
            raise AnalogonError("model_not_found", f"{path} is not a checkpoint the backend found for "
                                f"{entry.title}.", status=404)
        return await asyncio.to_thread(verify, entry, path)

    def owner_only(request: Request, what: str) -> None:
        if not who(request).is_server:
            raise AnalogonError("painter_not_allowed", f"{what} is for the server's owner; a painter's token "
                                "cannot do it. Ask whoever runs the server.", None, status=403)

    @app.post("/v1/downloads", status_code=202)
    async def start_download(request: Request):
        owner_only(request, "Downloading a model into the server's models folder")
        req = await _json_request(request, DownloadRequest, "A download")
        return SafeJSONResponse((await asyncio.to_thread(downloads.start, req.model)).to_json(), status_code=202)

    @app.get("/v1/downloads/{download_id}")
    def download_status(download_id: str) -> dict[str, Any]:
        return downloads.get(download_id).to_json()

    @app.delete("/v1/downloads/{download_id}")
    def cancel_download(download_id: str, request: Request) -> dict[str, Any]:
        owner_only(request, "Cancelling a download")
        return downloads.cancel(download_id).to_json()

    @app.get("/v1/system")
    def system() -> dict[str, Any]:
        """The device, its memory, the memory settings in force and the presets."""
        from .. import memory

        info = memory.system_info()
        return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), **{
                    k: info[k] for k in ("device_name", "vram_bytes", "ram_bytes")},
                "memory": memory_info(), "auto_preset": memory.auto_preset(info),
                "settings": {"preset": settings.memory_preset, "device": settings.device,
                             "dtype": settings.dtype, "cpu_offload": bool(settings.cpu_offload),
                             "vae_tiling": bool(settings.vae_tiling),
                             "max_pixels": settings.max_working_pixels},
                "presets": memory.PRESETS}

    @app.get("/v1/models")
    async def list_models(
            refresh: bool = Query(False, description="Scan the model folders again now."),
            wait: float | None = Query(None, ge=0, le=MAX_SCAN_WAIT_S, description=(
                "Seconds to wait at most for a scan that is running or asked for; absent: "
                f"{FIRST_SCAN_WAIT_S:g} before the first scan has ended, else none."))) -> dict[str, Any]:
        """The last scan's result: never a scan on the request's own time (see models.discovery)."""
        scanner.start()
        ticket = scanner.refresh() if refresh else scanner.ticket()
        if wait is None:
            wait = FIRST_SCAN_WAIT_S if scanner.latest()[0] is None else 0.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not scanner.answered(ticket) and loop.time() < deadline:  # no thread waits: the loop polls
            await asyncio.sleep(0.02)
        result, running_since = scanner.latest()
        ids = [m.id for m in all_methods()]
        found = result.checkpoints if result is not None else []
        scan = result.to_json() if result is not None else {
            "complete": False, "notes": ["The first scan of the model folders has not ended yet."],
            "skipped": [], "skipped_total": 0}
        scan["running_since"] = running_since
        return {"default": settings.default_model,
                "models": models.available([c.to_json() for c in found], ids),
                "models_dir": str(discovery.models_dir()),
                "searched": list(result.searched) if result is not None else [],
                "scan": scan,
                "recommended": {m: (c.id if (c := discovery.recommended_for(
                                    m, found, lambda f, m=m: budget.fits(f, m))) else None)
                                for m in ids}}

    @app.get("/v1/methods")
    def list_methods() -> dict[str, Any]:
        return {"methods": [m.describe() for m in all_methods()], "unavailable": dict(UNAVAILABLE)}

    # -- images -------------------------------------------------------------------------
    @app.put("/v1/images/{sha}", status_code=201)
    async def put_image(sha: str, request: Request):
        check_sha(sha)
        p = who(request)
        limit = settings.limits.max_body_bytes
        length = request.headers.get("content-length", "").strip()
        if length.isascii() and length.isdigit() and int(length) > limit:
            raise too_large(f"The upload is {int(length)} bytes; the limit is {limit}.",
                            max_body_bytes=limit)
        quota = None if p.is_server else tokens.max_stored_bytes(p.painter)
        ctype = request.headers.get("content-type", "")
        encoding = check_encoding(request.headers.get("content-encoding", ""), ctype)

        def make_room(n: int) -> None:
            if quota is not None and not claims.claimed(p.owner, sha):
                claims.make_room(p.owner, n, quota, queue.pinned_images)

        w, h = _int_header(request, "x-image-width"), _int_header(request, "x-image-height")
        # what is kept: the body, or for a deflate-encoded raw upload the pixels it inflates to
        inflated = None
        if encoding and w is not None and h is not None:
            check_size(w, h, settings.limits)  # before room is made for it
            inflated = w * h * 4
        if inflated is not None or (length.isascii() and length.isdigit()):
            await asyncio.to_thread(make_room, inflated or int(length))  # before the body is read
        body = await _read_body(request, limit, f"The upload is over the limit of {limit} bytes.")

        def put():
            make_room(store.size_of(sha) or inflated or len(body))
            out = store.put_bytes(sha, body, ctype, w, h, encoding)
            claims.claim(p.owner, sha)
            return out

        info, created = await asyncio.to_thread(put)
        return SafeJSONResponse(info.to_json(), status_code=201 if created else 200)

    @app.head("/v1/images/{sha}")
    def head_image(sha: str, request: Request):
        check_sha(sha)
        info = store.info(sha) if image_visible(request, sha) else None
        if info is None:
            return Response(status_code=404)
        return Response(status_code=200, headers={"X-Image-Width": str(info.width),
                                                  "X-Image-Height": str(info.height)})

    @app.get("/v1/images/{sha}", response_class=Response)
    async def get_image(sha: str, request: Request, format: str = "png"):
        check_sha(sha)
        if format not in ("png", "rgba"):
            raise AnalogonError("bad_format", "format is png or rgba.", {"format": format}, status=400)
        if not image_visible(request, sha):
            raise store._not_found(sha)
        data, info = await asyncio.to_thread(store.get_bytes, sha, format)
        headers = {"X-Image-Width": str(info.width), "X-Image-Height": str(info.height)}
        if format == "rgba" and compress_for(request):
            import gzip

            # level 1: most of what is to gain on flat areas and transparent borders, at a
            # fraction of the time of the default level
            data = await asyncio.to_thread(gzip.compress, data, 1)
            headers.update({"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
        return Response(data, media_type=PNG if format == "png" else RGBA, headers=headers)

    def compress_for(request: Request) -> bool:
        accepts = "gzip" in request.headers.get("accept-encoding", "").lower()
        if not accepts or settings.compress_downloads == "never":
            return False
        if settings.compress_downloads == "always":
            return True
        host = request.client.host if request.client is not None else ""
        return host not in ("127.0.0.1", "::1", "localhost")

    # -- resumable uploads (server.uploads; docs/protocol.md, "Resumable uploads") ----------
    def upload_json(s) -> dict[str, Any]:
        out = {"id": s.id, "sha256": s.sha, "offset": s.offset, "length": s.length,
               "chunk_max": uploads.chunk_max, "complete": s.done, "expires": round(uploads.expires(s), 3)}
        if s.done:
            out.update(s.result[0].to_json())
        return out

    def upload_answer(s, status: int = 200) -> Response:
        return SafeJSONResponse(upload_json(s), status_code=status, headers={
            "Upload-Offset": str(s.offset), "Upload-Length": str(s.length), "Cache-Control": "no-store"})

    def offset_mismatch(s) -> AnalogonError:
        return AnalogonError("offset_mismatch", f"This upload holds {s.offset} bytes: send the next chunk "
                             f"at Upload-Offset {s.offset}.", {"offset": s.offset, "length": s.length},
                             status=409)

    @app.post("/v1/uploads", status_code=201)
    async def open_upload(request: Request):
        """Open a resumable upload (or find this token's open one for the same image)."""
        req = await _json_request(request, UploadRequest, "An upload")
        p = who(request)
        sha = check_sha(req.sha256)
        ctype = req.content_type.split(";")[0].strip().lower()
        encoding = check_encoding(req.encoding or "", ctype)
        if ctype not in (PNG, RGBA):
            raise AnalogonError("unsupported_media_type", f"Images are uploaded as {PNG} or {RGBA}, "
                                f"not {ctype or 'nothing'}.", {"content_type": ctype or None}, status=415)
        limit = settings.limits.max_body_bytes
        if req.length > limit:
            raise too_large(f"The upload is {req.length} bytes; the limit is {limit}.", max_body_bytes=limit)
        w, h, kept = None, None, req.length  # a PNG's size is read from the PNG itself
        if ctype == RGBA:
            if req.width is None or req.height is None:
                raise bad_image("Raw RGBA uploads need the width and height.")
            w, h = req.width, req.height
            check_size(w, h, settings.limits)
            kept = w * h * 4
            if not encoding and req.length != kept:
                raise bad_image(f"Raw RGBA for {w}\u00d7{h} pixels is {kept} bytes, not {req.length}.",
                                expected=kept, got=req.length)
        found = uploads.find(p.owner, sha, ctype, w, h, encoding, req.length)
        if found is not None:
            return upload_answer(found, 200)
        quota = None if p.is_server else tokens.max_stored_bytes(p.painter)
        if quota is not None:
            def make_room() -> None:
                if not claims.claimed(p.owner, sha):
                    claims.make_room(p.owner, kept, quota, queue.pinned_images, reserved=uploads.reserved(p.owner))

            await asyncio.to_thread(make_room)
        s = uploads.create(p.owner, sha, ctype, w, h, encoding, req.length, kept)
        answer = upload_answer(s, 201)
        answer.headers["Location"] = f"/v1/uploads/{s.id}"
        return answer

    @app.head("/v1/uploads/{upload_id}")
    async def upload_offset(upload_id: str, request: Request):
        try:
            s = uploads.get(upload_id, who(request).owner)
        except AnalogonError:
            return Response(status_code=404)
        return Response(status_code=200, headers={"Upload-Offset": str(s.offset), "Upload-Length": str(s.length),
                                                  "Cache-Control": "no-store"})

    @app.get("/v1/uploads/{upload_id}")
    async def upload_status(upload_id: str, request: Request):
        return upload_answer(uploads.get(upload_id, who(request).owner))

    @app.delete("/v1/uploads/{upload_id}", status_code=204)
    async def abandon_upload(upload_id: str, request: Request):
        uploads.remove(uploads.get(upload_id, who(request).owner))
        return Response(status_code=204)

    @app.put("/v1/uploads/{upload_id}")
    async def put_chunk(upload_id: str, request: Request):
        """Append a chunk at ``Upload-Offset``; the last one stores the image."""
        p = who(request)
        s = uploads.get(upload_id, p.owner)
        offset = _upload_offset(request)
        if s.finishing is not None or s.done:  # a client whose last answer was lost asks again
            if offset != s.length:
                raise offset_mismatch(s)
            if s.finishing is not None:
                await asyncio.shield(s.finishing)
            return upload_answer(s, 200)
        if offset != s.offset:
            raise offset_mismatch(s)
        room = min(uploads.chunk_max, s.length - s.offset)
        declared = request.headers.get("content-length", "").strip()
        if declared.isascii() and declared.isdigit() and int(declared) > room:
            raise too_large(f"This chunk is {int(declared)} bytes; the upload takes at most {room} more "
                            f"at offset {s.offset} (chunks of at most {uploads.chunk_max} bytes, "
                            f"{s.length} in all).", offset=s.offset, length=s.length, chunk_max=uploads.chunk_max)
        await write_chunk(s, request, room)
        if s.offset < s.length:
            return upload_answer(s, 200)
        return upload_answer(s, 201 if (await finish_upload(s, p))[1] else 200)

    async def write_chunk(s, request: Request, room: int) -> None:
        """The request's body appended to the session's file as it arrives (nothing held in
        memory). A newer PUT at the right offset takes over from one still open (a client that
        gave up on it): this one then writes nothing more. What arrived before a connection
        drops is kept: the client asks for the offset and goes on from there."""
        s.writer += 1
        me, start = s.writer, s.offset
        s.busy += 1
        try:
            fd = os.open(uploads.part(s), os.O_WRONLY | os.O_APPEND)
            try:
                async for piece in request.stream():
                    if s.writer != me:
                        raise offset_mismatch(s) if uploads.is_open(s) else not_found(s.id)
                    if s.offset + len(piece) - start > room:
                        os.ftruncate(fd, start)
                        s.offset = start
                        raise too_large(f"This chunk is over the {room} bytes the upload takes at offset "
                                        f"{start}.", offset=start, length=s.length, chunk_max=uploads.chunk_max)
                    view = memoryview(piece)
                    while view:
                        view = view[os.write(fd, view):]
                    s.offset += len(piece)
            except ClientDisconnect:
                raise AnalogonError("incomplete_body", "The connection closed before the chunk arrived; "
                                    f"the upload keeps the {s.offset} bytes that did.",
                                    {"offset": s.offset, "length": s.length}, status=400) from None
            finally:
                os.close(fd)
        finally:
            s.busy -= 1
            s.used = time.time()

    async def finish_upload(s, p):
        """Every byte is in: check and store the body as PUT /v1/images does. (image, created);
        a body that fails a check is dropped with its session."""
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # waiters are optional
        s.finishing = fut
        s.busy += 1
        quota = None if p.is_server else tokens.max_stored_bytes(p.painter)
        try:
            f = open(uploads.part(s), "rb")  # opened here: an abandon meanwhile cannot take it away

            def store_it():
                with f:
                    body = f.read()
                if quota is not None and not claims.claimed(p.owner, s.sha):
                    claims.make_room(p.owner, store.size_of(s.sha) or s.kept, quota, queue.pinned_images,
                                     reserved=uploads.reserved(p.owner, exclude=s))
                out = store.put_bytes(s.sha, body, s.content_type, s.width, s.height, s.encoding)
                claims.claim(p.owner, s.sha)
                return out

            result = await asyncio.to_thread(store_it)
        except BaseException as e:
            uploads.remove(s)
            if isinstance(e, Exception):
                fut.set_exception(e)
            else:
                fut.cancel()
            raise
        finally:
            s.busy -= 1
            s.finishing = None
        uploads.complete(s, result)
        fut.set_result(result)
        return result

    # -- jobs ---------------------------------------------------------------------------
    class _Visible:
        """The store as a painter sees it: only their own images (others read as missing)."""

        def __init__(self, request: Request):
            self.request = request

        def __contains__(self, sha: str) -> bool:
            return sha in store and image_visible(self.request, sha)

    @app.post("/v1/jobs", status_code=202)
    async def submit(request: Request):
        req = await _json_request(request, JobRequest, "A job")
        p = who(request)

        def prepare() -> dict[str, Any]:
            prepared = engine.prepare(req.method, req.params, req.images, req.model, req.seed,
                                      settings.default_model, source=store if p.is_server else _Visible(request))
            budget.check(memory.estimate(prepared, store, models))
            job = queue.submit(prepared, owner=p.owner,
                               max_active=None if p.is_server else tokens.max_queued(p.painter))
            return {"id": job.id, "status": job.status, "position": queue.position(job),
                    "seed": prepared.seed}

        return SafeJSONResponse(await asyncio.to_thread(prepare), status_code=202)

    @app.get("/v1/jobs")
    def list_jobs(request: Request) -> dict[str, Any]:
        """The caller's jobs that the server remembers, oldest first (the backend's own token:
        every painter's)."""
        return {"jobs": [queue.status_json(j) for j in queue.list(owner_filter(request))]}

    @app.get("/v1/jobs/{job_id}")
    def job_status(job_id: str, request: Request) -> dict[str, Any]:
        return queue.status_json(queue.get(job_id, owner_filter(request)))

    @app.delete("/v1/jobs/{job_id}")
    def cancel(job_id: str, request: Request) -> dict[str, Any]:
        job = queue.cancel(job_id, owner_filter(request))
        # a running job reports "running" until it stops at its next step, then "cancelled"
        return {"id": job.id, "status": job.status, "cancel_requested": job.cancel_requested.is_set()
                or job.status == "cancelled"}

    @app.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse)
    async def events(job_id: str, request: Request):
        job = queue.get(job_id, owner_filter(request))
        last = request.headers.get("last-event-id", "").strip()
        if last and _EVENT_ID_RE.fullmatch(last) is None:
            raise AnalogonError("bad_event_id", "Last-Event-ID is the id of an event of this job: a "
                                "whole number of at most 18 digits.", {"last_event_id": last[:40]}, status=400)
        start = int(last) if last else 0

        async def stream():
            ev = job.subscribe()
            seq = start
            try:
                while True:
                    ev.clear()
                    for n, kind, data in job.events_since(seq):
                        seq = n
                        yield f"id: {n}\nevent: {kind}\ndata: {_json_bytes(data).decode()}\n\n".encode()
                        if kind in TERMINAL:
                            return
                    try:
                        await asyncio.wait_for(ev.wait(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        yield b": keepalive\n\n"
            finally:
                job.unsubscribe(ev)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
             for e in errors[:5]]
    return "The request is not valid: " + "; ".join(parts) + "."


def _allowed_methods(app: FastAPI, scope) -> list[str]:
    """Every method some route takes at this path (Starlette names only the first route's)."""
    allowed: set[str] = set()
    for route in app.router.routes:
        methods = getattr(route, "methods", None)
        if not methods:
            continue
        match, _ = route.matches({**scope, "method": next(iter(methods))})
        if match == Match.FULL:
            allowed |= set(methods)
    return sorted(allowed)


async def _read_body(request: Request, limit: int, message: str) -> bytes:
    """The request's body as it streams in, refused (413 ``too_large``, ``message``) as soon as
    it passes ``limit`` bytes, before the rest is read. A client that goes away or stops sending
    (the server closes it after ``Settings.body_timeout_s``) gets ``400 incomplete_body``, which
    nobody reads: the connection is closed."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(message, max_body_bytes=limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise AnalogonError("incomplete_body", "The connection closed before the body arrived.",
                            status=400) from None
    return b"".join(chunks)


async def _json_request(request: Request, model: type[BaseModel], what: str) -> Any:
    """A JSON body as ``model``: Content-Type application/json (or ``+json``) else ``415``, at
    most MAX_JSON_BYTES, strict I-JSON (:func:`parse_json_body`), then ``model``'s checks
    (``422 invalid_params`` with pydantic's errors, located under ``body``)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise AnalogonError("unsupported_media_type", f"{what} is sent as application/json.",
                            {"content_type": ctype or None}, status=415)
    data = parse_json_body(await _read_body(request, MAX_JSON_BYTES,
                                            f"{what} body is at most {MAX_JSON_BYTES} bytes."))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = json.loads(_json_bytes(e.errors(include_url=False)))
        for err in errors:
            err["loc"] = ["body", *err.get("loc", [])]
        raise AnalogonError("invalid_params", _validation_message(errors), errors, status=422) from None


def _int_header(request: Request, name: str) -> int | None:
    v = request.headers.get(name)
    if v is None:
        return None
    if _DIGITS_RE.fullmatch(v) is None:
        raise AnalogonError("bad_image", f"The {name} header must be a whole number written with the "
                            "digits 0-9 only (at most 9 of them).", {name: v[:40]}, status=400)
    return int(v)


def _upload_offset(request: Request) -> int:
    """A chunk's ``Upload-Offset``: where in the body its first byte goes (``400 bad_offset``
    when it is missing or not a whole number of at most 18 ASCII digits)."""
    v = request.headers.get("upload-offset", "").strip()
    if _OFFSET_RE.fullmatch(v) is None:
        raise AnalogonError("bad_offset", "A chunk carries the Upload-Offset header: where its first byte "
                            "goes in the body, a whole number (HEAD /v1/uploads/{id} tells the offset).",
                            {"upload_offset": v[:40] or None}, status=400)
    return int(v)
