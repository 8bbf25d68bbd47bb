"""The `analogon` command: serve | tokens | run | demo | doctor | bench | train-toy | build-random."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .errors import AnalogonError

log = logging.getLogger("analogon")


def _die(message: str, code: int = 2) -> int:
    print(f"analogon: {message}", file=sys.stderr)
    return code


def _add_model_options(p: argparse.ArgumentParser, model_default: str | None) -> None:
    p.add_argument("--model", default=model_default,
                   help="model: toy-sd, toy-sd-64, tiny-sd, tiny-sdxl, a local diffusers folder, a single "
                        ".safetensors checkpoint, or a Hugging Face repo id already in the local cache")
    p.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the best available)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="default: float16 on GPUs, float32 on CPU")
    p.add_argument("--memory-preset", choices=["auto", "cpu", "low", "medium", "high"],
                   help="settings for the machine's size: auto (from the GPU's memory), cpu, low "
                        "(GPU <= 6 GB), medium (<= 12 GB), high; the options below override it")
    p.add_argument("--cpu-offload", action=argparse.BooleanOptionalAction, default=None,
                   help="keep idle model parts in CPU memory (small GPUs)")
    p.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=None,
                   help="decode large images in tiles (small GPUs)")
    p.add_argument("--max-pixels", type=int, metavar="N",
                   help="the largest area the high-resolution pass works at, in pixels")
    p.add_argument("--cache-dir", help="folder for cached inversions (default: ~/.cache/analogon; "
                                       "'' keeps them in memory only)")
    p.add_argument("--prediction", action="append", default=[], type=_prediction_arg,
                   metavar="[MODEL=]eps|v",
                   help="SD 2.x: epsilon (2.x-base, 512 px) or v-prediction (2.x-v, 768 px) for MODEL "
                        "(a model spec as given to --model or in a job), or for every SD 2.x model "
                        "without MODEL=; repeatable. Default: the file's metadata or its .yaml, "
                        "else a one-step probe of the UNet at load")


def _prediction_arg(value: str) -> tuple[str, str]:
    """``[MODEL=]eps|v`` -> (model spec or "*", epsilon | v_prediction)."""
    from .errors import ModelError
    from .models.single_file import normalise_prediction

    model, _, kind = str(value).rpartition("=")
    try:
        return (model.strip() or "*", normalise_prediction(kind))
    except ModelError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _predictions(args) -> dict[str, str]:
    return dict(getattr(args, "prediction", None) or [])


def _base_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="analogon", description="Example-based image editing backend for Krita.")
    p.add_argument("--version", action="version", version=f"analogon {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="run the local backend server for the Krita plugin")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=7871, help="port (default 7871; 0 picks a free one)")
    s.add_argument("--state-dir", help="where server.json (address + token) and images are kept")
    s.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                   help="a folder with checkpoints to list (repeatable); the usual places (ComfyUI, "
                        "Automatic1111/Forge, Krita AI Diffusion, the Hugging Face cache) are searched too")
    s.add_argument("--no-usual-places", action="store_true",
                   help="list checkpoints from --models-dir only")
    s.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host and any Host header (exposes the backend; needs "
                        "TLS, or --insecure; see docs/studio.md)")
    s.add_argument("--tls", action="store_true",
                   help="serve HTTPS with a self-signed certificate made on the first start in the state "
                        "folder (tls/); its SHA-256 fingerprint is printed at every start")
    s.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM; with --tls-key)")
    s.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    s.add_argument("--insecure", action="store_true",
                   help="with --allow-remote: start without TLS anyway (tokens and images cross the "
                        "network in clear)")
    s.add_argument("--devices", metavar="LIST",
                   help="one worker per device, all drawing from one queue, e.g. cuda:0,cuda:1 "
                        "(default: one worker on --device)")
    s.add_argument("--painter-max-queued", type=int, default=16, metavar="N",
                   help="jobs a painter's token may have queued or running at once, unless the token "
                        "sets its own (default 16)")
    s.add_argument("--painter-max-stored", type=_size_arg, default="2G", metavar="SIZE",
                   help="images a painter's token may keep on the server, unless the token sets its own "
                        "(default 2G)")
    s.add_argument("--compress-downloads", choices=("auto", "always", "never"), default="auto",
                   help="raw RGBA results sent gzip-compressed to clients that accept it: auto = to "
                        "clients beyond loopback only (default), always, never")
    s.add_argument("--image-store-cap", type=_size_arg, default="8G", metavar="SIZE",
                   help="most disk the image store uses, e.g. 500M or 8G (default 8G); downloaded "
                        "results go first, then results, then uploads, oldest used first")
    s.add_argument("--result-max-age-days", type=float, default=7.0, metavar="DAYS",
                   help="results unused for this long are removed (default 7; 0: only the cap)")
    s.add_argument("--cache-cap", type=_size_arg, default="4G", metavar="SIZE",
                   help="most disk the inversion cache uses (default 4G)")
    s.add_argument("--parent-pid", type=int, default=None,
                   help="stop when this process ends (the Krita plugin passes Krita's pid)")
    _add_model_options(s, "tiny-sd")

    tk = sub.add_parser("tokens", help="painters' tokens for a shared (studio) backend: create, list, revoke")
    tk.add_argument("--state-dir", help="the backend's state folder (default: as for serve)")
    tsub = tk.add_subparsers(dest="tokens_command", metavar="ACTION")
    tc = tsub.add_parser("create", help="make a token for a painter and print it (once: only its hash is kept)")
    tc.add_argument("name", help="the painter's name (letters, digits, . _ -)")
    tc.add_argument("--max-queued", type=int, metavar="N",
                    help="jobs queued or running at once (default: the server's --painter-max-queued)")
    tc.add_argument("--max-stored", type=_size_arg, metavar="SIZE",
                    help="images kept on the server, e.g. 500M (default: the server's --painter-max-stored)")
    tl = tsub.add_parser("list", help="the painters and their tokens' state (never the tokens)")
    tr = tsub.add_parser("revoke", help="revoke a painter's token (a running backend notices at once)")
    tr.add_argument("name")
    for action in (tc, tl, tr):  # after the action too: analogon tokens list --state-dir DIR
        action.add_argument("--state-dir", default=argparse.SUPPRESS, help="the backend's state folder")

    r = sub.add_parser("run", help="run one method on image files: analogon run METHOD --help",
                       add_help=False)
    r.add_argument("method", nargs="?", help="method id (see `analogon run --list`)")
    r.add_argument("--list", action="store_true", help="list the methods")
    r.add_argument("-h", "--help", action="store_true")

    d = sub.add_parser("demo", help="every method on sample images; results, contact sheet, timings")
    d.add_argument("-o", "--output", default="out/demo", help="output folder (default out/demo)")
    d.add_argument("--methods", help="comma-separated method ids (default: all)")
    d.add_argument("--size", type=int, default=None, help="sample image size (default: the model's native size)")
    d.add_argument("--seed", type=int, default=0)
    _add_model_options(d, None)

    dr = sub.add_parser("doctor", help="what is installed: versions, device, memory, Krita, the plugin, "
                                       "and whether a backend answers (also one with TLS: --fingerprint)")
    dr.add_argument("--url", help="the backend to check, e.g. https://gpu-box:7871 (default: the one in "
                                  "server.json)")
    dr.add_argument("--token", help="a token to send it (default: server.json's, for the backend it names)")
    dr.add_argument("--fingerprint", type=_fingerprint_arg, metavar="SHA256",
                    help="the SHA-256 fingerprint of its TLS certificate (as the backend prints it): a "
                         "self-signed certificate is accepted only when it is exactly this one (default: "
                         "server.json's tls_fingerprint_sha256)")
    dr.add_argument("--state-dir", help="the backend's state folder, where server.json is (default: as for serve)")

    g = sub.add_parser("download", help="download a recommended checkpoint into the models folder")
    g.add_argument("model", nargs="?", help="its id (see --list)")
    g.add_argument("--list", action="store_true", help="the recommended checkpoints")
    g.add_argument("--to", help="models folder (default: the backend's models folder)")

    b = sub.add_parser("bench", help="benchmarks (sections: see --list); --quality runs the quality suite; "
                                      "--suite gpu the GPU comparisons in one run (JSON + Markdown)",
                       add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)

    t = sub.add_parser("train-toy", help="train the toy-world model (toy-sd)", add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER)

    br = sub.add_parser("build-random", help="a full-size SD 1.5 / SD 2.1 / SDXL folder with random "
                                             "weights, offline (for measuring costs, never quality)")
    br.add_argument("family", choices=["sd15", "sd21", "sdxl"])
    br.add_argument("folder", help="where to write it (must not hold a model yet)")
    br.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                    help="weights as saved (default float32; loading still takes --dtype)")
    br.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _base_parser()
    # bench and train-toy hand their arguments on untouched (argparse would reorder them)
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    passthrough = None
    if first is not None and argv[first] in ("bench", "train-toy"):
        argv, passthrough = argv[: first + 1], argv[first + 1:]
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "run":
            return cmd_run(args, extra)
        if args.command in ("bench", "train-toy"):
            rest = passthrough if passthrough is not None else list(args.rest) + extra
            return cmd_bench(rest) if args.command == "bench" else cmd_train_toy(rest)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return {"serve": cmd_serve, "tokens": cmd_tokens, "demo": cmd_demo, "doctor": cmd_doctor,
                "download": cmd_download, "build-random": cmd_build_random}[args.command](args)
    except AnalogonError as e:
        return _die(f"{e.message} [{e.code}]", 1)
    except KeyboardInterrupt:
        return 130


# -- serve -----------------------------------------------------------------------------------

def _cache_dir_arg(value: str | None):
    if value is None:
        return None
    return "" if value == "" else Path(value).expanduser()


def _size_arg(value: str) -> int:
    """A size in bytes: 1234, 500K, 500M, 8G, 1T (binary units)."""
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    try:
        if text and text[-1] in units:
            n = float(text[:-1]) * units[text[-1]]
        else:
            n = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a size (e.g. 500M, 8G)") from None
    if not n >= 0 or n != n or n == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a size (e.g. 500M, 8G)")
    return int(n)


def _memory(args):
    """The memory settings: the preset's, overridden by explicit options."""
    from .memory import resolve

    return resolve(args.memory_preset, device=args.device, dtype=args.dtype, cpu_offload=args.cpu_offload,
                   vae_tiling=args.vae_tiling, max_pixels=args.max_pixels)


