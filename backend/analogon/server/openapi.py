"""The OpenAPI document the server publishes: the contract (docs/protocol.md explains it).

FastAPI's generated document knows the routes; this module adds what the server really
does around them: the bearer-token scheme (every path but health), the id patterns, the
request bodies (images, and one job body per registered method with that method's own
parameter schema), the success bodies, and every error status with its JSON body
``{code, message, detail}``, so that a client generated from the document handles them.
"""
from __future__ import annotations

import copy
import json
from typing import Any

from .. import engine
from .store import PNG, RGBA, SHA_PATTERN
from .uploads import UPLOAD_ID_PATTERN

JOB_ID_PATTERN = "^[0-9a-f]{32}$"
EVENT_ID_PATTERN = "^[0-9]{0,18}$"
OFFSET_PATTERN = "^[0-9]{1,18}$"
CHUNK = "application/octet-stream"  # a chunk: bytes of the body as they are
JOB_STATUSES = ["queued", "running", "done", "error", "cancelled"]

ERROR = {"$ref": "#/components/schemas/Error"}


def _obj(props: dict[str, Any], required: list[str] | None = None, extra: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props,
                           "required": list(props) if required is None else required}
    if not extra:
        out["additionalProperties"] = False
    return out


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


STR = {"type": "string"}
INT = {"type": "integer"}
ANY: dict[str, Any] = {}

