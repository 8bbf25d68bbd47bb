"""What a checkpoint says about itself, read without loading it, from files that may be anything.

A models folder can hold whatever a file system can: links to a drive that is not mounted,
link loops, FIFOs and devices named ``*.safetensors``, files cut short by a download, headers
of any size and any JSON. Both the scan of the models folders (:mod:`.discovery`) and the
loader (:mod:`.single_file`) read checkpoints through this module, which

- opens only regular files: the path is checked with ``os.stat`` first (a FIFO, a device or a
  socket is never opened: opening a FIFO blocks until a writer comes), then opened without
  blocking (``O_NONBLOCK`` where the system has it) and checked again on the open file, so a
  file swapped for a FIFO in between is refused too;
- reads at most :data:`MAX_HEADER_BYTES` of a safetensors header. Real headers are far
  smaller (an SDXL checkpoint's ~2,500 tensors take about 300 KB, a trainer's metadata rarely
  1 MB). Python's JSON parser holds the interpreter for the whole parse, so this bound is also
  the longest one header keeps every other request waiting: 8 MiB of tensor entries held it
  up to 0.5 s on the loaded 2-core development machine, 4 MiB about half that;
- checks the header against the format (an object of tensors, each ``{dtype: text, shape:
  [whole numbers], data_offsets: [begin, end]}`` inside the file, ``__metadata__`` text to
  text) and raises :class:`UnreadableFile` with a reason for anything else, whatever the parser
  raised (nesting 100,000 deep is a RecursionError, ``1e999`` a float, ``null`` a None).
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any, BinaryIO

MAX_HEADER_BYTES = 4 * 1024 * 1024
MAX_SIDE_FILE_BYTES = 1024 * 1024  # a model_index.json, a config.json, a name.yaml
MAX_WHOLE_NUMBER = 2**63  # safetensors stores shapes and offsets as 64-bit unsigned integers


class UnreadableFile(ValueError):
    """A file that cannot be read as what it should be; the message is the reason."""


def reason(exc: BaseException) -> str:
    """A short reason for a failure to read a file, whatever was raised."""
    if isinstance(exc, UnreadableFile):
        return str(exc)
    if isinstance(exc, OSError):
        if exc.errno == errno.ELOOP:
            return "a link loop"
        if exc.errno == errno.ENOENT:
            return "a link to something missing (a drive that is not mounted?)"
        return exc.strerror or type(exc).__name__
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, (ValueError, UnicodeError)):
        return str(exc)[:200] or type(exc).__name__
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def kind_of(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file_stat(path: Path) -> os.stat_result:
    """``os.stat`` of ``path`` (links followed), refusing anything but a regular file."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableFile(f"{kind_of(st.st_mode)}, not a file")
    return st


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading, only if it is a regular file (see the module's docstring)."""
    regular_file_stat(path)
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile(f"{kind_of(st.st_mode)}, not a file")
        if getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)  # reads of the checked file wait for the disk as usual
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small_file(path: Path, limit: int = MAX_SIDE_FILE_BYTES) -> bytes:
    """The whole of a small regular file; :class:`UnreadableFile` when it is over ``limit``."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnreadableFile(f"{path.name} is over {limit // 1024} KiB")
    return data


def _no_fractions(text: str):
    raise UnreadableFile(f"the number {text[:40]} is not a whole number")


def _no_constants(name: str):
    raise UnreadableFile(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 20:
        raise UnreadableFile(f"the number {text[:40]}… is too large")
    return int(text)


def parse_json(data: bytes, what: str, fractions: bool = True) -> Any:
    """``data`` as JSON: UTF-8, no NaN or Infinity, whole numbers of at most 20 digits, numbers
    with a fraction only where ``fractions``. :class:`UnreadableFile` for anything else."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constants, parse_int=_bounded_int,
                          parse_float=float if fractions else _no_fractions)
    except UnreadableFile:
        raise
    except Exception as e:  # ValueError, UnicodeDecodeError, RecursionError: all are "not readable"
        raise UnreadableFile(f"{what} is not valid JSON: {reason(e)}") from None