def _settings_from_args(args, mem):
    from .server import Settings
    from .server.workers import parse_devices

    age = args.result_max_age_days
    devices = parse_devices(args.devices) if args.devices else None
    if devices and args.device:
        raise AnalogonError("bad_device", "Give --devices or --device, not both.")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise AnalogonError("tls_missing_file", "--tls-cert and --tls-key go together: give both.")
    return Settings(
        host=args.host, port=args.port,
        state_dir=Path(args.state_dir).expanduser() if args.state_dir else None,
        default_model=args.model, device=devices[0] if devices else mem.device, dtype=mem.dtype,
        cpu_offload=mem.cpu_offload, vae_tiling=mem.vae_tiling,
        max_working_pixels=mem.max_pixels, memory_preset=mem.preset,
        cache_dir=_cache_dir_arg(args.cache_dir), allow_remote=args.allow_remote,
        image_store_cap_bytes=args.image_store_cap, cache_disk_cap_bytes=args.cache_cap,
        result_max_age_s=age * 24 * 3600 if age and age > 0 else None,
        model_dirs=[Path(d).expanduser() for d in args.models_dir], predictions=_predictions(args),
        scan_usual_places=not args.no_usual_places,
        tls_self_signed=bool(args.tls), insecure=bool(args.insecure), devices=devices,
        tls_certfile=Path(args.tls_cert).expanduser() if args.tls_cert else None,
        tls_keyfile=Path(args.tls_key).expanduser() if args.tls_key else None,
        painter_max_queued=args.painter_max_queued, painter_max_stored_bytes=args.painter_max_stored,
        compress_downloads=args.compress_downloads,
    )