SCHEMAS: dict[str, Any] = {
    "Error": {
        **_obj({"code": {"type": "string", "pattern": "^[a-z0-9_]+$",
                         "description": "Stable, snake_case: see docs/protocol.md."},
                "message": {"type": "string", "description": "A sentence a painter can read."},
                "detail": {"description": "What the code needs: pydantic errors, the role, the limits, ..."}}),
        "description": "Every error the server answers with.",
    },
    "Limits": _obj({"max_body_bytes": INT, "max_side": INT, "max_pixels": INT,
                    "upload_chunk_max_bytes": {"type": "integer", "description": "Resumable uploads: the "
                                               "largest chunk one PUT /v1/uploads/{id} takes."},
                    "upload_max_age_s": {"type": "number", "description": "Resumable uploads: how long an "
                                         "unfinished one is kept after its last chunk."}},
                   ["max_body_bytes", "max_side", "max_pixels"]),
    "Health": _obj({
        "status": {"type": "string", "enum": ["ok"]}, "version": STR, "device": STR, "dtype": STR,
        "memory": {"type": "object", "additionalProperties": {"type": "integer"}},
        "loaded_models": {"type": "array", "items": STR}, "default_model": STR,
        "queue": {"type": "integer", "minimum": 0}, "limits": {"$ref": "#/components/schemas/Limits"},
        "pid": INT,
        "devices": {"type": "array", "items": STR, "description": "One worker per device."},
        "workers": {"type": "array", "items": _obj({"id": INT, "device": STR, "busy": {"type": "boolean"},
                                                    "jobs_run": INT})},
        "tls": _obj({"enabled": {"type": "boolean"},
                     "fingerprint_sha256": {"type": "string", "pattern": "^([0-9A-F]{2}:){31}[0-9A-F]{2}$",
                                            "description": "With a valid token only."},
                     "self_signed": {"type": "boolean"}}, ["enabled"]),
        "authenticated": {"type": "boolean", "description": "Whether the request carried a valid token."},
        "painter": _nullable(_obj({"name": STR, "max_queued": INT, "max_stored_bytes": INT,
                                   "active_jobs": INT, "stored_bytes": INT})),
    }, ["status", "version", "device", "dtype", "memory", "loaded_models", "default_model", "queue",
        "limits", "pid"]),
    "Model": _obj({"id": STR, "family": _nullable(STR), "source": STR, "loaded": {"type": "boolean"}}),
    "Models": _obj({"default": STR, "models": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
                    "scan": _obj({"complete": {"type": "boolean"}, "notes": {"type": "array", "items": STR},
                                  "skipped": {"type": "array", "items": _obj({"path": STR, "reason": STR})},
                                  "skipped_total": {"type": "integer", "minimum": 0},
                                  "running_since": _nullable({"type": "number"})})}),
    "UploadRequest": _obj({
        "sha256": {"type": "string", "pattern": SHA_PATTERN, "description": "The image's id, as for "
                                                                            "PUT /v1/images/{sha}."},
        "content_type": {"type": "string", "enum": [PNG, RGBA]},
        "length": {"type": "integer", "minimum": 1, "description": "The body's bytes in all, as sent."},
        "width": _nullable({"type": "integer", "minimum": 1, "description": "Raw RGBA: the width."}),
        "height": _nullable({"type": "integer", "minimum": 1, "description": "Raw RGBA: the height."}),
        "encoding": _nullable({"type": "string", "enum": ["deflate", "identity"],
                               "description": "deflate: raw RGBA sent as a zlib stream."}),
    }, ["sha256", "content_type", "length"], extra=False),
    "Upload": _obj({
        "id": {"type": "string", "pattern": UPLOAD_ID_PATTERN}, "sha256": {"type": "string", "pattern": SHA_PATTERN},
        "offset": {"type": "integer", "minimum": 0, "description": "The bytes the server holds: the next "
                                                                   "chunk's Upload-Offset."},
        "length": {"type": "integer", "minimum": 1}, "chunk_max": {"type": "integer", "minimum": 1},
        "complete": {"type": "boolean", "description": "The image is stored (then sha, width and height "
                                                       "are given)."},
        "expires": {"type": "number", "description": "When the server drops it unless a chunk comes (Unix time)."},
        "sha": {"type": "string", "pattern": SHA_PATTERN}, "width": INT, "height": INT,
    }, ["id", "sha256", "offset", "length", "chunk_max", "complete", "expires"]),
    "DownloadRequest": _obj({"model": {"type": "string", "description": "A recommended model's id, from "
                                                                        "/v1/downloads/catalog."}}, extra=False),
    "Role": _obj({"name": STR, "title": STR, "kind": {"type": "string", "enum": ["image", "map", "mask"]},
                  "required": {"type": "boolean"}, "multiple": {"type": "boolean"}, "help": STR,
                  "canvas": _nullable(STR)}),
    "MethodInfo": _obj({"id": STR, "title": STR, "description": STR, "help": STR, "target_role": STR,
                        "roles": {"type": "array", "items": {"$ref": "#/components/schemas/Role"}},
                        "params": {"type": "object", "description": "The method's parameters as JSON schema."}}),
    "Methods": _obj({"methods": {"type": "array", "items": {"$ref": "#/components/schemas/MethodInfo"}},
                     "unavailable": {"type": "object", "additionalProperties": STR}}),
    "ImageInfo": _obj({"sha": {"type": "string", "pattern": SHA_PATTERN},
                       "width": {"type": "integer", "minimum": 1}, "height": {"type": "integer", "minimum": 1}}),
    "ImageRef": {"anyOf": [
        {"type": "string", "pattern": SHA_PATTERN},
        _obj({"sha": {"type": "string", "pattern": SHA_PATTERN}, "x": INT, "y": INT,
              "scale": {"type": "number", "exclusiveMinimum": 0, "maximum": 64}}, ["sha"], extra=False),
    ], "description": "A stored image's id, or the id placed at (x, y) with a scale."},
    "JobSubmitted": _obj({"id": {"type": "string", "pattern": JOB_ID_PATTERN},
                          "status": {"type": "string", "enum": ["queued"]},
                          "position": _nullable({"type": "integer", "minimum": 0}),
                          "seed": {"type": "integer", "minimum": 0, "maximum": engine.MAX_SEED}}),
    "ResultImage": _obj({"sha": {"type": "string", "pattern": SHA_PATTERN}, "width": INT, "height": INT,
                         "label": STR}, ["sha", "width", "height"]),
    "JobResult": _obj({"images": {"type": "array", "items": {"$ref": "#/components/schemas/ResultImage"}},
                       "seed": INT, "params": {"type": "object"}, "model": STR, "info": ANY,
                       "timings": {"type": "object"}}, ["images", "seed", "params", "model"]),
    "JobStatus": _obj({"id": {"type": "string", "pattern": JOB_ID_PATTERN}, "method": STR,
                       "status": {"type": "string", "enum": JOB_STATUSES}, "model": STR, "seed": INT,
                       "owner": _nullable(STR), "position": {"type": "integer", "minimum": 0},
                       "worker": {"type": "integer", "minimum": 0}, "device": STR,
                       "result": {"$ref": "#/components/schemas/JobResult"}, "error": ERROR},
                      ["id", "method", "status", "model", "seed"]),
    "JobList": _obj({"jobs": {"type": "array", "items": {"$ref": "#/components/schemas/JobStatus"}}}),
    "CancelAnswer": _obj({"id": {"type": "string", "pattern": JOB_ID_PATTERN},
                          "status": {"type": "string", "enum": JOB_STATUSES},
                          "cancel_requested": {"type": "boolean"}}),
}

