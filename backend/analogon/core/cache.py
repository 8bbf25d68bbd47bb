"""A cache for inversions and other per-image work.

Keys are SHA-256 digests of canonical JSON: a namespace (what was computed), the model's
identity, and every part that affects the result (image hashes, parameters). Values are
dicts of tensors. Recently used entries stay in memory (LRU, ``memory_items``); every entry
is also written to ``folder`` as a ``.safetensors`` file with the caller's metadata in the
file's header, and the folder is kept under ``disk_cap_bytes`` by deleting the entries used
longest ago. ``Cache(None)`` keeps everything in memory only.

Every file carries a SHA-256 digest of its tensors (names, dtypes, shapes and bytes) in its
header; a file whose tensors do not match it (bytes changed on disk), that cannot be read
(truncated, foreign, half-written) or that is not a file at all is a miss: it is removed,
logged and recomputed, never used and never a crash. Half-written ``.tmp`` files that a
killed process left are removed when a cache opens the folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_META_KEY = "analogon_meta"
_KEY_FIELD = "analogon_key"
_DIGEST_FIELD = "analogon_digest"
_TMP_RE = re.compile(r"\..+\.safetensors\.(\d+)\.\d+\.tmp")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _canonical(value: Any) -> Any:
    """JSON-able form of a key part; tuples become lists, paths strings, floats stay exact."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return repr(value)  # exact, and 1.0 != 1 on purpose
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "model_dump"):  # pydantic models
        return _canonical(value.model_dump())
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(f"cache key part of type {type(value).__name__} is not supported")


class Cache:
    def __init__(
        self,
        folder: str | os.PathLike | None,
        memory_items: int = 32,
        disk_cap_bytes: int = 2 * 1024**3,
    ):
        self.folder = Path(folder) if folder is not None else None
        self.memory_items = max(0, int(memory_items))
        self.disk_cap_bytes = int(disk_cap_bytes)
        self._mem: OrderedDict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = OrderedDict()
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self._last_touch = 0
        self.removed_tmp = 0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """``.tmp`` files whose writer is gone (a process killed while writing). Several
        processes may share the folder, so a live writer's file is left alone."""
        for p in self.folder.glob(".*.tmp"):
            m = _TMP_RE.fullmatch(p.name)
            if m is None or not _pid_alive(int(m.group(1))):
                _remove(p)
                self.removed_tmp += 1
        if self.removed_tmp:
            log.info("cache: removed %d half-written files left by a killed process", self.removed_tmp)

    # -- keys -------------------------------------------------------------------------
    @staticmethod
    def key(namespace: str, model_key: str, **parts: Any) -> str:
        doc = {"namespace": namespace, "model": model_key, "parts": _canonical(parts)}
        blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{key}.safetensors"

    # -- access -----------------------------------------------------------------------
    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        entry = self.get_entry(key)
        return None if entry is None else entry[0]

    def get_entry(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, meta) or None. Tensors are returned as stored: clone before editing in place."""
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                self.hits += 1
                if self.folder is not None and self._path(key).is_file():
                    self._touch(self._path(key))
                return self._mem[key]
            entry = self._read_disk(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._remember(key, entry)
            return entry

    def meta(self, key: str) -> dict[str, Any] | None:
        entry = self.get_entry(key)
        return None if entry is None else entry[1]

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._mem or (self.folder is not None and self._path(key).is_file())

    def put(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
        meta = dict(meta or {})
        stored = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        with self._lock:
            self._remember(key, (stored, meta))
            if self.folder is not None:
                self._write_disk(key, stored, meta)
                self._enforce_cap(keep=key)

    def clear(self) -> None:
        with self._lock:
            self._mem.clear()
            if self.folder is not None:
                for p in self.folder.glob("*.safetensors"):
                    _remove(p)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "memory_items": len(self._mem),
                    "disk_bytes": self.disk_bytes(), "folder": str(self.folder) if self.folder else None}

    def disk_bytes(self) -> int:
        if self.folder is None:
            return 0
        total = 0
        for p in self.folder.glob("*.safetensors"):
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
        return total

    # -- internals ----------------------------------------------------------------------
    def _remember(self, key: str, entry) -> None:
        if self.memory_items == 0:
            return
        self._mem[key] = entry
        self._mem.move_to_end(key)
        while len(self._mem) > self.memory_items:
            self._mem.popitem(last=False)

    def _read_disk(self, key: str):
        if self.folder is None:
            return None
        path = self._path(key)
        if not os.path.lexists(path):
            return None
        try:
            if not path.is_file():
                raise ValueError("not a file")
            from safetensors import safe_open

            tensors: dict[str, torch.Tensor] = {}
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                if header.get(_KEY_FIELD) != key:
                    raise ValueError("key mismatch")
                meta = json.loads(header.get(_META_KEY, "{}"))
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
            digest = header.get(_DIGEST_FIELD)
            if digest is None:
                raise ValueError("no digest (written by an older version)")
            if tensors_digest(tensors) != digest:
                raise ValueError("its tensors do not match their digest (changed on disk)")
        except Exception as e:  # corrupt / truncated / foreign / changed: a miss
            log.warning("cache entry %s unusable (%s); removed, it will be recomputed", path.name, e)
            _remove(path)
            return None
        self._touch(path)
        return tensors, meta

    def _write_disk(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        header = {_KEY_FIELD: key, _META_KEY: json.dumps(meta, sort_keys=True, default=str),
                  _DIGEST_FIELD: tensors_digest(tensors)}
        try:
            if os.path.lexists(path) and not path.is_file():
                _remove(path)  # something else took the entry's name (a folder): ours
            save_file(tensors, str(tmp), metadata=header)
            os.replace(tmp, path)
            self._touch(path)
        except Exception as e:
            log.warning("could not write cache entry %s: %s", path.name, e)
            _remove(tmp)

    def _touch(self, path: Path) -> None:
        """Mark a file as just used. The file clock is coarse (milliseconds), so successive
        uses in one process get strictly increasing times."""
        t = max(time.time_ns(), self._last_touch + 1)
        self._last_touch = t
        try:
            os.utime(path, ns=(t, t))
        except OSError:
            pass

    def _enforce_cap(self, keep: str | None = None) -> None:
        files = []
        for p in self.folder.glob("*.safetensors"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime_ns, st.st_size, p))
        total = sum(size for _, size, _ in files)
        if total <= self.disk_cap_bytes:
            return
        files.sort()  # oldest used first
        for _, size, p in files:
            if total <= self.disk_cap_bytes:
                break
            if keep is not None and p.stem == keep:
                continue
            _remove(p)
            total -= size


def _remove(path: Path) -> None:
    """Remove a file, or a folder standing where a cache file should be."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("cache: could not remove %s: %s", path.name, e)