def cmd_serve(args) -> int:
    from . import lifeline

    # first, before the heavy imports: a backend started by Krita ends with it (and its
    # private state folder with it), whatever it is doing
    lifeline.watch_parent(args.parent_pid, state_dir=Path(args.state_dir).expanduser() if args.state_dir else None)
    try:
        from .server import serve

        mem = _memory(args)
        if args.memory_preset:
            print(f"memory preset {mem.preset}: device {mem.device or 'auto'}, dtype {mem.dtype or 'auto'}, "
                  f"CPU offload {'on' if mem.cpu_offload else 'off'}, VAE tiling {'on' if mem.vae_tiling else 'off'}, "
                  f"max working pixels {mem.max_pixels or 'auto'}", flush=True)
        return serve(_settings_from_args(args, mem), log_level="debug" if args.verbose else "info")
    finally:
        lifeline.remove_own_state_dir()  # a private folder the plugin made: the token goes too


# -- tokens ----------------------------------------------------------------------------------

def _tokens_path(args) -> Path:
    from .server.app import default_state_dir
    from .server.painters import TOKENS_FILE

    return (Path(args.state_dir).expanduser() if args.state_dir else default_state_dir()) / TOKENS_FILE


def _show_size(n: int | None) -> str:
    if n is None:
        return "server default"
    for unit, size in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n}B"


def cmd_tokens(args) -> int:
    """``analogon tokens create NAME | list | revoke NAME``: the painters' tokens file."""
    from .server import painters

    path = _tokens_path(args)
    if args.tokens_command == "create":
        token = painters.create_token(path, args.name, args.max_queued, args.max_stored)
        print(token)
        print(f"The token of {args.name}, shown this once (only its hash is kept, in {path}). Give it to "
              "the painter with the server's address and its TLS fingerprint (docs/studio.md).",
              file=sys.stderr)
        return 0
    if args.tokens_command == "revoke":
        p = painters.revoke_token(path, args.name)
        print(f"revoked the token of {p.name}; a running backend refuses it from its next request on")
        return 0
    if args.tokens_command == "list":
        try:
            found = painters.read_tokens(path)
        except (OSError, ValueError) as e:
            return _die(f"cannot read {path}: {e}", 1)
        if not found:
            print(f"no painters' tokens (in {path}); analogon tokens create NAME makes one")
            return 0
        print(f"{'painter':<24} {'state':<8} {'created':<17} {'max queued':<14} max stored")
        for p in sorted(found.values(), key=lambda p: p.name):
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(p.created))
            state = "active" if p.active else "revoked"
            queued = str(p.max_queued) if p.max_queued is not None else "server default"
            print(f"{p.name:<24} {state:<8} {created:<17} {queued:<14} {_show_size(p.max_stored_bytes)}")
        return 0
    return _die("tokens: give an action: create NAME, list or revoke NAME", 2)


# -- run -------------------------------------------------------------------------------------

def _schema_type(prop: dict[str, Any]) -> tuple[str | None, list | None]:
    """(json type, enum) of a schema property, looking through Optional (anyOf with null)."""
    if "enum" in prop:
        return prop.get("type"), prop["enum"]
    if "const" in prop:
        return prop.get("type"), [prop["const"]]
    if "anyOf" in prop:
        options = [o for o in prop["anyOf"] if o.get("type") != "null"]
        if len(options) == 1:
            return _schema_type(options[0])
        return None, None
    return prop.get("type"), None


