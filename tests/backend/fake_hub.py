"""A stand-in for the Hugging Face hub on 127.0.0.1: serves files the way the hub resolves
them (HEAD with X-Repo-Commit / X-Linked-Etag / X-Linked-Size, GET with byte ranges) and
records the requests, for download tests with HF_ENDPOINT / endpoint= pointing at it.

``pause_at``: a GET stops after that many bytes of the file and goes on only when
``resume`` is set, which a client can do with ``GET /_test/resume`` (a test in another
process sees the download half-way, whatever the speed of the machine)."""
from __future__ import annotations

import hashlib
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self):
        self.files: dict[tuple[str, str], bytes] = {}  # (repo_id, filename) -> content
        self.claimed_sha: dict[tuple[str, str], str] = {}  # a wrong SHA-256 to advertise
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.fail_after: int | None = None  # GET: send this many bytes, then drop the connection
        self.chunk_delay = 0.0  # seconds between 64 KiB chunks (a slow connection)
        self.pause_at: int | None = None  # GET: hold after this offset until ``resume`` is set
        self.resume = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _file(self):
                m = re.match(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<name>.+)$", self.path)
                if not m or (m["repo"], m["name"]) not in hub.files:
                    return None, None
                key = (m["repo"], m["name"])
                return key, hub.files[key]

            def _headers(self, key, data, status=200, length=None, extra=None):
                sha = hub.claimed_sha.get(key) or hashlib.sha256(data).hexdigest()
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("ETag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) if length is None else length))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path, self.headers.get("Range")))
                key, data = self._file()
                if key is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return
                self._headers(key, data)

            def do_GET(self):
                rng = self.headers.get("Range")
                hub.requests.append(("GET", self.path, rng))
                if self.path == "/_test/resume":
                    hub.resume.set()
                    self.send_response(204)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                key, data = self._file()
                if key is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                m = re.match(r"bytes=(\d+)-", rng or "")
                if m:
                    start = int(m.group(1))
                    body = data[start:]
                    self._headers(key, data, 206, len(body),
                                  {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
                else:
                    body = data
                    self._headers(key, data)
                if hub.fail_after is not None:
                    cut, hub.fail_after = hub.fail_after, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                pause = None if hub.pause_at is None else hub.pause_at - start
                for i in range(0, len(body), 65536):
                    piece = body[i:i + 65536]
                    if pause is not None and 0 <= pause - i < len(piece):
                        piece, rest = piece[:pause - i], piece[pause - i:]
                        try:
                            self.wfile.write(piece)
                            self.wfile.flush()
                        except OSError:
                            return
                        hub.resume.wait(300)
                        piece = rest
                    try:
                        self.wfile.write(piece)
                    except OSError:  # the client went away (cancelled)
                        return
                    if hub.chunk_delay:
                        time.sleep(hub.chunk_delay)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that went away
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
