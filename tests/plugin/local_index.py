"""A package index on 127.0.0.1 for installer tests (PEP 503 "simple" pages over a folder of
wheels), and small wheels made on the spot: uv installs from it as from PyPI, offline."""
from __future__ import annotations

import base64
import hashlib
import http.server
import re
import threading
import zipfile
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def make_wheel(folder: Path, name: str, version: str, files: dict[str, bytes] | None = None,
               data_scripts: dict[str, bytes] | None = None) -> Path:
    """A pure-Python wheel ``name==version`` with ``files`` (default: an ``__init__.py``);
    ``data_scripts`` go to ``NAME-VERSION.data/scripts/`` (as uv's binary does)."""
    dist = f"{name.replace('-', '_')}-{version}"
    content = dict(files or {f"{name.replace('-', '_')}/__init__.py": f"VERSION = {version!r}\n".encode()})
    for script, data in (data_scripts or {}).items():
        content[f"{dist}.data/scripts/{script}"] = data
    content[f"{dist}.dist-info/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    content[f"{dist}.dist-info/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = [f"{k},sha256={base64.urlsafe_b64encode(hashlib.sha256(v).digest()).rstrip(b'=').decode()},{len(v)}"
              for k, v in content.items()]
    content[f"{dist}.dist-info/RECORD"] = ("\n".join(record + [f"{dist}.dist-info/RECORD,,"]) + "\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in content.items():
            z.writestr(k, v)
    return path


class LocalIndex:
    """``with LocalIndex(folder) as index:`` ``index.url`` is the simple index (``/simple/``),
    ``index.file_url(name)`` a file's address; ``index.requests`` what was asked for."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.requests: list[str] = []
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.head_only = True
                self.do_GET()

            def do_GET(self):
                index.requests.append(self.path)
                m = re.match(r"^/simple/([^/]+)/?$", self.path)
                if m:
                    links = []
                    for f in sorted(index.folder.glob("*.whl")):
                        if _norm(f.name.split("-")[0]) == _norm(m.group(1)):
                            sha = hashlib.sha256(f.read_bytes()).hexdigest()
                            links.append(f'<a href="/files/{f.name}#sha256={sha}">{f.name}</a>')
                    if not links:
                        return self._send(404, b"not here", "text/plain")
                    return self._send(200, ("<html><body>" + "<br>".join(links) + "</body></html>").encode(),
                                      "text/html")
                m = re.match(r"^/files/([^/]+)$", self.path)
                if m and (index.folder / m.group(1)).is_file():
                    return self._send(200, (index.folder / m.group(1)).read_bytes(), "application/octet-stream")
                self._send(404, b"not here", "text/plain")

            def _send(self, code, body, ctype):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not getattr(self, "head_only", False):
                    self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple/"

    def file_url(self, name: str) -> str:
        return self.url.replace("/simple/", f"/files/{name}")

    def __enter__(self) -> "LocalIndex":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