def _json_or_str(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


def _param_help(prop: dict[str, Any]) -> str:
    bits = [prop.get("description", "").rstrip(".")]
    rng = []
    for key, sym in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in prop:
            rng.append(f"{sym}{prop[key]}")
    if rng:
        bits.append(" ".join(rng))
    if "default" in prop:
        bits.append(f"default {json.dumps(prop['default'])}")
    # argparse expands %-formats in help texts: a literal "%" (e.g. "85–99% of the area") must be doubled
    return "; ".join(b for b in bits if b).replace("%", "%%")


def method_parser(method) -> argparse.ArgumentParser:
    """An argument parser for one method: its parameters, from the pydantic JSON schema, and
    its image roles."""
    p = argparse.ArgumentParser(
        prog=f"analogon run {method.id}", description=f"{method.title}. {method.description}".strip(),
        epilog="Images: FILE, or FILE@x,y[,scale] to place a layer on the target's canvas "
               "(scaled by scale, top-left corner at x,y).")
    taken = {"-o", "--output", "--model", "--seed", "--device", "--dtype", "--cpu-offload",
             "--vae-tiling", "--no-cpu-offload", "--no-vae-tiling", "--memory-preset", "--max-pixels", "--cache-dir", "--json", "--layer", "-h", "--help"}
    p.add_argument("-o", "--output", required=True, help="result PNG (more results: NAME-2.png, ...)")
    p.add_argument("--layer", action="store_true",
                   help="also write each result as a layer with only the change (NAME.layer.png: "
                        "transparent wherever nothing may change), as the Krita plugin adds it")
    p.add_argument("--seed", type=int, help="random seed (default: random; the used seed is printed)")
    p.add_argument("--json", action="store_true", help="print the run's report as JSON")
    _add_model_options(p, "tiny-sd")
    g = p.add_argument_group("images")
    role_dest: dict[str, str] = {}
    for role in method.all_roles():
        opt = "--" + role.name.replace("_", "-")
        if opt in taken:
            opt = "--image-" + role.name.replace("_", "-")
        taken.add(opt)
        dest = "role__" + role.name
        role_dest[role.name] = dest
        kw: dict[str, Any] = {"dest": dest, "metavar": "FILE",
                              "help": f"{role.title} ({role.kind}{', required' if role.required else ''}"
                                      f"{', repeatable' if role.multiple else ''}). {role.help}".strip()}
        if role.multiple:
            kw["action"] = "append"
        g.add_argument(opt, **kw)
    schema = method.Params.model_json_schema()
    g = p.add_argument_group("parameters")
    param_dest: dict[str, str] = {}
    for name, prop in schema.get("properties", {}).items():
        if "$ref" in prop and "$defs" in schema:
            prop = {**schema["$defs"].get(prop["$ref"].split("/")[-1], {}), **{k: v for k, v in prop.items() if k != "$ref"}}
        opt = "--" + name.replace("_", "-")
        if opt in taken:
            opt = "--param-" + name.replace("_", "-")
        taken.add(opt)
        dest = "param__" + name
        param_dest[name] = dest
        typ, enum = _schema_type(prop)
        kw = {"dest": dest, "default": None, "help": _param_help(prop)}
        if typ == "boolean":
            kw["action"] = argparse.BooleanOptionalAction
        elif enum is not None:
            kw["choices"] = enum
            kw["type"] = type(enum[0]) if enum and not isinstance(enum[0], bool) else str
        elif typ == "integer":
            kw.update(type=int, metavar="INT")
        elif typ == "number":
            kw.update(type=float, metavar="NUMBER")
        elif typ == "string":
            kw.update(type=str, metavar="TEXT")
        else:
            kw["type"] = _json_or_str
            kw["metavar"] = "JSON"
        g.add_argument(opt, **kw)
    p.set_defaults(_roles=role_dest, _params=param_dest)
    return p


def parse_image_arg(value: str) -> tuple[Path, dict[str, Any] | None]:
    """FILE or FILE@x,y[,scale]."""
    path, placement = value, None
    if "@" in value:
        head, _, tail = value.rpartition("@")
        parts = tail.split(",")
        try:
            if len(parts) in (2, 3):
                placement = {"x": int(parts[0]), "y": int(parts[1]),
                             "scale": float(parts[2]) if len(parts) == 3 else 1.0}
                path = head
        except ValueError:
            placement = None
    return Path(path).expanduser(), placement


def read_image_file(path: Path):
    from .core.images import as_rgba
    from .server.store import Limits, decode_png

    if not path.exists():
        raise AnalogonError("file_not_found", f"No image file at {path}.")
    return as_rgba(decode_png(path.read_bytes(), Limits()))


def write_png(path: Path, rgba) -> None:
    from .server.store import encode_png

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(rgba, compress_level=6))


def _make_models(args):
    from .models import LoadOptions, ModelManager

    mem = _memory(args)
    return ModelManager(1, LoadOptions(device=mem.device, dtype=mem.dtype, cpu_offload=mem.cpu_offload,
                                       vae_tiling=mem.vae_tiling, max_working_pixels=mem.max_pixels,
                                       predictions=_predictions(args)))


def _make_cache(args):
    from .core.cache import Cache
    from .server.app import default_cache_dir

    d = _cache_dir_arg(args.cache_dir)
    return Cache(None) if d == "" else Cache(d or default_cache_dir())