# what each operation answers besides success (401 and 403 are added where they apply)
ERRORS: dict[tuple[str, str], dict[int, str]] = {
    ("/v1/health", "get"): {},
    ("/v1/health", "head"): {},
    ("/v1/models", "get"): {422: "`invalid_params`: `refresh` is not true or false, or `wait` is not a "
                                 "number of seconds from 0 to 10."},
    ("/v1/methods", "get"): {},
    ("/v1/images/{sha}", "put"): {
        400: "`bad_sha`, `bad_image` (not a PNG, cut short, wrong length, size headers missing or "
             "not whole numbers), `hash_mismatch`.",
        413: "`too_large`: the body or the pixel count is over the limits (`detail` has them); "
             "`storage_quota`: a painter's token would pass its limit of stored images (`detail`: "
             "`stored_bytes`, `upload_bytes`, `max_stored_bytes`).",
        415: "`unsupported_media_type`: Content-Type is neither image/png nor "
             "application/x-analogon-rgba (or is missing), or a Content-Encoding other than "
             "deflate (raw RGBA only)."},
    ("/v1/images/{sha}", "head"): {400: "`bad_sha` (no body: HEAD).", 404: "Not stored (no body: HEAD)."},
    ("/v1/images/{sha}", "get"): {400: "`bad_sha`, `bad_format`.", 404: "`image_not_found`."},
    ("/v1/uploads", "post"): {
        400: "`bad_json` (as for a job's body), `bad_sha`, `bad_image` (raw RGBA without a width and "
             "height, or whose length is not width*height*4).",
        413: "`too_large`: the declared length or pixel count is over the limits; `storage_quota`: a "
             "painter's token would pass its limit of stored images (open uploads count).",
        415: "`unsupported_media_type`: a content type other than image/png or "
             "application/x-analogon-rgba, or an encoding other than deflate (raw RGBA only); "
             "the request's own Content-Type is not application/json.",
        422: "`invalid_params`: the body is not `{sha256, content_type, length, width?, height?, encoding?}`."},
    ("/v1/uploads/{upload_id}", "put"): {
        400: "`bad_offset`: no Upload-Offset, or not a whole number; `incomplete_body`: the connection "
             "closed (the bytes that arrived are kept); when the last byte is in, `hash_mismatch` or "
             "`bad_image` (the upload is dropped).",
        404: "`upload_not_found`: expired, finished long ago, abandoned, or another token's.",
        409: "`offset_mismatch`: Upload-Offset is not the offset the server holds (`detail`: `offset`, "
             "`length`).",
        413: "`too_large`: the chunk passes the declared length or `chunk_max` (`detail`); "
             "`storage_quota` when the image is stored.",
        415: "`unsupported_media_type`: when the last byte is in, as for PUT /v1/images."},
    ("/v1/uploads/{upload_id}", "head"): {404: "Not open for this token (no body: HEAD)."},
    ("/v1/uploads/{upload_id}", "get"): {404: "`upload_not_found`."},
    ("/v1/uploads/{upload_id}", "delete"): {404: "`upload_not_found`."},
    ("/v1/jobs", "post"): {
        400: "`bad_json`: not JSON, not UTF-8, NaN/Infinity, a number outside ±2^53 or ±1.8e308, "
             "a lone surrogate, a name twice in one object, nesting deeper than 64.",
        404: "`unknown_method`, `image_not_found` (`detail.missing` lists the ids).",
        413: "`too_large`: a body over 1 MiB; `out_of_memory`: the job would need more memory than "
             "there is (`detail` has the estimate).",
        415: "`unsupported_media_type`: Content-Type is missing or not application/json.",
        422: "`invalid_params` (`detail`: pydantic errors), `invalid_images` (`detail.role`).",
        429: "`too_many_jobs`: a painter's token has as many jobs queued or running as it may "
             "(`detail`: `active`, `max_queued`).",
        503: "`shutting_down`."},
    ("/v1/jobs", "get"): {},
    ("/v1/jobs/{job_id}", "get"): {404: "`job_not_found`."},
    ("/v1/jobs/{job_id}", "delete"): {404: "`job_not_found`."},
    ("/v1/jobs/{job_id}/events", "get"): {
        400: "`bad_event_id`: Last-Event-ID is not a whole number of at most 18 digits.",
        404: "`job_not_found`."},
    ("/v1/system", "get"): {},
    ("/v1/downloads/catalog", "get"): {},
    ("/v1/downloads", "post"): {
        400: "`bad_json`: not I-JSON, as for a job's body.",
        403: "`painter_not_allowed`: a painter's token cannot download models (or `forbidden_host`).",
        404: "`unknown_download`: not a recommended model's id.",
        413: "`too_large`: a body over 1 MiB.",
        415: "`unsupported_media_type`: Content-Type is missing or not application/json.",
        422: "`invalid_params`: the body is not `{model}`.",
        502: "`download_failed`, `no_checksum`: the hub cannot be reached or gives no SHA-256.",
        503: "`shutting_down`."},
    ("/v1/downloads/{download_id}", "get"): {404: "`download_not_found`."},
    ("/v1/downloads/{download_id}", "delete"): {
        403: "`painter_not_allowed`: a painter's token cannot cancel downloads (or `forbidden_host`).",
        404: "`download_not_found`."},
    ("/v1/downloads/verify", "post"): {
        400: "`bad_json`: not I-JSON, as for a job's body.",
        403: "`painter_not_allowed`: a painter's token cannot verify models (or `forbidden_host`).",
        404: "`unknown_download`: not a recommended model's id; `model_not_found`: no such file, or "
             "a path that is not one of the entry's `on_disk` checkpoints.",
        409: "`no_checksum`: no SHA-256 is pinned for that model.",
        413: "`too_large`: a body over 1 MiB.",
        415: "`unsupported_media_type`: Content-Type is missing or not application/json.",
        422: "`invalid_params`: the body is not `{model, path?}`.",
        503: "`shutting_down`."},
}