def read_json_object(path: Path, name: str | None = None) -> dict[str, Any]:
    """A small JSON file (a diffusers config) that must hold a JSON object; every reason it
    cannot be read names the file (``name``, else the file's own)."""
    name = name or path.name
    try:
        data = read_small_file(path)
    except (OSError, ValueError) as e:
        raise UnreadableFile(f"{name}: {reason(e)}") from None
    value = parse_json(data, name)
    if not isinstance(value, dict):
        raise UnreadableFile(f"{name} is {_json_type(value)}, not a JSON object")
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true or false", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _whole(value: Any) -> bool:
    return type(value) is int and 0 <= value < MAX_WHOLE_NUMBER


def check_header(header: Any, data_bytes: int) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(tensors, metadata) from a parsed header, checked against the safetensors format;
    ``data_bytes``: how many bytes the file has after its header."""
    if not isinstance(header, dict):
        raise UnreadableFile(f"the header is {_json_type(header)}, not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UnreadableFile("its metadata is not text")
    tensors = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
            raise UnreadableFile(f"tensor {name[:80]!r} has no dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(_whole(d) for d in shape):
            raise UnreadableFile(f"tensor {name[:80]!r} has a shape that is not a list of whole numbers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise UnreadableFile(f"tensor {name[:80]!r} has no valid data_offsets")
        end = max(end, offsets[1])
        tensors[name] = info
    if end > data_bytes:
        raise UnreadableFile("the file is shorter than its header says (still downloading?)")
    return tensors, dict(meta)


def read_safetensors_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(tensor name -> {dtype, shape, data_offsets}, metadata) from a ``.safetensors`` file's
    header; reads the first 8 + N bytes only (N at most :data:`MAX_HEADER_BYTES`). Raises
    :class:`UnreadableFile` (a ValueError) or OSError, with the reason."""
    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) != 8:
            raise UnreadableFile("too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > size - 8:
            raise UnreadableFile(f"header length {n} is not plausible for a file of {size} bytes")
        if n > MAX_HEADER_BYTES:
            raise UnreadableFile(f"its header is {n / 2**20:.0f} MiB; headers over "
                                 f"{MAX_HEADER_BYTES // 2**20} MiB are not read")
        raw = f.read(n)
    if len(raw) != n:
        raise UnreadableFile("the header is cut short (still downloading?)")
    return check_header(parse_json(raw, "the header", fractions=False), size - 8 - n)


def sd2_stated_prediction(path: Path | None, meta: dict[str, str] | None = None) -> tuple[str | None, str]:
    """(epsilon | v_prediction | None, how it is known: metadata | yaml | "") from the file's
    modelspec metadata (read from its header when ``meta`` is None) or the yaml beside it
    (``path`` None: the metadata alone). An unreadable header or yaml states nothing."""
    path = Path(path) if path is not None else None
    if meta is None and path is not None and path.suffix.lower() == ".safetensors":
        try:
            meta = read_safetensors_header(path)[1]
        except (OSError, ValueError):
            meta = {}
    meta = meta or {}
    pred = meta.get("modelspec.prediction_type", "").lower()
    arch = meta.get("modelspec.architecture", "").lower()
    if pred in ("v", "v_prediction", "v-prediction") or arch.endswith("-v"):
        return "v_prediction", "metadata"
    if pred in ("epsilon", "eps") or arch.endswith("-base"):
        return "epsilon", "metadata"
    if path is None:
        return None, ""
    try:
        text = read_small_file(path.with_suffix(".yaml")).decode("utf-8", "replace")
    except (OSError, ValueError):  # none beside it, or not a readable file
        return None, ""
    v = re.search(r"parameterization\s*:\s*['\"]?v['\"]?\s*$", text, re.M)
    return ("v_prediction" if v else "epsilon"), "yaml"