def cmd_run(args, extra: list[str]) -> int:
    from . import engine
    from .methods import all_methods, get

    if args.list or not args.method:
        if args.help and not args.method:
            print("usage: analogon run METHOD [options]   (analogon run METHOD --help for its options)")
        print("methods:")
        for m in all_methods():
            print(f"  {m.id:12s} {m.title}")
        return 0 if (args.list or args.help) else 2
    method = get(args.method)
    p = method_parser(method)
    if args.help:
        p.print_help()
        return 0
    a = p.parse_args(extra)
    params = {name: getattr(a, dest) for name, dest in a._params.items() if getattr(a, dest) is not None}
    source = engine.MemorySource()
    images: dict[str, Any] = {}
    for role_name, dest in a._roles.items():
        val = getattr(a, dest)
        if val is None:
            continue
        refs = []
        for item in (val if isinstance(val, list) else [val]):
            path, placement = parse_image_arg(item)
            sha = source.add(read_image_file(path))
            refs.append({"sha": sha, **placement} if placement else sha)
        images[role_name] = refs if isinstance(val, list) else refs[0]
    job = engine.prepare(method.id, params, images, a.model, a.seed, "tiny-sd", source=source)
    t0 = time.perf_counter()
    last = [""]

    def progress(stage, step, total):
        line = f"{stage} {step}/{total}" if total else stage
        if sys.stderr.isatty():
            print(f"\r{line:40s}", end="", file=sys.stderr, flush=True)
        elif stage != last[0]:
            print(line, file=sys.stderr)
        last[0] = stage

    res = engine.execute(job, source=source, models=_make_models(a), cache=_make_cache(a), progress=progress)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    out = Path(a.output)
    written = []
    for i, img in enumerate(res.images):
        path = out if i == 0 else out.with_name(f"{out.stem}-{i + 1}{out.suffix or '.png'}")
        write_png(path, img.rgba)
        written.append(str(path))
        if a.layer and img.layer is not None:
            lpath = path.with_name(f"{path.stem}.layer.png")
            write_png(lpath, img.layer)
            written.append(str(lpath))
    report = {"method": method.id, "model": res.model, "seed": res.seed, "params": res.params,
              "info": res.info, "timings": res.timings, "outputs": written,
              "seconds": round(time.perf_counter() - t0, 3)}
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{method.id}: wrote {', '.join(written)} (seed {res.seed}, {report['seconds']} s)")
    return 0


# -- demo ------------------------------------------------------------------------------------

def default_demo_model() -> str:
    try:
        from .models.toy import toy_sd_available

        if toy_sd_available():
            return "toy-sd"
    except Exception:  # pragma: no cover
        pass
    return "tiny-sd"