_OBJECT = {"application/json": {"schema": {"type": "object"}}}

SUCCESS: dict[tuple[str, str], dict[int, dict[str, Any]]] = {
    ("/v1/system", "get"): {200: {"description": "The device, its memory, the memory settings in "
                                                 "force and the presets.", "content": _OBJECT}},
    ("/v1/downloads/catalog", "get"): {200: {"description": "The recommended models and the models "
                                                           "folder.", "content": _OBJECT}},
    ("/v1/downloads", "post"): {202: {"description": "The download started (or the one already "
                                                     "running for that model).", "content": _OBJECT}},
    ("/v1/downloads/{download_id}", "get"): {200: {"description": "The download's state and progress.",
                                                   "content": _OBJECT}},
    ("/v1/downloads/{download_id}", "delete"): {200: {"description": "Cancel requested.",
                                                      "content": _OBJECT}},
    ("/v1/downloads/verify", "post"): {200: {"description": "The file's SHA-256 against the "
                                                            "publisher's: {id, path, size_bytes, "
                                                            "sha256, expected, ok}.",
                                             "content": _OBJECT}},
    ("/v1/health", "get"): {200: {"description": "The backend's state (no token needed).",
                                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}}},
    ("/v1/health", "head"): {200: {"description": "The backend answers (no token needed)."}},
    ("/v1/models", "get"): {200: {"description": "Models.", "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/Models"}}}}},
    ("/v1/methods", "get"): {200: {"description": "Methods, with their roles and parameter schemas.", "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/Methods"}}}}},
    ("/v1/images/{sha}", "put"): {
        201: {"description": "Stored.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ImageInfo"}}}},
        200: {"description": "Already stored (no-op).", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ImageInfo"}}}}},
    ("/v1/images/{sha}", "head"): {200: {"description": "Stored.", "headers": {
        "X-Image-Width": {"schema": {"type": "string", "pattern": "^[0-9]+$"}},
        "X-Image-Height": {"schema": {"type": "string", "pattern": "^[0-9]+$"}}}}},
    ("/v1/images/{sha}", "get"): {200: {"description": "The image: PNG, or raw RGBA8 with `format=rgba`.",
                                        "headers": {"X-Image-Width": {"schema": {"type": "string"}},
                                                    "X-Image-Height": {"schema": {"type": "string"}}},
                                        "content": {PNG: {"schema": {"type": "string", "format": "binary"}},
                                                    RGBA: {"schema": {"type": "string", "format": "binary"}}}}},
    ("/v1/uploads", "post"): {
        201: {"description": "Opened: send the chunks to /v1/uploads/{id} (Location).",
              "headers": {"Location": {"schema": {"type": "string"}}},
              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Upload"}}}},
        200: {"description": "This token's open upload of the same image (go on at its offset).",
              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Upload"}}}}},
    ("/v1/uploads/{upload_id}", "put"): {
        200: {"description": "The chunk is in (`complete` false), or the image was stored already.",
              "headers": {"Upload-Offset": {"schema": {"type": "string", "pattern": OFFSET_PATTERN}}},
              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Upload"}}}},
        201: {"description": "The last chunk: the image is stored (`complete` true, `sha`, `width`, `height`).",
              "headers": {"Upload-Offset": {"schema": {"type": "string", "pattern": OFFSET_PATTERN}}},
              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Upload"}}}}},
    ("/v1/uploads/{upload_id}", "head"): {200: {"description": "Open.", "headers": {
        "Upload-Offset": {"schema": {"type": "string", "pattern": OFFSET_PATTERN}},
        "Upload-Length": {"schema": {"type": "string", "pattern": OFFSET_PATTERN}}}}},
    ("/v1/uploads/{upload_id}", "get"): {200: {"description": "The upload's offset and state.", "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/Upload"}}}}},
    ("/v1/uploads/{upload_id}", "delete"): {204: {"description": "Abandoned: the bytes received are removed."}},
    ("/v1/jobs", "post"): {202: {"description": "Queued.", "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/JobSubmitted"}}}}},
    ("/v1/jobs", "get"): {200: {"description": "The caller's jobs the server remembers, oldest first "
                                               "(the backend's own token: every painter's).", "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/JobList"}}}}},
    ("/v1/jobs/{job_id}", "get"): {200: {"description": "The job.", "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/JobStatus"}}}}},
    ("/v1/jobs/{job_id}", "delete"): {200: {"description": "Cancel requested (a finished job is left as it is).",
                                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CancelAnswer"}}}}},
    ("/v1/jobs/{job_id}/events", "get"): {200: {
        "description": "Server-sent events: `id`, `event` (queued, started, progress, preview, done, error, "
                       "cancelled) and `data` (JSON); ends after the terminal event.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
}

PATH_PARAMS = {
    "sha": {"name": "sha", "in": "path", "required": True, "description": "The image's id (docs/protocol.md).",
            "schema": {"type": "string", "pattern": SHA_PATTERN}},
    "upload_id": {"name": "upload_id", "in": "path", "required": True,
                  "description": "An upload id from POST /v1/uploads.",
                  "schema": {"type": "string", "pattern": UPLOAD_ID_PATTERN}},
    "job_id": {"name": "job_id", "in": "path", "required": True, "description": "A job id from POST /v1/jobs.",
               "schema": {"type": "string", "pattern": JOB_ID_PATTERN}},
}


def _hoist(schema: dict[str, Any], prefix: str, components: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` moved into the components."""
    schema = copy.deepcopy(schema)
    defs = schema.pop("$defs", {})
    text = json.dumps(schema)
    for name in defs:
        text = text.replace(f'"#/$defs/{name}"', f'"#/components/schemas/{prefix}{name}"')
    for name, d in defs.items():
        d_text = json.dumps(d)
        for other in defs:
            d_text = d_text.replace(f'"#/$defs/{other}"', f'"#/components/schemas/{prefix}{other}"')
        components[prefix + name] = json.loads(d_text)
    return json.loads(text)


def _job_body(methods: list, components: dict[str, Any]) -> dict[str, Any]:
    variants = []
    for m in methods:
        prefix = "".join(p.capitalize() for p in m.id.replace("-", "_").split("_"))
        params = _hoist(m.Params.model_json_schema(), prefix, components)
        components[f"{prefix}Params"] = params
        roles = {}
        for r in m.all_roles():
            ref = {"$ref": "#/components/schemas/ImageRef"}
            roles[r.name] = {"anyOf": [ref, {"type": "array", "items": ref,
                                             **({} if r.multiple else {"maxItems": 1})}]}
        components[f"{prefix}Job"] = {
            "type": "object", "title": f"{m.title} job", "additionalProperties": False,
            "required": ["method"] + (["images"] if any(r.required for r in m.all_roles()) else []),
            "properties": {
                "method": {"type": "string", "enum": [m.id]},
                "model": _nullable({"type": "string", "description": "Model spec; absent: the server's default."}),
                "seed": _nullable({"type": "integer", "minimum": 0, "maximum": engine.MAX_SEED}),
                "params": {"$ref": f"#/components/schemas/{prefix}Params"},
                "images": {"type": "object", "properties": roles, "additionalProperties": False},
            }}
        variants.append({"$ref": f"#/components/schemas/{prefix}Job"})
    return {"oneOf": variants} if variants else {"type": "object"}


def build(base: dict[str, Any], methods: list) -> dict[str, Any]:
    """The published document, from FastAPI's ``base`` (routes) and the registered methods."""
    doc = copy.deepcopy(base)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(copy.deepcopy(SCHEMAS))
    components["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "The token the backend wrote to server.json in its state folder (mode 0600)."}}
    doc["security"] = [{"bearer": []}]
    schemas["JobRequest"] = _job_body(methods, schemas)
    for path, ops in doc.get("paths", {}).items():
        for verb, op in ops.items():
            key = (path, verb)
            if key not in ERRORS:
                continue
            op["parameters"] = [PATH_PARAMS[p["name"]] if p.get("in") == "path" and p["name"] in PATH_PARAMS
                                else p for p in op.get("parameters", [])]
            responses: dict[str, Any] = {str(s): v for s, v in SUCCESS.get(key, {}).items()}
            errors = dict(ERRORS[key])
            if path == "/v1/health":
                op["security"] = []
            else:
                errors[401] = "`unauthorized`: the token is missing, wrong or revoked."
            errors.setdefault(403, "`forbidden_host`: the Host header is not a loopback name.")
            errors[500] = "`internal_error`: a fault of the backend (never the caller's input)."
            for status, text in sorted(errors.items()):
                r: dict[str, Any] = {"description": text}
                if verb != "head":
                    r["content"] = {"application/json": {"schema": ERROR}}
                if status == 401:
                    r["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
                responses[str(status)] = r
            op["responses"] = responses
    images = doc["paths"].get("/v1/images/{sha}", {})
    if "put" in images:
        images["put"]["requestBody"] = {"required": True, "content": {
            PNG: {"schema": {"type": "string", "format": "binary"}},
            RGBA: {"schema": {"type": "string", "format": "binary"}}}}
        images["put"]["parameters"] = [PATH_PARAMS["sha"]] + [
            {"name": h, "in": "header", "required": False,
             "description": "Raw RGBA uploads: the image's size in pixels.",
             "schema": {"type": "string", "pattern": "^[0-9]{1,9}$"}} for h in ("X-Image-Width", "X-Image-Height")] + [
            {"name": "Content-Encoding", "in": "header", "required": False,
             "description": "`deflate`: a raw RGBA body compressed as a zlib stream (RFC 1950), "
                            "exactly width*height*4 bytes once inflated. PNG bodies take none.",
             "schema": {"type": "string", "enum": ["deflate", "identity"]}}]
    if "get" in images:
        images["get"]["parameters"] = [PATH_PARAMS["sha"], {
            "name": "format", "in": "query", "required": False,
            "schema": {"type": "string", "enum": ["png", "rgba"], "default": "png"}}]
    chunk = doc["paths"].get("/v1/uploads/{upload_id}", {})
    if "put" in chunk:
        chunk["put"]["requestBody"] = {"required": True, "content": {
            CHUNK: {"schema": {"type": "string", "format": "binary"}}}}
        chunk["put"]["parameters"] = [PATH_PARAMS["upload_id"], {
            "name": "Upload-Offset", "in": "header", "required": True,
            "description": "Where the chunk's first byte goes in the body: the offset the server holds.",
            "schema": {"type": "string", "pattern": OFFSET_PATTERN}}]
    for path, schema in (("/v1/jobs", "JobRequest"), ("/v1/downloads", "DownloadRequest"),
                         ("/v1/uploads", "UploadRequest")):
        if "post" in doc["paths"].get(path, {}):
            doc["paths"][path]["post"]["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}
    ev = doc["paths"].get("/v1/jobs/{job_id}/events", {})
    if "get" in ev:
        ev["get"]["parameters"] = [PATH_PARAMS["job_id"], {
            "name": "Last-Event-ID", "in": "header", "required": False,
            "description": "Resume after this event id (a reconnecting client sends the last `id:` it read).",
            "schema": {"type": "string", "pattern": EVENT_ID_PATTERN}}]
    return doc