def demo_inputs(method, size: int) -> tuple[dict[str, Any], Any]:
    """Sample images for a method's roles: (image refs by role, the engine's image source).
    Patch-like roles (exemplars) are placed on the canvas; the edit map is then white under
    them with a soft edge, else a radial gradient."""
    import numpy as np

    from . import engine
    from .core.images import place
    from .samples import analogy_set, halo_map, image_for_role

    samples = analogy_set(size)
    source = engine.MemorySource()
    images: dict[str, Any] = {}
    placed_alpha = np.zeros((size, size), np.uint8)
    maps: list[Any] = []
    for role in method.all_roles():
        if not role.required and (role.kind == "mask" or (role.kind == "image" and not role.multiple)):
            continue  # optional maps and exemplar lists are shown; masks and extras are not
        if role.kind == "map":
            maps.append(role)
            continue
        img, patch = image_for_role(role.name, role.kind, samples)
        ref: Any = source.add(img)
        if patch and (role.canvas or role.name != method.target_role):
            x, y = size // 8, size // 4
            ref = {"sha": ref, "x": x, "y": y, "scale": 1.0}
            placed_alpha = np.maximum(placed_alpha, place(img, (size, size), x, y)[..., 3])
        images[role.name] = [ref] if role.multiple else ref
    emap = halo_map(placed_alpha, max(2, size // 10)) if placed_alpha.any() else samples["edit_map"]
    for role in maps:
        sha = source.add(emap)
        images[role.name] = [sha] if role.multiple else sha
    return images, source


_SPELLED = {"λ": "lambda", "α": "alpha", "β": "beta", "γ": "gamma", "σ": "sigma", "τ": "tau", "′": "'",
            "×": "x", "→": "->", "−": "-"}


def _printable(text: str) -> str:
    """Labels for the bitmap font (ASCII glyphs only): Greek letters and a few signs spelled
    out, anything else outside ASCII as '?'."""
    text = "".join(_SPELLED.get(c, c) for c in text)
    return text.encode("ascii", "replace").decode("ascii")


def contact_sheet(rows: list[tuple[str, list[tuple[str, Any]]]], cell: int = 128):
    """One PNG: a row per method with its inputs and results, labelled."""
    import numpy as np
    from PIL import Image, ImageDraw

    label_h = 14
    cols = max((len(r[1]) for r in rows), default=1)
    title_w = 110
    sheet = Image.new("RGB", (title_w + cols * (cell + 4), max(1, len(rows)) * (cell + label_h + 6)), "white")
    draw = ImageDraw.Draw(sheet)
    for ri, (title, cells) in enumerate(rows):
        y = ri * (cell + label_h + 6) + 2
        draw.text((4, y + cell // 2), title[:18], fill="black")
        for ci, (label, rgba) in enumerate(cells):
            x = title_w + ci * (cell + 4)
            if rgba is None:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline="red")
                draw.text((x + 4, y + cell // 2), "failed", fill="red")
            else:
                im = Image.fromarray(np.asarray(rgba), "RGBA")
                im.thumbnail((cell, cell), Image.Resampling.NEAREST if max(im.size) < cell else
                             Image.Resampling.LANCZOS)
                if max(im.size) < cell:
                    s = cell / max(im.size)
                    im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))),
                                   Image.Resampling.NEAREST)
                checker = Image.new("RGB", im.size, (200, 200, 200))
                checker.paste(im, (0, 0), im)
                sheet.paste(checker, (x, y))
            draw.text((x + 2, y + cell + 1), _printable(label)[:22], fill="black")
    return sheet


def cmd_demo(args) -> int:
    from . import engine
    from .methods import UNAVAILABLE, all_methods, get

    model = args.model or default_demo_model()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    ms = [get(m.strip()) for m in args.methods.split(",")] if args.methods else all_methods()
    if not ms:
        return _die("no methods are available: " + json.dumps(UNAVAILABLE), 1)
    models = _make_models(args)
    cache = _make_cache(args)
    t = time.perf_counter()
    bundle = models.get(model)
    load_s = time.perf_counter() - t
    size = args.size or bundle.native_size
    print(f"demo: model {model} ({bundle.family}, {bundle.device}, loaded in {load_s:.2f} s), "
          f"images {size}x{size}, output {out}")
    rows, table = [], []
    from .models.toy import TOY_FOLDERS, model_world

    toy_cases = bundle.spec in TOY_FOLDERS
    if toy_cases:
        from .quality import demo_case
    for m in ms:
        # On toy-sd, a scene from the world it was trained on (the quality suite's first case);
        # elsewhere, the procedural samples.
        case = demo_case(m.id, world=model_world(bundle.spec)) if toy_cases else None
        images, source = case if case is not None else demo_inputs(m, size)
        cells = []
        for role, ref in images.items():
            for r in (ref if isinstance(ref, list) else [ref]):
                sha = r["sha"] if isinstance(r, dict) else r
                cells.append((role, source.load(sha)))
        entry: dict[str, Any] = {"method": m.id, "model": model}
        t0 = time.perf_counter()
        try:
            job = engine.prepare(m.id, dict(m.demo_params), images, model, args.seed, model, source=source)
            res = engine.execute(job, source=source, models=models, cache=cache)
            files = []
            for i, img in enumerate(res.images):
                path = out / (f"{m.id}.png" if i == 0 else f"{m.id}-{i + 1}.png")
                write_png(path, img.rgba)
                files.append(path.name)
                cells.append((f"result {img.label}".strip(), img.rgba))
            entry.update(status="ok", seconds=round(time.perf_counter() - t0, 3), outputs=files,
                         seed=res.seed, params=res.params, timings=res.timings)
        except Exception as e:  # a failing method is reported, not fatal
            msg = e.message if isinstance(e, AnalogonError) else f"{type(e).__name__}: {e}"
            log.debug("demo %s failed", m.id, exc_info=True)
            entry.update(status="failed", seconds=round(time.perf_counter() - t0, 3), error=msg)
            cells.append(("failed", None))
        table.append(entry)
        rows.append((m.id, cells))
        print(f"  {m.id:12s} {entry['status']:7s} {entry['seconds']:8.2f} s"
              + (f"  {entry.get('error')}" if entry["status"] != "ok" else ""))
    for name, why in UNAVAILABLE.items():
        table.append({"method": name, "model": model, "status": "unavailable", "seconds": 0.0, "error": why})
    contact_sheet(rows).save(out / "contact_sheet.png")
    (out / "timings.json").write_text(json.dumps({"model": model, "size": size, "load_seconds": round(load_s, 3),
                                                  "methods": table}, indent=2))
    lines = ["| method | status | seconds | outputs / error |", "|---|---|---:|---|"]
    for e in table:
        lines.append(f"| {e['method']} | {e['status']} | {e['seconds']:.2f} | "
                     f"{', '.join(e.get('outputs', [])) or e.get('error', '')} |")
    (out / "timings.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'contact_sheet.png'}, {out / 'timings.md'}, {out / 'timings.json'}")
    failed = [e for e in table if e["status"] == "failed"]
    return 1 if failed and len(failed) == len([e for e in table if e["status"] != "unavailable"]) else 0


# -- doctor ----------------------------------------------------------------------------------

def _fingerprint_arg(value: str) -> str:
    """A SHA-256 fingerprint as openssl writes it (``AB:CD:...``); colons and case are free."""
    hexits = value.strip().replace(":", "").upper()
    if len(hexits) != 64 or any(c not in "0123456789ABCDEF" for c in hexits):
        raise argparse.ArgumentTypeError("a SHA-256 fingerprint is 32 pairs of hex digits, e.g. 14:B9:FF:...")
    return ":".join(hexits[i:i + 2] for i in range(0, 64, 2))


def probe_backend(url: str, token: str | None = None, fingerprint: str | None = None,
                  timeout: float = 5.0) -> dict[str, Any]:
    """``GET /v1/health`` of the backend at ``url`` (http or https). Over https the certificate is
    checked before anything is sent (the token included): with ``fingerprint``, it must be
    exactly that certificate (a self-signed one is trusted so, as the docker pins it); without,
    it must be one the system's authorities vouch for."""
    import http.client
    import ssl
    from urllib.parse import urlsplit

    from .server import tls

    out: dict[str, Any] = {"url": url, "running": False}
    try:
        u = urlsplit(url)
        host, port = u.hostname or "", u.port
    except ValueError as e:
        out.update(code="bad_url", error=f"{url} is not an address ({e})")
        return out
    https = u.scheme == "https"
    if u.scheme not in ("http", "https") or not host:
        out.update(code="bad_url", error=f"{url} is not an http:// or https:// address")
        return out
    if https:
        if fingerprint:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # the fingerprint is the check, below
        else:
            ctx = ssl.create_default_context()
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.connect()
        if https:
            presented = tls.fingerprint(conn.sock.getpeercert(binary_form=True))
            out["tls_fingerprint_sha256"] = presented
            if fingerprint and presented != fingerprint:
                out.update(code="certificate_mismatch", error=(
                    f"its TLS certificate's SHA-256 fingerprint is {presented}, not the expected "
                    f"{fingerprint}: nothing was sent (a new certificate, or someone in between)"))
                return out
        conn.request("GET", "/v1/health", headers={"Authorization": f"Bearer {token}"} if token else {})
        r = conn.getresponse()
        body = r.read()
        out["status"] = r.status
        try:
            out["health"] = json.loads(body)
        except ValueError:
            out["health"] = None
        out["running"] = r.status == 200 and isinstance(out["health"], dict)
        if not out["running"]:
            out.update(code=f"http_{r.status}", error=f"it answered {r.status}")
    except ssl.SSLCertVerificationError as e:
        out.update(code="certificate_untrusted", error=(
            f"its TLS certificate is not vouched for by an authority this system knows ({e.verify_message}); "
            "for a self-signed one, give its fingerprint: --fingerprint AB:CD:..."))
    except (OSError, http.client.HTTPException) as e:
        out.update(code="unreachable", error=f"{type(e).__name__}: {e}")
    finally:
        conn.close()
    return out


def krita_plugin_dir() -> Path:
    """Krita's pykrita folder in the user's profile: Linux XDG_DATA_HOME/krita, Windows
    %APPDATA%\\krita, macOS ~/Library/Application Support/krita."""
    from .models.discovery import krita_data_dir

    return krita_data_dir() / "pykrita"


def doctor_report(url: str | None = None, token: str | None = None, fingerprint: str | None = None,
                  state_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    import importlib.metadata as md
    import platform
    import shutil

    rep: dict[str, Any] = {"analogon": __version__, "python": platform.python_version(),
                           "platform": platform.platform(), "packages": {}}
    for pkg in ("torch", "torchvision", "diffusers", "transformers", "accelerate", "safetensors",
                "open_clip_torch", "fastapi", "uvicorn", "pydantic", "numpy", "pillow"):
        try:
            rep["packages"][pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            rep["packages"][pkg] = None
    try:
        import torch

        from .models import pick_device, pick_dtype

        dev = pick_device()
        rep["device"] = str(dev)
        rep["dtype"] = str(pick_dtype(dev)).replace("torch.", "")
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            rep["gpu"] = {"name": torch.cuda.get_device_name(0), "total_bytes": total, "free_bytes": free,
                          "cuda": torch.version.cuda}
    except Exception as e:
        rep["device"] = f"torch failed: {e}"
    from .server.app import memory_info

    rep["memory"] = memory_info()
    rep["krita"] = {"krita": shutil.which("krita"), "kritarunner": shutil.which("kritarunner")}
    pdir = krita_plugin_dir()
    rep["plugin"] = {"folder": str(pdir),
                     "installed": (pdir / "analogon_krita").is_dir() and (pdir / "analogon_krita.desktop").exists()}
    try:
        from .methods import UNAVAILABLE, all_methods

        rep["methods"] = [m.id for m in all_methods()]
        rep["methods_unavailable"] = dict(UNAVAILABLE)
    except Exception as e:  # pragma: no cover
        rep["methods"] = f"failed: {e}"
    from .server.app import default_state_dir

    sj = (Path(state_dir).expanduser() if state_dir else default_state_dir()) / "server.json"
    rep["server"] = {"server_json": str(sj), "running": False}
    info: dict[str, Any] = {}
    if sj.exists():
        try:
            info = json.loads(sj.read_text())
        except (OSError, ValueError) as e:
            rep["server"]["error"] = f"{sj} cannot be read ({type(e).__name__})"
    target = (url or info.get("url") or "").rstrip("/")
    if target:
        same = target == str(info.get("url", "")).rstrip("/")  # server.json speaks of this backend
        rep["server"].update(probe_backend(
            target, token or (info.get("token") if same else None),
            fingerprint or (info.get("tls_fingerprint_sha256") if same else None),
            timeout=5.0 if url else 2.0))
        rep["server"]["fingerprint_from"] = ("--fingerprint" if fingerprint else "server.json"
                                             if same and info.get("tls_fingerprint_sha256") else None)
    return rep


def cmd_doctor(args) -> int:
    rep = doctor_report(args.url, args.token, args.fingerprint, args.state_dir)
    ok = lambda b: "yes" if b else "no"  # noqa: E731
    print(f"analogon {rep['analogon']}  python {rep['python']}  {rep['platform']}")
    for k, v in rep["packages"].items():
        print(f"  {k:16s} {v or 'NOT INSTALLED'}")
    print(f"device: {rep.get('device')} ({rep.get('dtype')})")
    if "gpu" in rep:
        g = rep["gpu"]
        print(f"  gpu {g['name']}: {g['free_bytes'] / 2**30:.1f} of {g['total_bytes'] / 2**30:.1f} GiB free (CUDA {g['cuda']})")
    mem = rep["memory"]
    if "system_total_bytes" in mem:
        print(f"memory: {mem['system_available_bytes'] / 2**30:.1f} of {mem['system_total_bytes'] / 2**30:.1f} GiB available")
    print(f"krita: {rep['krita']['krita'] or 'not found'}  (kritarunner: {rep['krita']['kritarunner'] or 'not found'})")
    print(f"krita plugin installed in {rep['plugin']['folder']}: {ok(rep['plugin']['installed'])}")
    print(f"methods: {', '.join(rep['methods']) if isinstance(rep['methods'], list) else rep['methods']}")
    for name, why in rep.get("methods_unavailable", {}).items():
        print(f"  {name}: unavailable ({why})")
    srv = rep["server"]
    print(f"backend server running: {ok(srv['running'])}" + (f" at {srv['url']}" if srv.get("url") else ""))
    if srv.get("tls_fingerprint_sha256"):
        how = {"--fingerprint": "the one given", "server.json": "the one in server.json"}.get(
            srv.get("fingerprint_from") or "", "")
        print(f"  TLS certificate SHA-256 fingerprint: {srv['tls_fingerprint_sha256']}"
              + (f" ({'matches' if srv.get('code') != 'certificate_mismatch' else 'differs from'} {how})"
                 if how else ""))
    health = srv.get("health") if isinstance(srv.get("health"), dict) else {}
    if srv["running"]:
        painter = health.get("painter")
        who = (f"painter {painter.get('name')}" if isinstance(painter, dict) else "the server's own token")
        print(f"  version {health.get('version', '?')}, device {health.get('device', '?')}; token: "
              + (who + " accepted" if health.get("authenticated") else "none sent (or not accepted)"))
    if srv.get("error"):
        print(f"  {srv['url'] if srv.get('url') else 'backend'}: {srv['error']} [{srv.get('code', 'error')}]")
    # asked about a backend explicitly: its check decides the exit code
    return 1 if (args.url or args.fingerprint) and not srv["running"] else 0


# -- download --------------------------------------------------------------------------------

def cmd_download(args) -> int:
    from .models import discovery
    from .models.download import DownloadCancelled, catalog, download, find

    folder = Path(args.to).expanduser() if args.to else discovery.models_dir()
    if args.list or not args.model:
        for e in catalog():
            there = " (downloaded)" if (folder / e.filename).exists() else ""
            print(f"  {e.id:10s} {e.title}, about {e.size_bytes / 1e9:.1f} GB, for "
                  f"{', '.join(e.methods)}{there}\n  {'':10s} {e.repo_id}/{e.filename}")
        return 0 if args.list else 2
    entry = find(args.model)
    last = [0.0]

    def progress(stage, done, total):
        now = time.monotonic()
        if stage in ("downloading", "verifying") and now - last[0] < 1 and done != total:
            return
        last[0] = now
        pct = f" {100 * done / total:5.1f} %" if total else ""
        print(f"{stage}{pct} ({done / 1e6:.0f} MB)", file=sys.stderr, flush=True)

    try:
        path = download(entry, folder, progress, endpoint=os.environ.get("HF_ENDPOINT") or None)
    except DownloadCancelled:  # pragma: no cover - only from a UI
        return 130
    print(path)
    return 0


# -- build-random ------------------------------------------------------------------------------

def cmd_build_random(args) -> int:
    from .bench._random_models import build_random

    try:
        build_random(args.family, args.folder, dtype=args.dtype, seed=args.seed)
    except FileExistsError as e:
        return _die(str(e))
    return 0


# -- bench, train-toy --------------------------------------------------------------------------

def cmd_bench(argv: list[str]) -> int:
    if "--quality" in argv:
        rest = [a for a in argv if a != "--quality"]
        try:
            from . import quality
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("analogon.quality"):
                return _die("the quality suite (analogon.quality) is not part of this installation.", 1)
            raise
        return int(quality.main(rest) or 0)
    from .bench import main as bench_main

    return bench_main(argv)


def cmd_train_toy(argv: list[str]) -> int:
    try:
        from .toyworld import train
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("analogon.toyworld"):
            return _die("the toy-world trainer (analogon.toyworld) is not part of this installation.", 1)
        raise
    return int(train.main(argv) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
